"""Hub text tasks on vLLM's pooling runner: raw outputs from vLLM, the pipelines' logic (server/tasks/answers.py) here.

- text-classification: ``/classify`` with ``use_activation: false`` (raw logits), then labels,
  ``function_to_apply`` and ``top_k``.
- token-classification and fill-mask: ``/pooling`` with ``task: token_classify`` (one row of raw logits per
  token: over the labels of a *ForTokenClassification head, over the vocabulary of BertForMaskedLM). The gateway
  tokenizes the text itself (server/tasks/tokenizer.py) and sends vLLM the token ids, so it knows each row's
  characters, special tokens and subwords; the rows come back as base64 float32 (an MLM row is a whole
  vocabulary: JSON floats would be ~3x the bytes).
"""

from __future__ import annotations

import base64
from collections import Counter
from typing import Any

import numpy as np

from server.engines.base import Engine
from server.engines.client import post_engine
from server.errors import GenerationError, InvalidRequest
from server.tasks import answers as tasks
from server.tasks.media_requests import SpeechRecognitionRequest
from server.tasks.requests import (
    FillMaskRequest,
    TextClassificationRequest,
    TokenClassificationRequest,
    fill_mask_options,
    token_classification_options,
)
from server.tasks.snapshot import model_config
from server.tasks.tokenizer import SnapshotTokenizer, check_input_size, for_snapshot, off_loop

DEFAULT_CONTEXT = 512


def label_config(snapshot: str) -> tuple[dict[int, str], str]:
    """id2label and the default activation of a classifier."""
    config = model_config(snapshot)
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    function = tasks.default_function(len(id2label) or 2, config.get("problem_type"), config.get("function_to_apply"))
    return id2label, function


def context_length(engine: Engine, tokenizer: SnapshotTokenizer) -> int:
    """Tokens per window: the engine's context, else the model's and the tokenizer's (as transformers caps it)."""
    limits = [engine.max_model_len, model_config(engine.info.snapshot).get("max_position_embeddings"),
              tokenizer.model_max_length]
    known = [int(n) for n in limits if isinstance(n, int) and n > 0]
    return min(known) if known else DEFAULT_CONTEXT


async def classify(engine: Engine, request: TextClassificationRequest) -> list[list[dict[str, object]]]:
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    body = {"model": engine.model_id, "input": texts, "use_activation": False}
    response = await post_engine(engine, "/classify", body)
    data = sorted(response.json().get("data") or [], key=lambda d: d.get("index", 0))
    if len(data) != len(texts):
        raise GenerationError("The engine answered an unexpected classification payload.")
    id2label, default = label_config(engine.info.snapshot)
    function = request.parameters.function_to_apply or default
    return [tasks.classification(d["probs"], id2label, function, request.parameters.top_k) for d in data]


async def token_logits(engine: Engine, windows: list[list[int]]) -> list[np.ndarray]:
    """vLLM's raw per-token logits for each window of token ids: one (tokens x outputs) array per window."""
    body = {"model": engine.model_id, "input": windows, "task": "token_classify", "use_activation": False,
            "add_special_tokens": False, "encoding_format": "base64", "embed_dtype": "float32",
            "endianness": "little"}
    response = await post_engine(engine, "/pooling", body)
    data = sorted(response.json().get("data") or [], key=lambda d: d.get("index", 0))
    if len(data) != len(windows) or not all(isinstance(d.get("data"), str) for d in data):
        raise GenerationError("The engine answered an unexpected pooling payload.")
    out = []
    for window, item in zip(windows, data, strict=True):
        flat = np.frombuffer(base64.b64decode(item["data"]), dtype="<f4").astype(np.float64)
        if not window or flat.size % len(window):
            raise GenerationError("The engine answered per-token outputs that do not fit the input.")
        out.append(flat.reshape(len(window), -1))
    return out


async def token_classification(engine: Engine, request: TokenClassificationRequest, max_chars: int) -> Any:
    """Entities per text, as transformers' token-classification pipeline gives them. Tokenizing and shaping the
    answer run in the tokenizer pool (never on the event loop), for at most ``max_chars`` characters."""
    tokenizer = for_snapshot(engine.info.snapshot)
    context = context_length(engine, tokenizer)
    strategy, ignore, stride = token_classification_options(request, engine.info.name, context)
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    check_input_size(texts, max_chars)

    def split() -> list[tuple[int, Any]]:
        return [(i, w) for i, text in enumerate(texts) for w in tokenizer.windows(text, context, stride)]

    windows = await off_loop(split)
    logits = await token_logits(engine, [w.ids for _, w in windows])
    id2label, _ = label_config(engine.info.snapshot)

    def entities() -> Any:
        out: list[list[dict[str, Any]]] = [[] for _ in texts]
        for (i, encoding), rows in zip(windows, logits, strict=True):
            pre = tasks.pre_entities(texts[i], encoding.tokens, encoding.ids, tasks.softmax(rows), encoding.offsets,
                                     encoding.special_tokens_mask, tokenizer.unk_id, tokenizer.word_aware)
            out[i] += tasks.token_entities(pre, id2label, strategy, ignore, tokenizer.tokens_to_string)
        counts = Counter(i for i, _ in windows)
        answers = [tasks.merge_overlapping(e) if counts[i] > 1 else e for i, e in enumerate(out)]
        return answers[0] if isinstance(request.inputs, str) else answers

    return await off_loop(entities)


