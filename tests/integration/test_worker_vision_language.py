"""image-to-text, visual and document question answering in the worker, against transformers in-process.

transformers 5 has no image-to-text / visual-question-answering pipelines: their references here are what
transformers 4's pipelines did (the model's processors, then ``generate`` or a sigmoid over the answers).
document-question-answering is compared with transformers' pipeline.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from huggingface_hub.inference._generated.types import (
    DocumentQuestionAnsweringOutputElement,
    ImageToTextOutput,
    VisualQuestionAnsweringOutputElement,
)
from PIL import Image, ImageDraw, ImageFont

from server.engines.worker import media
from server.engines.worker.vision_language import _word_boxes, pipeline_generation_config
from server.errors import InvalidRequest
from server.tasks.media_requests import parse_media_task
from tests.fixtures.vision_language import captioner_dir, document_qa_dir, vqa_dir

pytestmark = pytest.mark.integration

CPU = torch.device("cpu")
SCORE_TOL = 1e-3
RNG = np.random.default_rng(0)
IMAGES = [Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 50), (64, 64), (100, 30))]
HAS_TESSERACT = shutil.which("tesseract") is not None and importlib.util.find_spec("pytesseract") is not None


def b64(image: Any) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def load(folder: Path, task: str) -> Any:
    return media.load(media.LoadSpec(str(folder), "main", task, CPU, torch.float32))


def run_batch(model: Any, task: str, payloads: list[dict[str, Any]]) -> list[Any]:
    """Parse and prepare each payload as the worker does, then run them as one batch (they share a key): an
    answer, or the exception that fails that request alone, per payload."""
    prepared = [model.prepare(parse_media_task(task, payload, "m")) for payload in payloads]
    keys = {key for _, key in prepared}
    assert len(keys) == 1, keys
    outputs = list(model.run([item for item, _ in prepared], keys.pop()))
    assert len(outputs) == len(payloads)
    return outputs


def answer(model: Any, task: str, payloads: list[dict[str, Any]]) -> list[Any]:
    """The answers of one batch; raises the first request's error, as the worker would answer it."""
    outputs = run_batch(model, task, payloads)
    for output in outputs:
        if isinstance(output, BaseException):
            raise output
    return outputs


def not_an_image() -> str:
    return base64.b64encode(b"not a picture").decode()


