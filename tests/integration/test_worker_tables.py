"""The worker's table-question-answering (server/engines/worker/tables.py) against transformers' pipeline.

A tiny random TAPAS with an aggregation head (tests/fixtures/table_models.py); bodies as huggingface_hub's
InferenceClient builds them (its hf-inference provider helper, the code ``table_question_answering`` calls).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.engines.worker.media import LoadSpec, MediaModel
from server.errors import InvalidRequest
from server.tasks.media_requests import parse_media_task
from tests.fixtures.table_models import AGGREGATION_LABELS, table_qa_dir

pytestmark = pytest.mark.integration
TASK = "table-question-answering"

REPOS = {"Repository": ["Transformers", "Datasets", "Tokenizers"], "Stars": ["36542", "4512", "3934"],
         "Contributors": ["651", "77", "34"], "Programming language": ["Python", "Python", "Rust, Python and NodeJS"]}
CITIES = {"city": ["Paris", "Rome", "Berlin", "Madrid"], "population": [2100000, 2800000, 3600000, 3300000],
          "area": [105.4, 1285.0, 891.8, 604.3]}  # numbers, as JSON sends them
FRUIT = {"name": ["apple", "pear"], "price": [1.5, 2], "stock": ["", "7"]}
CASES = [
    (REPOS, "How many stars does the transformers repository have?"),
    (REPOS, "Which language is tokenizers written in?"),
    (CITIES, "Which city has the most people?"),
    (CITIES, "What is the total area?"),
    (FRUIT, "What is the total price?"),
    (FRUIT, "how many in stock"),
]


def client_payload(table: dict[str, Any], query: str, **parameters: Any) -> dict[str, Any]:
    """The JSON body ``InferenceClient(url).table_question_answering(table, query, **parameters)`` posts."""
    from huggingface_hub.inference._providers import get_provider_helper

    url = "http://127.0.0.1:1/models/m"
    helper = get_provider_helper("hf-inference", task=TASK, model=url)
    request = helper.prepare_request(inputs={"query": query, "table": table},
                                     parameters={"model": None, "padding": None, "sequential": None,
                                                 "truncation": None, **parameters},
                                     headers={}, model=url, api_key="hf_test")
    assert request.json is not None
    return json.loads(json.dumps(request.json))


def as_text(table: dict[str, Any]) -> dict[str, list[str]]:
    return {column: [str(v) for v in cells] for column, cells in table.items()}


def expected(answer: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's answer as JSON carries it (coordinates are tuples there)."""
    return json.loads(json.dumps(answer))


@pytest.fixture(scope="module")
def model() -> MediaModel:
    import torch

    from server.engines.worker import tables

    spec = LoadSpec(repo=str(table_qa_dir()), revision="main", task=TASK, device=torch.device("cpu"),
                    dtype=torch.float32)
    return tables.load(spec)


@pytest.fixture(scope="module")
def reference() -> Any:
    import torch
    import transformers

    return transformers.pipeline(TASK, model=str(table_qa_dir()), dtype=torch.float32)


@pytest.fixture(scope="module")
def singles(model: MediaModel) -> list[dict[str, Any]]:
    return [answer(model, client_payload(table, query)) for table, query in CASES]


def prepared(model: MediaModel, payload: dict[str, Any]) -> tuple[Any, Any]:
    return model.prepare(parse_media_task(TASK, payload, "m"))


def answer(model: MediaModel, payload: dict[str, Any]) -> dict[str, Any]:
    item, key = prepared(model, payload)
    (out,) = model.run([item], key)
    return dict(out)


def test_answers_match_the_pipeline(singles: list[dict[str, Any]], reference: Any) -> None:
    from huggingface_hub.inference._generated.types import TableQuestionAnsweringOutputElement

    for (table, query), got in zip(CASES, singles, strict=True):
        want = expected(reference(table=as_text(table), query=query))
        assert got == want, (query, got, want)
        assert list(got) == ["answer", "coordinates", "cells", "aggregator"]
        parsed = TableQuestionAnsweringOutputElement.parse_obj_as_instance(json.dumps(got).encode())
        assert (parsed.answer, parsed.coordinates, parsed.cells, parsed.aggregator) == (
            got["answer"], got["coordinates"], got["cells"], got["aggregator"])
        assert got["aggregator"] in AGGREGATION_LABELS.values()
    assert all(got["cells"] for got in singles), "the fixture should select cells for every case"
    assert len({json.dumps(got) for got in singles}) > 2, "the answers should differ by table and query"


