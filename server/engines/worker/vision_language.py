"""image-to-text, visual-question-answering and document-question-answering (engines/worker/media.py's contract).

transformers 5 dropped the image-to-text and visual-question-answering pipelines, so those two are written here
the way transformers 4's pipelines answered: captions are ``generate`` over the image processor's pixels (greedy
unless asked otherwise; ``max_new_tokens`` 256 unless the model's generation config sets a length, the default
of every generating pipeline since transformers PR #38129); VQA is a classifier over ``id2label`` answers scored
with a sigmoid, ``top_k`` 5 by default.
(transformers 5's image-text-to-text pipeline is no substitute: it needs a prompt and a ``ProcessorMixin``.)

document-question-answering uses transformers' pipeline, but not its ``batch_size`` (batches of spans of
different lengths fail in its postprocessing): ``run`` calls the pipeline's own ``preprocess`` per request
(OCR with tesseract unless ``word_boxes`` are given, then the question/word spans), forwards the spans of every
request as one padded batch, and calls its ``postprocess`` per request. Padding cannot change an answer: BERT-style
positions are absolute and the attention mask hides the pads. Donut-style (generative) models run one request at
a time through the pipeline.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import shutil
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from server.engines.worker.media import LoadSpec, MediaModel, decode_image, load_pipeline
from server.errors import InvalidRequest
from server.tasks.media_requests import DocumentQARequest, ImageToTextRequest, MediaRequest, VQARequest

log = logging.getLogger("hubserve.worker")

PIPELINE_MAX_NEW_TOKENS = 256  # transformers' image-to-text / document-QA pipelines' default length
GLOBAL_MAX_LENGTH = 20  # GenerationConfig's historical default max_length: "not set by the model"
VQA_TOP_K = 5
OCR_MISSING = ("OCR of the document needs tesseract-ocr (and pytesseract) installed on the server; "
               "or send the words and their boxes in `parameters.word_boxes`.")


def _load_kwargs(spec: LoadSpec) -> dict[str, Any]:
    return {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}


def _load_model(cls_name: str, spec: LoadSpec) -> Any:
    import transformers

    model_cls = getattr(transformers, cls_name)
    model = model_cls.from_pretrained(spec.repo, dtype=spec.dtype, use_safetensors=True, **_load_kwargs(spec))
    return model.to(spec.device).eval()


def _positions(config: Any) -> int:
    """The text positions of a (possibly composite) config; 0 when it does not say."""
    for part in (config, getattr(config, "decoder", None), getattr(config, "text_config", None)):
        value = getattr(part, "max_position_embeddings", None) if part is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _context(tokenizer: Any, config: Any) -> int:
    """The tokens a text input may have: the tokenizer's limit and the model's positions, the lower that is set."""
    limit = tokenizer.model_max_length
    known = [x for x in (limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 0, _positions(config)) if x]
    return min(known) if known else 0


def _decoded(data: list[str], where: str) -> list[Any]:
    """Each image, or the InvalidRequest of one that does not decode: returned in its place, the batcher fails
    that request alone and the others still run."""
    out: list[Any] = []
    for item in data:
        try:
            out.append(decode_image(item, where))
        except InvalidRequest as e:
            out.append(e)
    return out


def _merged(slots: list[Any], answers: list[Any]) -> list[Any]:
    """``answers`` (of the slots that are not exceptions) put back in order, the exceptions in their places."""
    it = iter(answers)
    return [slot if isinstance(slot, BaseException) else next(it) for slot in slots]


# ---- image-to-text ---------------------------------------------------------------------------------------


def pipeline_generation_config(model_config: Any) -> Any:
    """The model's generation config with the pipelines' length default where the model sets no length."""
    config = copy.deepcopy(model_config)
    if config.max_new_tokens is None and config.max_length in (None, GLOBAL_MAX_LENGTH):
        config.max_new_tokens = PIPELINE_MAX_NEW_TOKENS
    return config


class Captioner(MediaModel):
    """A vision-to-text model (VisionEncoderDecoder, BLIP, GIT, ...) that captions an image without a prompt."""

    task = "image-to-text"

    def __init__(self, spec: LoadSpec) -> None:
        import torch
        import transformers

        self.torch = torch
        self.model = _load_model("AutoModelForImageTextToText", spec)
        self.device = spec.device
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(spec.repo, **_load_kwargs(spec))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(spec.repo, **_load_kwargs(spec))
        self.generation = pipeline_generation_config(self.model.generation_config)
        self.max_len = _positions(self.model.config)
        self._alone = itertools.count(1)

    def info(self) -> dict[str, Any]:
        return {"max_new_tokens": self.generation.max_new_tokens}

    def prepare(self, request: MediaRequest) -> tuple[str, Hashable]:
        assert isinstance(request, ImageToTextRequest)
        kwargs = request.parameters.generate()
        for name, most in (("max_new_tokens", self.max_len - 1), ("max_length", self.max_len)):  # -1: start token
            if self.max_len and kwargs.get(name, 0) > most:
                raise InvalidRequest(f"`{name}` must be at most {most}: the model's decoder reads at most "
                                     f"{self.max_len} positions.", param=name)
        config = copy.deepcopy(self.generation)
        try:  # what generate refuses outright; it only warns about the rest, and so do we
            config.update(**{k: v for k, v in kwargs.items() if k != "seed"})
            config.validate()
        except ValueError as e:
            raise InvalidRequest(f"Invalid generation parameters: {e}", param="generation_parameters") from e
        key = json.dumps(kwargs, sort_keys=True)
        # A seeded request runs alone: in a batch its samples would depend on its neighbours.
        return request.inputs, (key, next(self._alone) if "seed" in kwargs else 0)

    def run(self, items: list[str], key: Hashable) -> list[Any]:
        assert isinstance(key, tuple)
        kwargs = json.loads(key[0])
        seed = kwargs.pop("seed", None)
        slots = _decoded(items, "inputs")
        images = [x for x in slots if not isinstance(x, BaseException)]
        if not images:
            return slots
        features = self.image_processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device, dtype=self.model.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in features.items()}
        if seed is not None:
            self.torch.manual_seed(int(seed))
        config = copy.deepcopy(self.generation)
        config.update(**kwargs)
        try:
            with self.torch.inference_mode():
                output = self.model.generate(**inputs, generation_config=config)
        except ValueError as e:  # what only generate checks (e.g. a temperature <= 0 when sampling)
            raise InvalidRequest(f"Invalid generation parameters: {e}", param="generation_parameters") from e
        return _merged(slots, [[{"generated_text": self.tokenizer.decode(ids, skip_special_tokens=True)}]
                               for ids in output])


# ---- visual-question-answering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Question:
    image: str  # base64
    question: str
    top_k: int


class VisualQA(MediaModel):
    """A VQA classifier (ViLT-style): the ``top_k`` answers of ``id2label`` by sigmoid score."""

    task = "visual-question-answering"

    def __init__(self, spec: LoadSpec) -> None:
        import torch
        import transformers

        self.torch = torch
        self.model = _load_model("AutoModelForVisualQuestionAnswering", spec)
        if self.model.can_generate():
            raise ValueError(f"`{spec.repo}` is a generative VQA model ({type(self.model).__name__}); "
                             "visual-question-answering serves classifiers over fixed answers (ViLT-style) only")
        self.device = spec.device
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(spec.repo, **_load_kwargs(spec))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(spec.repo, **_load_kwargs(spec))
        config = self.model.config
        self.id2label = {int(k): str(v) for k, v in config.id2label.items()}
        self.max_len = _context(self.tokenizer, config)

    def info(self) -> dict[str, Any]:
        return {"labels": [self.id2label[i] for i in sorted(self.id2label)]}

    def prepare(self, request: MediaRequest) -> tuple[_Question, Hashable]:
        assert isinstance(request, VQARequest)
        question = request.inputs.question
        if self.max_len:
            tokens = len(self.tokenizer(question)["input_ids"])
            if tokens > self.max_len:
                raise InvalidRequest(f"`question` is {tokens} tokens; this model reads at most {self.max_len}.",
                                     param="inputs.question")
        top_k = request.parameters.top_k or VQA_TOP_K
        return _Question(request.inputs.image, question, top_k), None  # every request batches with every other

    def run(self, items: list[_Question], key: Hashable) -> list[Any]:
        torch = self.torch
        slots = _decoded([item.image for item in items], "inputs.image")
        good = [(image, item) for image, item in zip(slots, items, strict=True) if not isinstance(image, BaseException)]
        if not good:
            return slots
        images, items = [image for image, _ in good], [item for _, item in good]
        text = self.tokenizer([item.question for item in items], padding=True, return_tensors="pt")
        pixels = self.image_processor(images=images, return_tensors="pt")  # padded to one size, with a pixel_mask
        inputs = {k: v.to(self.device) for k, v in text.items()}
        inputs |= {k: v.to(self.device, dtype=self.model.dtype) if v.is_floating_point() else v.to(self.device)
                   for k, v in pixels.items()}
        with torch.inference_mode():
            probs = self.model(**inputs).logits.float().sigmoid().cpu()
        answers = []
        for row, item in zip(probs, items, strict=True):
            scores, ids = row.topk(min(item.top_k, row.shape[0]))
            answers.append([{"answer": self.id2label[int(i)], "score": float(s)}
                            for s, i in zip(scores.tolist(), ids.tolist(), strict=True)])
        return _merged(slots, answers)


# ---- document-question-answering -------------------------------------------------------------------------


@dataclass(frozen=True)
class _DocQuestion:
    image: str  # base64
    question: str
    word_boxes: tuple[tuple[str, tuple[int, int, int, int]], ...] | None
    preprocess: tuple[tuple[str, Any], ...]  # the pipeline's preprocess arguments the request sets
    postprocess: tuple[tuple[str, Any], ...]


def _word_boxes(given: list[Any]) -> tuple[tuple[str, tuple[int, int, int, int]], ...]:
    """(word, box) pairs from ``word_boxes``: [word, box, word, box, ...] (the Hub spec's flat list) or pairs."""
    pairs: list[tuple[Any, Any]] = []
    if all(isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) for x in given):
        pairs = [(x[0], x[1]) for x in given]
    elif len(given) % 2 == 0 and all(isinstance(w, str) for w in given[::2]):
        pairs = list(zip(given[::2], given[1::2], strict=True))
    else:
        raise InvalidRequest("`word_boxes` must alternate words and boxes: [\"word\", [x0, y0, x1, y1], ...].",
                             param="word_boxes")
    out = []
    for word, box in pairs:
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and all(0 <= v <= 1000 for v in box)):
            raise InvalidRequest(f"The box of `{word}` in `word_boxes` must be 4 numbers in 0..1000 "
                                 "(x0, y0, x1, y1, normalized to the page).", param="word_boxes")
        out.append((word, (int(box[0]), int(box[1]), int(box[2]), int(box[3]))))
    return tuple(out)


