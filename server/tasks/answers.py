"""Task logic of the Hub Inference API over raw model outputs: pure functions both backends call.

The transformers worker and the gateway (around vLLM's raw logits) turn logits into the answers
transformers' pipelines give: label maps, ``function_to_apply``, ``top_k``, entity aggregation with
character offsets, mask rows, zero-shot entailment scores and question-answering spans. The semantics follow
transformers' pipelines (checked against them in tests/unit/test_task_logic.py); only numpy is needed here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.floating[Any]]

FUNCTIONS = ("sigmoid", "softmax", "none")
AGGREGATIONS = ("none", "simple", "first", "average", "max")


def softmax(x: Array) -> Array:
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-x))


# ---- text classification ---------------------------------------------------------------------------------


def default_function(num_labels: int, problem_type: str | None = None, configured: str | None = None) -> str:
    """The activation transformers applies when the request names none (regression: none; one label or
    multi-label: sigmoid; several labels: softmax; else the config's ``function_to_apply``)."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    if problem_type == "single_label_classification" or num_labels > 1:
        return "softmax"
    return configured if configured in FUNCTIONS else "none"


def classification(
    logits: Sequence[float], id2label: Mapping[int, str], function: str, top_k: int | None = None
) -> list[dict[str, Any]]:
    """``[{label, score}]`` sorted by score, the best ``top_k`` (None: every label)."""
    raw = np.asarray(logits, dtype=np.float64)
    scores = sigmoid(raw) if function == "sigmoid" else softmax(raw) if function == "softmax" else raw
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]), reverse=True)
    ranked = [{"label": id2label.get(i, f"LABEL_{i}"), "score": float(scores[i])} for i in order]
    return ranked if top_k is None else ranked[:top_k]


def relevance(logits: Sequence[float]) -> float:
    """A cross-encoder's relevance score: sigmoid of its single logit (else the last class's probability)."""
    raw = np.asarray(logits, dtype=np.float64)
    return float(sigmoid(raw)[0] if raw.shape[0] == 1 else softmax(raw)[-1])


# ---- zero-shot classification ----------------------------------------------------------------------------


def entailment_id(label2id: Mapping[str, int]) -> int:
    """The NLI model's entailment class (the first label starting with "entail"), -1 when it has none."""
    for label, index in label2id.items():
        if label.lower().startswith("entail"):
            return int(index)
    return -1


def parse_candidate_labels(labels: str | Sequence[str]) -> list[str]:
    """transformers accepts a comma-separated string as well as a list."""
    if isinstance(labels, str):
        labels = labels.split(",")
    return [label.strip() for label in labels if label.strip()]