def test_numbers_are_answered_as_text(singles: list[dict[str, Any]]) -> None:
    for (table, _), got in zip(CASES, singles, strict=True):
        text = as_text(table)
        for (row, column), cell in zip(got["coordinates"], got["cells"], strict=True):
            assert cell == text[list(text)[column]][row]


def test_a_batch_answers_as_each_alone(model: MediaModel, singles: list[dict[str, Any]]) -> None:
    prepared_items = [prepared(model, client_payload(table, query)) for table, query in CASES]
    keys = {key for _, key in prepared_items}
    assert keys == {False}
    batch = model.run([item for item, _ in prepared_items], False)
    assert batch == singles
    # a max_length-padded request (512 tokens) in a batch with short ones
    padded, key = prepared(model, client_payload(*CASES[2], padding="max_length"))
    assert key is False
    mixed = model.run([prepared_items[0][0], padded, prepared_items[4][0]], key)
    assert mixed == [singles[0], singles[2], singles[4]]


def test_a_model_that_may_select_the_question_column_is_batched_by_length(model: MediaModel,
                                                                          singles: list[dict[str, Any]]) -> None:
    from server.engines.worker.tables import TableQA

    assert isinstance(model, TableQA) and model.pad_freely  # the fixture's config: allow_empty_column_selection off
    items = [prepared(model, client_payload(table, query))[0] for table, query in CASES]
    model.pad_freely = False  # as for allow_empty_column_selection: padding would move the question cell's logit
    try:
        assert model.run(items, False) == singles
    finally:
        model.pad_freely = True


@pytest.mark.parametrize("parameters", [{"padding": "max_length"}, {"padding": "do_not_pad"}, {"truncation": True},
                                        {"truncation": False}, {"truncation": "drop_rows_to_fit"}])
def test_parameters_as_the_pipeline(model: MediaModel, reference: Any, parameters: dict[str, Any]) -> None:
    table, query = CASES[3]
    got = answer(model, client_payload(table, query, **parameters))
    assert got == expected(reference(table=as_text(table), query=query, **parameters))


def test_sequential_runs_alone_as_the_pipeline(model: MediaModel, reference: Any) -> None:
    items = [prepared(model, client_payload(table, query, sequential=True)) for table, query in CASES[:3]]
    assert {key for _, key in items} == {True}
    got = model.run([item for item, _ in items], True)
    want = [expected(reference(table=as_text(table), query=query, sequential=True)) for table, query in CASES[:3]]
    assert got == want


def test_rows_that_do_not_fit_are_dropped_as_the_pipeline(model: MediaModel, reference: Any) -> None:
    rows = 150  # about 900 tokens: the default truncation (drop_rows_to_fit) keeps what fits in 512
    table = {"name": [f"item number {i}" for i in range(rows)], "count": list(range(rows))}
    got = answer(model, client_payload(table, "which item has count 3?"))
    assert got == expected(reference(table=as_text(table), query="which item has count 3?"))
    with pytest.raises(InvalidRequest, match="truncation"):
        answer(model, client_payload(table, "which item has count 3?", truncation=False))


@pytest.mark.parametrize("payload, param, says", [
    ({"inputs": {"query": "which?", "table": {"a": ["1", "2"], "b": ["3"]}}}, "inputs", "same number of cells"),
    ({"inputs": {"query": "which?", "table": {"a": []}}}, "inputs", "same number of cells"),
    ({"inputs": {"query": "which?", "table": {}}}, "inputs.table", "at least 1 item"),
    ({"inputs": {"query": "", "table": {"a": ["1"]}}}, "inputs.query", "at least 1 character"),
    ({"inputs": {"table": {"a": ["1"]}}}, "inputs.query", "required"),
    ({"inputs": {"query": "which?", "table": {"a": ["1", None]}}}, "inputs.table.a.1", "valid"),
])
def test_bad_requests_are_rejected_by_the_request_model(payload: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says) as caught:
        parse_media_task(TASK, payload, "m")
    assert (caught.value.param or "").startswith(param)


def test_bad_parameters_and_overlong_queries_are_rejected(model: MediaModel) -> None:
    with pytest.raises(InvalidRequest, match="truncation") as caught:
        prepared(model, client_payload(FRUIT, "which?", truncation="longest_first"))
    assert caught.value.param == "parameters.truncation"
    with pytest.raises(InvalidRequest, match="over the model's 512"):
        prepared(model, client_payload(FRUIT, "word " * 600))
    item, key = prepared(model, client_payload(FRUIT, "antidisestablishmentarianism " * 300))  # ~1800 tokens
    with pytest.raises(InvalidRequest, match="over the model's 512"):
        model.run([item], key)