def close(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [{k: v for k, v in a.items() if k != "score"} for a in got] == \
        [{k: v for k, v in a.items() if k != "score"} for a in want]
    assert np.allclose([a["score"] for a in got], [a["score"] for a in want], atol=SCORE_TOL)


# ---- image-to-text -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner() -> Any:
    return load(captioner_dir(), "image-to-text")


def reference_caption(model: Any, image: Any, seed: int | None = None, **kwargs: Any) -> str:
    """transformers 4's image-to-text pipeline: image processor, generate, decode without special tokens."""
    pixels = model.image_processor(images=image, return_tensors="pt").pixel_values
    config = pipeline_generation_config(model.model.generation_config)
    config.update(**kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        ids = model.model.generate(pixels, generation_config=config)[0]
    return str(model.tokenizer.decode(ids, skip_special_tokens=True))


def test_captions_match_generate_batched_or_not(captioner: Any) -> None:
    payloads = [{"inputs": b64(image)} for image in IMAGES]
    batch = answer(captioner, "image-to-text", payloads)
    singles = [answer(captioner, "image-to-text", [p])[0] for p in payloads]
    want = [[{"generated_text": reference_caption(captioner, image)}] for image in IMAGES]
    assert batch == singles == want
    assert len({a[0]["generated_text"] for a in batch}) == len(IMAGES)  # the image matters
    assert ImageToTextOutput.parse_obj_as_list(batch[0])[0].generated_text == want[0][0]["generated_text"]


def test_caption_parameters(captioner: Any) -> None:
    image = IMAGES[0]
    payload = {"inputs": b64(image), "parameters": {"max_new_tokens": 5, "generation_parameters": {"num_beams": 2}}}
    got = answer(captioner, "image-to-text", [payload])[0][0]["generated_text"]
    assert got == reference_caption(captioner, image, max_new_tokens=5, num_beams=2)
    assert len(captioner.tokenizer(got, add_special_tokens=False)["input_ids"]) <= 5
    sampled = {"inputs": b64(image), "parameters": {"generation_parameters": {"do_sample": True, "seed": 3}}}
    want = [{"generated_text": reference_caption(captioner, image, seed=3, do_sample=True)}]
    assert answer(captioner, "image-to-text", [sampled]) == answer(captioner, "image-to-text", [sampled]) == [want]
    keys = [captioner.prepare(parse_media_task("image-to-text", sampled, "m"))[1] for _ in range(2)]
    assert keys[0] != keys[1]  # seeded requests never share a batch: their samples would depend on each other


def test_caption_length_defaults(captioner: Any) -> None:
    from transformers import GenerationConfig

    assert captioner.info()["max_new_tokens"] == 16  # the model's generation_config wins
    assert pipeline_generation_config(GenerationConfig()).max_new_tokens == 256  # else the pipelines' default
    assert pipeline_generation_config(GenerationConfig(max_length=30)).max_new_tokens is None


def test_image_text_to_text_pipeline_does_not_apply(captioner: Any) -> None:
    """transformers 5's replacement pipeline needs a ProcessorMixin (and a prompt): no reference for captioners."""
    from transformers import pipeline

    with pytest.raises(TypeError, match="ProcessorMixin"):
        pipeline("image-text-to-text", model=str(captioner_dir()))


def test_caption_bad_input(captioner: Any) -> None:
    with pytest.raises(InvalidRequest, match="`max_new_tokens` must be at most 511"):
        answer(captioner, "image-to-text", [{"inputs": b64(IMAGES[0]), "parameters": {"max_new_tokens": 600}}])
    with pytest.raises(InvalidRequest, match="early_stopping"):
        answer(captioner, "image-to-text", [{"inputs": b64(IMAGES[0]), "parameters": {
            "generation_parameters": {"num_beams": 2, "early_stopping": "sometimes"}}}])
    with pytest.raises(InvalidRequest, match="temperature"):
        answer(captioner, "image-to-text", [{"inputs": b64(IMAGES[0]), "parameters": {
            "generation_parameters": {"do_sample": True, "temperature": -1.0}}}])
    bad, good = run_batch(captioner, "image-to-text", [{"inputs": not_an_image()}, {"inputs": b64(IMAGES[1])}])
    assert isinstance(bad, InvalidRequest) and "not an image" in bad.message  # fails that request alone
    assert good == [{"generated_text": reference_caption(captioner, IMAGES[1])}]


# ---- visual-question-answering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa() -> Any:
    return load(vqa_dir(), "visual-question-answering")


def reference_vqa(model: Any, image: Any, question: str, top_k: int = 5) -> list[dict[str, Any]]:
    """transformers 4's visual-question-answering pipeline: tokenizer + image processor, sigmoid, top k."""
    inputs = dict(model.tokenizer(question, return_tensors="pt"))
    inputs |= dict(model.image_processor(images=image, return_tensors="pt"))
    with torch.inference_mode():
        probs = model.model(**inputs).logits.sigmoid()[0]
    scores, ids = probs.topk(min(top_k, model.model.config.num_labels))
    labels = model.model.config.id2label
    return [{"score": s, "answer": labels[i]} for s, i in zip(scores.tolist(), ids.tolist(), strict=True)]


def vqa_payload(image: Any, question: str, **parameters: Any) -> dict[str, Any]:
    """What InferenceClient.visual_question_answering sends."""
    data = b64(image)
    return {"inputs": data, "parameters": parameters, "question": question, "image": data}


def test_vqa_matches_v4_pipeline_batched_or_not(vqa: Any) -> None:
    cases = [(IMAGES[0], "what color is the car?", None), (IMAGES[1], "how many?", 2),
             (IMAGES[2], "is there a dog or a cat in this picture?", 50)]
    payloads = [vqa_payload(img, q, **({"top_k": k} if k else {})) for img, q, k in cases]
    batch = answer(vqa, "visual-question-answering", payloads)
    for got, payload, (img, q, k) in zip(batch, payloads, cases, strict=True):
        want = reference_vqa(vqa, img, q, k or 5)
        close(got, want)
        close(answer(vqa, "visual-question-answering", [payload])[0], got)
    assert [len(a) for a in batch] == [5, 2, 10]  # top_k 5 by default, at most every answer
    parsed = VisualQuestionAnsweringOutputElement.parse_obj_as_list(batch[0])
    assert parsed[0].answer == batch[0][0]["answer"]


def test_vqa_bad_input(vqa: Any) -> None:
    with pytest.raises(InvalidRequest, match="at most 40"):
        answer(vqa, "visual-question-answering", [vqa_payload(IMAGES[0], "why " * 60)])
    with pytest.raises(InvalidRequest, match="top_k"):
        answer(vqa, "visual-question-answering", [vqa_payload(IMAGES[0], "why?", top_k=0)])
    bad = {"inputs": {"image": not_an_image(), "question": "why?"}}
    failed, good = run_batch(vqa, "visual-question-answering", [bad, vqa_payload(IMAGES[2], "why?")])
    assert isinstance(failed, InvalidRequest) and failed.param == "inputs.image"  # fails that request alone
    close(good, reference_vqa(vqa, IMAGES[2], "why?"))


# ---- document-question-answering -----------------------------------------------------------------------------

WORDS = [("Invoice", [30, 40, 250, 90]), ("number", [270, 40, 500, 90]), ("12345", [520, 40, 700, 90]),
         ("Total", [30, 300, 180, 350]), ("amount", [200, 300, 420, 350]), ("42", [440, 300, 520, 350]),
         ("dollars", [540, 300, 760, 350]), ("Paid", [30, 590, 160, 690]), ("by", [185, 590, 257, 690]),
         ("Alice", [275, 590, 427, 690]), ("Smith", [447, 590, 620, 690])]
QUESTION = "What is the invoice number?"


def flat(word_boxes: list[tuple[str, list[int]]]) -> list[Any]:
    """word_boxes as the request model takes them: word, box, word, box, ..."""
    return [x for word, box in word_boxes for x in (word, box)]


def document() -> Any:
    image = Image.new("RGB", (420, 200), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(28)
    for y, line in ((10, "Invoice number 12345"), (60, "Total amount 42 dollars"), (110, "Paid by Alice Smith")):
        draw.text((10, y), line, fill="black", font=font)
    return image


@pytest.fixture(scope="module")
def doc_qa() -> Any:
    return load(document_qa_dir(), "document-question-answering")


@pytest.fixture(scope="module")
def doc_pipe() -> Any:
    from transformers import pipeline

    return pipeline("document-question-answering", model=str(document_qa_dir()), device=CPU, dtype=torch.float32)


def doc_payload(question: str, **parameters: Any) -> dict[str, Any]:
    """What InferenceClient.document_question_answering sends."""
    return {"inputs": {"question": question, "image": b64(document())}, "parameters": parameters}


def test_document_qa_with_word_boxes_matches_pipeline(doc_qa: Any, doc_pipe: Any) -> None:
    image = document()
    cases: list[dict[str, Any]] = [
        {},
        {"top_k": 3},
        {"top_k": 4, "max_seq_len": 16, "doc_stride": 2},  # several spans, of different lengths
        {"top_k": 2, "handle_impossible_answer": True, "max_answer_len": 1},
    ]
    questions = [QUESTION, "Who paid?", "How much is the total amount?", QUESTION]
    payloads = [doc_payload(q, word_boxes=flat(WORDS[: 3 + 3 * i]), **params)
                for i, (q, params) in enumerate(zip(questions, cases, strict=True))]
    spans = doc_pipe.preprocess({"image": image, "question": questions[2], "word_boxes": WORDS[:9]},
                                max_seq_len=16, doc_stride=2)
    assert len({int(span["input_ids"].shape[1]) for span in spans}) > 1
    batch = answer(doc_qa, "document-question-answering", payloads)
    for i, (got, q, params) in enumerate(zip(batch, questions, cases, strict=True)):
        want = doc_pipe(image=image, question=q, word_boxes=WORDS[: 3 + 3 * i], **params)
        assert want, params
        close(got, want)
        close(answer(doc_qa, "document-question-answering", [payloads[i]])[0], got)
    assert len(batch[1]) == 3 and len(batch[2]) == 4
    parsed = DocumentQuestionAnsweringOutputElement.parse_obj_as_list(batch[0])
    assert (parsed[0].answer, parsed[0].start, parsed[0].end) == (batch[0][0]["answer"], batch[0][0]["start"],
                                                                   batch[0][0]["end"])


def test_document_qa_max_question_len(doc_qa: Any, doc_pipe: Any) -> None:
    """The pipeline takes max_question_len but its preprocess does not: the worker cuts the question itself."""
    image = document()
    with pytest.raises(TypeError, match="max_question_len"):
        doc_pipe(image=image, question=QUESTION, word_boxes=WORDS, max_question_len=4)
    got = answer(doc_qa, "document-question-answering", [doc_payload(QUESTION, word_boxes=flat(WORDS),
                                                                       max_question_len=4, top_k=2)])[0]
    close(got, doc_pipe(image=image, question="What is the", word_boxes=WORDS, top_k=2))


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract-ocr / pytesseract not installed")
def test_document_qa_ocr_matches_pipeline(doc_qa: Any, doc_pipe: Any) -> None:
    from transformers.pipelines.document_question_answering import apply_tesseract

    image = document()
    words, _ = apply_tesseract(image, lang=None, tesseract_config="")
    assert {"Invoice", "12345", "Alice"} <= set(words)  # the rendered text is read back
    payloads = [doc_payload(QUESTION), doc_payload("Who paid?", top_k=3, lang="eng")]
    batch = answer(doc_qa, "document-question-answering", payloads)
    close(batch[0], doc_pipe(image=image, question=QUESTION))
    close(batch[1], doc_pipe(image=image, question="Who paid?", top_k=3, lang="eng"))
    assert all(a["answer"] in " ".join(words) for a in batch[1])
    with pytest.raises(InvalidRequest, match="`xyz` is not installed"):
        answer(doc_qa, "document-question-answering", [doc_payload(QUESTION, lang="xyz")])


def test_document_qa_without_tesseract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc_pipe: Any) -> None:
    """No tesseract binary on PATH: OCR requests are refused with the fix, word_boxes requests still work."""
    monkeypatch.setenv("PATH", str(tmp_path))
    model = load(document_qa_dir(), "document-question-answering")
    assert model.info()["ocr"] is False
    with pytest.raises(InvalidRequest, match=r"tesseract-ocr.*word_boxes") as e:
        answer(model, "document-question-answering", [doc_payload(QUESTION)])
    assert e.value.param == "word_boxes"
    got = answer(model, "document-question-answering", [doc_payload(QUESTION, word_boxes=flat(WORDS))])[0]
    close(got, doc_pipe(image=document(), question=QUESTION, word_boxes=WORDS))


def test_word_boxes_forms() -> None:
    """The Hub spec's flat list (what the request model takes) and the pipeline's (word, box) pairs."""
    want = (("Invoice", (1, 2, 3, 4)), ("12345", (5, 6, 7, 8)))
    assert _word_boxes(["Invoice", [1.0, 2.0, 3.0, 4.0], "12345", [5, 6, 7, 8]]) == want
    assert _word_boxes([["Invoice", [1, 2, 3, 4]], ("12345", (5, 6, 7, 8))]) == want


def test_document_qa_bad_input(doc_qa: Any) -> None:
    boxes = flat(WORDS)
    cases = [
        ({"word_boxes": ["Invoice", "number", [1, 2, 3, 4], [1, 2, 3, 4]]}, "alternate words and boxes"),
        ({"word_boxes": ["Invoice", [1, 2, 3]]}, "4 numbers in 0..1000"),
        ({"word_boxes": ["Invoice", [1, 2, 3, 2000]]}, "4 numbers in 0..1000"),
        ({"word_boxes": boxes, "max_seq_len": 1000}, "at most 512"),
        ({"word_boxes": boxes, "max_seq_len": 20, "doc_stride": 15}, "`doc_stride` \\(15\\) must be below"),
        ({"word_boxes": boxes, "max_seq_len": 20}, "`doc_stride` \\(10\\) must be below"),  # the default stride
        ({"word_boxes": boxes, "max_seq_len": 8}, "leaves no room"),
    ]
    for parameters, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            answer(doc_qa, "document-question-answering", [doc_payload(QUESTION, **parameters)])
    bad = {"inputs": {"image": not_an_image(), "question": QUESTION}, "parameters": {"word_boxes": boxes}}
    failed, good = run_batch(doc_qa, "document-question-answering", [bad, doc_payload(QUESTION, word_boxes=boxes)])
    assert isinstance(failed, InvalidRequest) and failed.param == "inputs.image"  # fails that request alone
    assert good == answer(doc_qa, "document-question-answering", [doc_payload(QUESTION, word_boxes=boxes)])[0]