def _ocr_languages() -> set[str] | None:
    """The languages tesseract reads, or None when OCR is not available (no pytesseract or no tesseract binary)."""
    from transformers.pipelines import document_question_answering as pipeline_module

    if not pipeline_module.TESSERACT_LOADED or shutil.which("tesseract") is None:
        return None
    import pytesseract

    try:
        return set(pytesseract.get_languages(config=""))
    except (pytesseract.TesseractError, OSError) as e:
        log.warning("tesseract does not answer (%s): OCR is off", e)
        return None


class DocumentQA(MediaModel):
    """Extractive QA over a document image's words (LayoutLM-style), or Donut-style generation."""

    task = "document-question-answering"

    def __init__(self, spec: LoadSpec) -> None:
        import torch
        from transformers.pipelines.document_question_answering import ModelType

        self.torch = torch
        self.pipe = load_pipeline(spec)
        self.model = self.pipe.model.eval()
        self.tokenizer: Any = self.pipe.tokenizer
        self.generative = self.pipe.model_type == ModelType.VisionEncoderDecoder
        self.split_question = self.pipe.model_type == ModelType.LayoutLM  # its tokenizer reads question.split()
        # LayoutLMv2/v3 image processors may OCR every image themselves (apply_ocr), word_boxes or not.
        self.processor_ocr = bool(getattr(self.pipe.image_processor, "apply_ocr", False))
        self.languages = _ocr_languages()
        self.max_len = _context(self.tokenizer, self.model.config)

    def info(self) -> dict[str, Any]:
        return {"ocr": self.languages is not None, "ocr_languages": sorted(self.languages or ())}

    def prepare(self, request: MediaRequest) -> tuple[_DocQuestion, Hashable]:
        assert isinstance(request, DocumentQARequest)
        p = request.parameters
        word_boxes = _word_boxes(p.word_boxes) if p.word_boxes is not None else None
        if not self.generative and (word_boxes is None or self.processor_ocr):
            self._check_ocr(p.lang)
        question = request.inputs.question
        if p.max_question_len is not None:
            question = self._truncate_question(question, p.max_question_len)
        preprocess: dict[str, Any] = {}
        if not self.generative:
            max_seq_len = p.max_seq_len or self.max_len
            if self.max_len and max_seq_len > self.max_len:
                raise InvalidRequest(f"`max_seq_len` must be at most {self.max_len} (the model's context).",
                                     param="max_seq_len")
            self._check_room(question, max_seq_len, p.doc_stride)
        for name in ("doc_stride", "max_seq_len", "lang"):
            if getattr(p, name) is not None:
                preprocess[name] = getattr(p, name)
        postprocess = {name: getattr(p, name) for name in ("top_k", "max_answer_len", "handle_impossible_answer")
                       if getattr(p, name) is not None}
        item = _DocQuestion(request.inputs.image, question, word_boxes, tuple(sorted(preprocess.items())),
                            tuple(sorted(postprocess.items())))
        return item, None  # parameters travel with each item: every request batches with every other

    def _check_ocr(self, lang: str | None) -> None:
        if self.languages is None:
            raise InvalidRequest(OCR_MISSING, param="word_boxes")
        missing = [code for code in (lang or "").split("+") if code and code not in self.languages]
        if missing:
            raise InvalidRequest(f"OCR language `{'+'.join(missing)}` is not installed here; this server reads "
                                 f"{', '.join(sorted(self.languages - {'osd'}))}.", param="lang")

    def _question_ids(self, question: str) -> list[int]:
        text: Any = question.split() if self.split_question else question
        ids: list[int] = self.tokenizer(text, is_split_into_words=self.split_question,
                                        add_special_tokens=False)["input_ids"]
        return ids

    def _truncate_question(self, question: str, limit: int) -> str:
        """The question cut to at most ``limit`` tokens, at a word boundary (at least its first word)."""
        words = question.split()
        kept: list[str] = []
        for word in words:
            if kept and len(self._question_ids(" ".join([*kept, word]))) > limit:
                break
            kept.append(word)
        return " ".join(kept)

    def _check_room(self, question: str, max_seq_len: int, doc_stride: int | None) -> None:
        """Refuse what the tokenizer cannot split into spans (it raises, or panics on a stride too long)."""
        room = max_seq_len - len(self._question_ids(question)) - self.tokenizer.num_special_tokens_to_add(pair=True)
        stride = doc_stride if doc_stride is not None else min(max_seq_len // 2, 256)
        if room <= 0:
            raise InvalidRequest(f"The question fills `max_seq_len` ({max_seq_len} tokens) and leaves no room for "
                                 "the document: raise `max_seq_len` or set `max_question_len`.", param="max_seq_len")
        if stride >= room:
            raise InvalidRequest(f"`doc_stride` ({stride}) must be below the {room} tokens of document that fit "
                                 f"beside the question in `max_seq_len` ({max_seq_len}).", param="doc_stride")

    def run(self, items: list[_DocQuestion], key: Hashable) -> list[Any]:
        """Per request: decode, OCR and split into spans (a failure fails that request alone); then one forward."""
        slots: list[Any] = []
        for item in items:
            try:
                doc: dict[str, Any] = {"image": decode_image(item.image, "inputs.image"), "question": item.question}
                if item.word_boxes is not None:
                    doc["word_boxes"] = [(word, list(box)) for word, box in item.word_boxes]
                if self.generative:
                    slots.append(self._answers(self._call(lambda d=doc, i=item: self.pipe(
                        d, **dict(i.preprocess), **dict(i.postprocess)))))
                else:
                    slots.append(self._call(lambda d=doc, i=item: list(self.pipe.preprocess(d, **dict(i.preprocess)))))
            except InvalidRequest as e:
                slots.append(e)
        if self.generative:
            return slots
        spans = [x for x in slots if not isinstance(x, BaseException)]
        if not spans:
            return slots
        outputs = self._forward([span for item_spans in spans for span in item_spans])
        answers, start = [], 0
        for item, slot in zip(items, slots, strict=True):
            if isinstance(slot, BaseException):
                continue
            answer = self.pipe.postprocess(outputs[start:start + len(slot)], **dict(item.postprocess))
            answers.append(self._answers(answer))
            start += len(slot)
        return _merged(slots, answers)

    @staticmethod
    def _call(fn: Any) -> Any:
        """``fn()``, with OCR failures as InvalidRequest and tokenizer panics (BaseException) as RuntimeError."""
        try:
            return fn()
        except Exception as e:
            if type(e).__name__ == "TesseractError":  # pytesseract's; it may not be installed
                raise InvalidRequest(f"OCR of the document failed: {e}", param="inputs.image") from e
            raise
        except BaseException as e:
            if type(e).__name__ == "PanicException":  # pyo3's (tokenizers): it would stop the batcher's loop
                raise RuntimeError(f"the tokenizer failed: {e}") from None
            raise

    def _forward(self, spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The pipeline's ``_forward`` over all spans at once (right-padded), each output cut to its span."""
        torch = self.torch
        extras = ("p_mask", "word_ids", "words", "is_last")
        lengths = [int(span["input_ids"].shape[1]) for span in spans]
        longest = max(lengths)
        pad_ids = {"input_ids": self.tokenizer.pad_token_id or 0}
        batch: dict[str, Any] = {}
        for name in [k for k in spans[0] if k not in extras]:
            rows = []
            for span in spans:
                x = span[name]
                if name != "image":
                    pad = (0, 0, 0, longest - x.shape[1]) if x.dim() == 3 else (0, longest - x.shape[1])
                    x = torch.nn.functional.pad(x, pad, value=pad_ids.get(name, 0))
                rows.append(x)
            stacked = torch.cat(rows).to(self.pipe.device)
            batch[name] = stacked.to(self.model.dtype) if stacked.is_floating_point() else stacked
        with torch.inference_mode():
            out = self.model(**batch)
        starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        return [{"start_logits": starts[i:i + 1, :n], "end_logits": ends[i:i + 1, :n],
                 "attention_mask": span.get("attention_mask"), **{k: span[k] for k in extras}}
                for i, (span, n) in enumerate(zip(spans, lengths, strict=True))]

    @staticmethod
    def _answers(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        shaped = []
        for answer in answers:
            out: dict[str, Any] = {"answer": answer.get("answer")}
            for name, cast in (("score", float), ("start", int), ("end", int)):
                if answer.get(name) is not None:
                    out[name] = cast(answer[name])
            shaped.append(out)
        return shaped


def load(spec: LoadSpec) -> MediaModel:
    if spec.task == "image-to-text":
        return Captioner(spec)
    if spec.task == "visual-question-answering":
        return VisualQA(spec)
    if spec.task == "document-question-answering":
        return DocumentQA(spec)
    raise ValueError(f"vision_language does not serve {spec.task}")