def target_ids(tokenizer: SnapshotTokenizer, targets: tuple[str, ...]) -> list[int]:
    """Vocabulary ids of fill-mask ``targets`` (a target outside the vocabulary: its first token, as transformers)."""
    ids = set()
    for target in targets:
        token_id = tokenizer.token_id(target)
        if token_id is None:
            token_id = tokenizer.first_token(target)
        if token_id is not None:
            ids.add(int(token_id))
    return sorted(ids)


async def fill_mask(engine: Engine, request: FillMaskRequest, max_chars: int) -> Any:
    """Per mask token the ``top_k`` fillings ``[{sequence, score, token, token_str}]`` (a list per mask when a
    text holds several), as transformers' fill-mask pipeline gives them. Tokenizing runs in the tokenizer pool."""
    tokenizer = for_snapshot(engine.info.snapshot)
    top_k, targets = fill_mask_options(request, engine.info.name, tokenizer.mask_token)
    wanted = target_ids(tokenizer, targets) if targets else None
    if targets and not wanted:
        raise InvalidRequest("None of `targets` is a token of this model's vocabulary.", param="targets")
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    check_input_size(texts, max_chars)
    context = context_length(engine, tokenizer)
    encodings = await off_loop(lambda: [tokenizer.windows(text, context)[0] for text in texts])
    logits = await token_logits(engine, [e.ids for e in encodings])
    out: list[Any] = []
    for encoding, rows in zip(encodings, logits, strict=True):
        ids = np.asarray(encoding.ids)
        positions = np.nonzero(ids == tokenizer.mask_id)[0]
        if not len(positions):
            raise InvalidRequest(f"The mask token {tokenizer.mask_token} was cut off: the input is longer than "
                                 "the model's context.")
        single = len(positions) == 1
        per_mask = []
        for position, candidates in zip(positions, tasks.mask_candidates(rows[positions], top_k, wanted),
                                        strict=True):
            fills = []
            for token, score in candidates:
                filled = ids.copy()
                filled[position] = token
                fills.append({"score": score, "token": token, "token_str": tokenizer.decode([token]),
                              "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=single)})
            per_mask.append(fills)
        out.append(per_mask[0] if single else per_mask)
    return out[0] if isinstance(request.inputs, str) else out


# ---- automatic-speech-recognition (Whisper on vLLM: /v1/audio/transcriptions) ------------------------------------

# InferenceClient's generation parameters → the fields of vLLM's transcription request
TRANSCRIPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                        "max_new_tokens": "max_completion_tokens", "repetition_penalty": "repetition_penalty",
                        "language": "language", "task": "task"}


def transcription_fields(request: SpeechRecognitionRequest, model: str) -> dict[str, str]:
    """The multipart form fields of vLLM's transcription request for a Hub ASR request. Pure."""
    p = request.parameters
    generate = p.generate()
    unknown = sorted(set(generate) - set(TRANSCRIPTION_FIELDS))
    if unknown:
        raise InvalidRequest(f"Model `{model}` (speech recognition on vLLM) does not take {', '.join(unknown)}; "
                             'set backend = "transformers" in models.toml for the full generate() parameters.',
                             param="parameters")
    if p.return_timestamps not in (None, False, True):
        raise InvalidRequest(f"Model `{model}` (Whisper on vLLM) gives segment timestamps only "
                             "(return_timestamps: true).", param="return_timestamps")
    if generate.get("task", "transcribe") not in ("transcribe", "translate"):
        raise InvalidRequest("`task` is transcribe or translate.", param="task")
    fields = {"model": model, "response_format": "verbose_json" if p.return_timestamps else "json"}
    return fields | {TRANSCRIPTION_FIELDS[k]: str(v).lower() if isinstance(v, bool) else str(v)
                     for k, v in generate.items()}


def transcription_answer(data: dict[str, Any], timestamps: bool) -> dict[str, Any]:
    """vLLM's (verbose) transcription as the Hub's ``{text, chunks?}``. Pure."""
    text = data.get("text")
    if not isinstance(text, str):
        raise GenerationError("The engine answered an unexpected transcription payload.")
    if not timestamps:
        return {"text": text}
    chunks = [{"text": str(s.get("text", "")), "timestamp": [float(s.get("start", 0.0)), float(s.get("end", 0.0))]}
              for s in data.get("segments") or [] if isinstance(s, dict)]
    return {"text": text, "chunks": chunks}


async def transcribe(engine: Engine, audio: bytes, request: SpeechRecognitionRequest) -> dict[str, Any]:
    fields = transcription_fields(request, engine.model_id)
    route = "/v1/audio/translations" if fields.pop("task", "transcribe") == "translate" else "/v1/audio/transcriptions"
    files = {"file": ("audio", audio, "application/octet-stream")}
    response = await post_engine(engine, route, form=fields, files=files)
    return transcription_answer(response.json(), bool(request.parameters.return_timestamps))
