"""Backend choice (engines/select.py), the worker's dynamic batcher, task request parsing, worker arguments."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from server.engines.base import ModelInfo
from server.engines.select import choose_backend, make_engine
from server.engines.transformers import TransformersEngine, worker_args
from server.engines.vllm import VLLMEngine
from server.engines.worker.batcher import Batcher
from server.errors import InvalidRequest
from server.settings import Settings
from server.tasks.requests import QuestionAnsweringRequest, Seq2SeqRequest, parse_task
from sync.errors import ConfigError

pytestmark = pytest.mark.unit


def info(tmp_path: Path, task: str, arch: str | None, backend: str = "auto", fast_tokenizer: bool = True,
         **kw: Any) -> ModelInfo:
    snapshot = tmp_path / "models--o--n" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    if arch is not None:
        (snapshot / "config.json").write_text(json.dumps({"architectures": [arch]}))
    if fast_tokenizer:
        (snapshot / "tokenizer.json").write_text("{}")
    return ModelInfo(name="m", repo="o/n", commit="a" * 40, task=task, snapshot=str(snapshot), backend=backend, **kw)


@pytest.mark.parametrize(("task", "arch", "backend", "want"), [
    ("text-classification", "BertForSequenceClassification", "auto", "vllm"),
    ("text-classification", "DistilBertForSequenceClassification", "auto", "transformers"),
    ("text-classification", "BertForSequenceClassification", "transformers", "transformers"),
    ("text-ranking", "XLMRobertaForSequenceClassification", "auto", "vllm"),
    ("zero-shot-classification", "BertForSequenceClassification", "auto", "transformers"),
    ("question-answering", "BertForQuestionAnswering", "auto", "transformers"),
    ("summarization", "BartForConditionalGeneration", "auto", "transformers"),
    ("token-classification", "BertForTokenClassification", "auto", "vllm"),
    ("token-classification", "DistilBertForTokenClassification", "auto", "transformers"),
    ("fill-mask", "BertForMaskedLM", "auto", "vllm"),
    ("fill-mask", "RobertaForMaskedLM", "auto", "transformers"),
    ("text-generation", "LlamaForCausalLM", "auto", "vllm"),
    ("feature-extraction", "BertModel", "auto", "vllm"),
    ("text-classification", None, "auto", "transformers"),
])
def test_choose_backend(tmp_path: Path, task: str, arch: str | None, backend: str, want: str) -> None:
    assert choose_backend(info(tmp_path, task, arch, backend)) == want


def test_token_tasks_need_a_fast_tokenizer_on_vllm(tmp_path: Path) -> None:
    """The gateway maps vLLM's per-token rows to characters with the repo's tokenizer.json."""
    slow = info(tmp_path / "slow", "token-classification", "BertForTokenClassification", fast_tokenizer=False)
    assert choose_backend(slow) == "transformers"
    forced = info(tmp_path / "forced", "fill-mask", "BertForMaskedLM", "vllm", fast_tokenizer=False)
    with pytest.raises(ConfigError, match=r"fill-mask on vLLM needs the repo.s tokenizer\.json"):
        choose_backend(forced)


@pytest.mark.parametrize(("task", "backend"), [("text-generation", "transformers"), ("question-answering", "vllm")])
def test_a_backend_that_cannot_serve_the_task_is_a_config_error(tmp_path: Path, task: str, backend: str) -> None:
    with pytest.raises(ConfigError, match=f"model 'm': backend = \"{backend}\" does not serve {task}"):
        choose_backend(info(tmp_path, task, None, backend))


def test_make_engine_builds_the_chosen_engine(tmp_path: Path) -> None:
    settings = Settings()
    engine = make_engine(info(tmp_path, "question-answering", "BertForQuestionAnswering"), settings)
    assert isinstance(engine, TransformersEngine) and engine.backend == "transformers"
    cmd = engine.command()
    assert cmd[1:3] == ["-m", "server.engines.worker"] and "--revision" in cmd and "a" * 40 in cmd
    assert engine.environment()["HF_HUB_OFFLINE"] == "1"
    vllm = make_engine(info(tmp_path, "text-classification", "BertForSequenceClassification"), settings)
    assert isinstance(vllm, VLLMEngine) and vllm.describe()["backend"] == "vllm"


def test_worker_args(tmp_path: Path) -> None:
    assert worker_args(info(tmp_path, "fill-mask", None, engine_args={"max_batch_size": "8"})) == {"max_batch_size": 8}
    with pytest.raises(ConfigError, match="max_model_len is not an argument of the transformers backend"):
        worker_args(info(tmp_path, "fill-mask", None, engine_args={"max_model_len": 10}))


async def test_batcher_joins_concurrent_requests_and_keeps_keys_apart() -> None:
    calls: list[tuple[list[int], Hashable]] = []

    def run(items: list[int], key: Hashable) -> list[int]:
        calls.append((items, key))
        if key == "boom":
            raise RuntimeError("bad batch")
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(run, max_batch=4, window_s=0.05)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(6)), batcher.submit([7, 8], key="k"))
    assert [r for r in results] == [[0], [10], [20], [30], [40], [50], [70, 80]]
    assert sorted(len(items) for items, key in calls if key is None) == [2, 4]  # at most max_batch together
    assert all(items == [7, 8] for items, key in calls if key == "k")
    with pytest.raises(RuntimeError, match="bad batch"):
        await batcher.submit([1], key="boom")
    assert await batcher.submit([2]) == [20]  # the worker survives a failed batch
    await batcher.close()


def test_parse_task_shapes_and_errors() -> None:
    qa = parse_task("question-answering", {"inputs": {"question": "q", "context": "c"},
                                           "parameters": {"top_k": 2}, "options": {"wait_for_model": True}}, "m")
    assert isinstance(qa, QuestionAnsweringRequest) and qa.parameters.top_k == 2
    with pytest.raises(InvalidRequest, match=r"Model `m` serves question-answering and expects .*question"):
        parse_task("question-answering", {"inputs": "text"}, "m")
    with pytest.raises(InvalidRequest, match="candidate_labels"):
        parse_task("zero-shot-classification", {"inputs": "text", "parameters": {}}, "m")
    with pytest.raises(InvalidRequest, match="unknown generate parameters: evil"):
        parse_task("summarization", {"inputs": "t", "parameters": {"generate_parameters": {"evil": 1}}}, "m")
    s2s = parse_task("text2text-generation", {"inputs": "t", "parameters": {"max_new_tokens": 5, "seed": 1,
                                                                            "details": True}}, "m")
    assert isinstance(s2s, Seq2SeqRequest) and s2s.parameters.generate_kwargs() == {"max_new_tokens": 5, "seed": 1}
    with pytest.raises(InvalidRequest, match="expects"):
        parse_task("fill-mask", ["not", "an", "object"], "m")


def test_manifest_backend_and_optional_task() -> None:
    from pydantic import ValidationError

    from sync.manifest import ModelSpec

    spec = ModelSpec(name="m", repo="o/n")
    assert spec.task is None and spec.backend == "auto"
    assert ModelSpec(name="m", repo="o/n", task="text-ranking", backend="transformers").backend == "transformers"
    with pytest.raises(ValidationError, match="'tgi' is not a backend; accepted: auto, vllm, transformers"):
        ModelSpec(name="m", repo="o/n", backend="tgi")