def zero_shot(logits: Array, labels: Sequence[str], entail: int, multi_label: bool) -> list[dict[str, Any]]:
    """``[{label, score}]`` best first, from the NLI logits of each (text, hypothesis for label) pair.

    One label or ``multi_label``: entailment vs contradiction per label; else softmax of the entailment logits
    over the labels.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if multi_label or len(labels) == 1:
        contradiction = -1 if entail == 0 else 0
        scores = softmax(logits[:, [contradiction, entail]])[:, 1]
    else:
        scores = softmax(logits[:, entail])
    order = list(reversed(scores.argsort(kind="stable")))
    return [{"label": labels[i], "score": float(scores[i])} for i in order]


# ---- token classification --------------------------------------------------------------------------------


@dataclass
class PreEntity:
    """One token of the input with its class probabilities and character span."""

    word: str
    scores: Array
    start: int
    end: int
    index: int
    is_subword: bool


def pre_entities(
    text: str,
    tokens: Sequence[str],
    ids: Sequence[int],
    scores: Array,
    offsets: Sequence[tuple[int, int]],
    special: Sequence[int],
    unk_id: int | None,
    word_aware: bool,
) -> list[PreEntity]:
    """The non-special tokens of one text. ``word_aware``: the tokenizer marks continuing subwords (WordPiece's
    ``##``), so a token is a subword when its text is longer than its span; else a space heuristic decides."""
    out = []
    for i, token in enumerate(tokens):
        if special[i]:
            continue
        start, end = int(offsets[i][0]), int(offsets[i][1])
        ref = text[start:end]
        subword = len(token) != len(ref) if word_aware else start > 0 and " " not in text[start - 1 : start + 1]
        if unk_id is not None and int(ids[i]) == unk_id:
            token, subword = ref, False
        out.append(PreEntity(token, scores[i], start, end, i, subword))
    return out


def _entity(label: str, score: float, word: str, start: int, end: int, index: int | None = None) -> dict[str, Any]:
    entity: dict[str, Any] = {"entity": label, "score": float(score)}
    if index is not None:
        entity["index"] = index
    return entity | {"word": word, "start": start, "end": end}


def _aggregate_word(group: list[PreEntity], id2label: Mapping[int, str], strategy: str,
                    to_string: Callable[[list[str]], str]) -> dict[str, Any]:
    if strategy == "first":
        scores = group[0].scores
    elif strategy == "max":
        scores = max(group, key=lambda p: float(p.scores.max())).scores
    else:  # average
        scores = np.nanmean(np.stack([p.scores for p in group]), axis=0)
    best = int(scores.argmax())
    word = to_string([p.word for p in group])
    return _entity(id2label[best], float(scores[best]), word, group[0].start, group[-1].end)


def _tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _group(entities: list[dict[str, Any]], to_string: Callable[[list[str]], str]) -> list[dict[str, Any]]:
    """Adjacent entities of one type (a B- tag starts a new one) become ``{entity_group, score, word, ...}``."""
    groups: list[list[dict[str, Any]]] = []
    for entity in entities:
        bi, tag = _tag(entity["entity"])
        if groups and tag == _tag(groups[-1][-1]["entity"])[1] and bi != "B":
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [
        {
            "entity_group": g[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean([e["score"] for e in g])),
            "word": to_string([e["word"] for e in g]),
            "start": g[0]["start"],
            "end": g[-1]["end"],
        }
        for g in groups
    ]


def token_entities(
    pre: list[PreEntity],
    id2label: Mapping[int, str],
    strategy: str,
    ignore_labels: Sequence[str] | None,
    to_string: Callable[[list[str]], str],
) -> list[dict[str, Any]]:
    """Entities of one text as transformers' token-classification pipeline returns them."""
    if strategy in ("none", "simple"):
        entities = []
        for p in pre:
            best = int(p.scores.argmax())
            entities.append(_entity(id2label[best], float(p.scores[best]), p.word, p.start, p.end, p.index))
    else:
        words: list[list[PreEntity]] = []
        for p in pre:
            if words and p.is_subword:
                words[-1].append(p)
            else:
                words.append([p])
        entities = [_aggregate_word(w, id2label, strategy, to_string) for w in words]
    if strategy != "none":
        entities = _group(entities, to_string)
    ignore = ["O"] if ignore_labels is None else list(ignore_labels)
    return [e for e in entities if e.get("entity") not in ignore and e.get("entity_group") not in ignore]


def merge_overlapping(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entities from overlapping windows (``stride``) of one long text: the longer (then likelier) one wins."""
    if not entities:
        return entities
    ordered = sorted(entities, key=lambda e: e["start"])
    out, previous = [], ordered[0]
    for entity in ordered[1:]:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and entity["score"] > previous["score"]):
                previous = entity
        else:
            out.append(previous)
            previous = entity
    out.append(previous)
    return out


# ---- fill-mask -------------------------------------------------------------------------------------------


def mask_candidates(
    logits: Array, top_k: int, target_ids: Sequence[int] | None = None
) -> list[list[tuple[int, float]]]:
    """Per mask position, the ``top_k`` (token id, probability) pairs, best first; ``target_ids`` restricts the
    candidates (probabilities stay those over the whole vocabulary, as in transformers)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    rows = []
    for row in probs:
        ids = np.arange(row.shape[0]) if target_ids is None else np.asarray(target_ids)
        values = row[ids]
        k = min(top_k, len(ids))
        order = np.argsort(-values, kind="stable")[:k]
        rows.append([(int(ids[j]), float(values[j])) for j in order])
    return rows


# ---- question answering ----------------------------------------------------------------------------------


def decode_spans(start: Array, end: Array, top_k: int, max_answer_len: int, allowed: NDArray[np.bool_]
                 ) -> list[tuple[int, int, float]]:
    """The ``top_k`` (start, end, score) spans by start·end probability, start <= end < start+max_answer_len,
    both ends on ``allowed`` tokens."""
    outer = np.outer(start, end)
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    flat = candidates.flatten()
    order = np.argsort(-flat, kind="stable")[: max(top_k, 1)]
    starts, ends = np.unravel_index(order, candidates.shape)
    pairs = zip(starts, ends, strict=True)
    return [(int(s), int(e), float(candidates[s, e])) for s, e in pairs if allowed[s] and allowed[e]]


def span_scores(start_logits: Array, end_logits: Array, allowed: NDArray[np.bool_]) -> tuple[Array, Array, float]:
    """Start and end probabilities over the allowed tokens (index 0, the CLS token, zeroed) and the
    no-answer score (CLS start·end)."""
    start = softmax(np.where(allowed, np.asarray(start_logits, dtype=np.float64), -10000.0))
    end = softmax(np.where(allowed, np.asarray(end_logits, dtype=np.float64), -10000.0))
    null = float(start[0] * end[0])
    start[0] = end[0] = 0.0
    return start, end, null


@dataclass
class QAFeature:
    """One window of (question, context) as the model saw it."""

    start_logits: Array
    end_logits: Array
    allowed: NDArray[np.bool_]  # context tokens (and CLS), unpadded
    spans: Sequence[tuple[int, int]]  # character span in the context of each token (aligned to words or not)


def qa_answers(features: list[QAFeature], context: str, top_k: int, max_answer_len: int,
               handle_impossible: bool) -> list[dict[str, Any]]:
    """``[{score, start, end, answer}]`` best first over every window of one question."""
    answers: list[dict[str, Any]] = []
    null = 1_000_000.0
    for f in features:
        start, end, feature_null = span_scores(f.start_logits, f.end_logits, f.allowed)
        null = min(null, feature_null)
        for s, e, score in decode_spans(start, end, top_k, max_answer_len, f.allowed):
            a, b = f.spans[s][0], f.spans[e][1]
            answers.append({"score": score, "start": a, "end": b, "answer": context[a:b]})
    if handle_impossible:
        answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
