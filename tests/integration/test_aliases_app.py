"""Aliases and fallbacks through the real gateway on a loopback port, over real engine processes (the synthetic
engine as a supervised child, answering as the model the body names), with the stock openai, anthropic and
huggingface_hub clients: each fallback reason, the last model's error passing through, streams falling back before
their first byte and never after, the model that answered in the `model` field and the headers, metrics, keys."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.engines.base import EngineState, ModelInfo
from server.ops.keys import new_key, write_keys
from server.registry import Registry
from server.settings import Settings
from server.watch import ManifestWatcher
from sync.manifest import FALLBACK_REASONS, parse_manifest
from tests.fixtures.gateway_app import served
from tests.fixtures.sse_engine import CONTEXT_LENGTH_MESSAGE, SyntheticProcessEngine

pytestmark = pytest.mark.integration

KEY = "aliases-test-key-0123456789"
MANIFEST = """
[[models]]
name = "big"
repo = "org/big"
[[models]]
name = "small"
repo = "org/small"
[[models]]
name = "lazy"
repo = "org/lazy"
load = "on-demand"

[[aliases]]
name = "chat"
models = ["big", "small"]
fallback_on = ["failed", "overloaded", "loading", "context_length"]

[[aliases]]
name = "patient"
models = ["lazy", "small"]

[[aliases]]
name = "strict"
models = ["big", "small"]
fallback_on = ["overloaded"]
"""


@dataclass
class Gateway:
    url: str
    registry: Registry
    chat_only: str  # a key whose list names the alias "chat" only
    big_only: str  # a key whose list names the model "big" only
    slow: str  # a key limited to 1 request per minute
    baseline: dict[tuple[str, str, str, str], float] = field(default_factory=dict)

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def counted(self) -> dict[tuple[str, str, str, str], float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
        return {(s.labels["alias"], s.labels["from_model"], s.labels["to_model"], s.labels["reason"]): s.value
                for family in text_string_to_metric_families(text) if family.name == "hubserve_fallbacks"
                for s in family.samples if s.name == "hubserve_fallbacks_total"}

    def fallbacks(self) -> dict[tuple[str, str, str, str], float]:
        """hubserve_fallbacks_total counted during this test."""
        return {k: v - self.baseline.get(k, 0.0) for k, v in self.counted().items() if v != self.baseline.get(k, 0.0)}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the module (engine processes take seconds to start on a busy machine)."""
    tmp_path = tmp_path_factory.mktemp("aliases")
    (tmp_path / "models.toml").write_text("")
    keys = {}
    records = {}
    for name, models, rpm in (("chat-only", ("chat",), None), ("big-only", ("big",), None), ("slow", None, 1)):
        keys[name], record = new_key(name, models, rpm)
        records[record.id] = record
    write_keys(tmp_path / "keys.toml", records)
    settings = Settings(api_keys=KEY, config=tmp_path / "models.toml", keys_file=tmp_path / "keys.toml", watch=False,
                        queue_timeout_s=30, engine_start_attempts=1)  # type: ignore[call-arg]
    manifest = parse_manifest(MANIFEST)
    engines = [SyntheticProcessEngine(ModelInfo(m.name, m.repo, "0" * 40, "text-generation", str(tmp_path),
                                                on_demand=m.load == "on-demand"), settings, named=True)
               for m in manifest.models]
    registry = Registry(engines, settings=settings)
    registry.aliases = {a.name: a for a in manifest.aliases}
    with served(create_app(settings, registry)) as url:
        yield Gateway(url, registry, keys["chat-only"], keys["big-only"], keys["slow"])


@pytest.fixture
def gateway(started: Gateway) -> Iterator[Gateway]:
    """The module's gateway with every engine ready and taking requests; fallbacks counted from here."""
    deadline = time.monotonic() + 20
    while not started.registry.ready and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.registry.ready
    started.baseline = started.counted()
    yield started
    for engine in started.registry.engines.values():
        engine.max_in_flight = started.registry.settings.max_concurrent_requests


def _chat(gw: Gateway, model: str = "chat", key: str = KEY, **extra: Any) -> Any:
    return gw.openai(key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], extra_body=extra or None)


def _answered(raw: Any) -> tuple[str, str | None, str | None]:
    return raw.headers["x-hubserve-model"], raw.headers.get("x-hubserve-fallback"), raw.headers.get(
        "x-hubserve-fallback-reason")


def test_the_first_model_answers_when_it_can(gateway: Gateway) -> None:
    raw = _chat(gateway)
    assert raw.parse().model == "big" and raw.headers["x-hubserve-alias"] == "chat"
    assert _answered(raw) == ("big", None, None) and raw.headers["x-hubserve-commit"] == "0" * 40
    assert gateway.fallbacks() == {}


def test_overloaded_falls_back_and_is_counted_and_logged(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    gateway.registry.engines["big"].max_in_flight = 0  # its queue is full: Overloaded (429)
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    raw = _chat(gateway)
    assert time.monotonic() - started < 10  # not the 30 s queue wait: the next model answers at once
    assert raw.parse().model == "small"
    assert _answered(raw) == ("small", "big->small", "overloaded")
    assert gateway.fallbacks() == {("chat", "big", "small", "overloaded"): 1.0}
    rid = raw.headers["x-request-id"]
    deadline = time.monotonic() + 5  # the access line is written once the answer is sent: just after the client has it
    while True:
        lines = {r.name: r.request for r in caplog.records  # type: ignore[attr-defined]
                 if isinstance(getattr(r, "request", None), dict) and r.request.get("request_id") == rid}  # type: ignore[attr-defined]
        if "hubserve.access" in lines or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert lines["hubserve.access"]["model"] == "small" and lines["hubserve.access"]["status"] == 200
    assert lines["hubserve.fallback"] == {"request_id": rid, "alias": "chat", "from_model": "big", "to_model": "small",
                                          "reason": "overloaded", "status": 429}


@pytest.mark.parametrize("refusal", [503, 500, "close"])
def test_a_failed_engine_falls_back(gateway: Gateway, refusal: object) -> None:
    raw = _chat(gateway, refuse={"big": refusal})  # 5xx from the engine; the connection lost unanswered
    assert raw.parse().model == "small" and _answered(raw) == ("small", "big->small", "failed")
    assert gateway.fallbacks() == {("chat", "big", "small", "failed"): 1.0}


def test_context_length_falls_back_and_the_last_models_error_passes_through(gateway: Gateway) -> None:
    raw = _chat(gateway, refuse={"big": "context_length"})
    assert raw.parse().model == "small" and _answered(raw) == ("small", "big->small", "context_length")
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(gateway, refuse={"big": 503, "small": "context_length"})
    assert refused.value.response.headers["x-hubserve-model"] == "small"
    assert refused.value.response.headers["x-hubserve-fallback"] == "big->small"
    assert refused.value.body["message"] == CONTEXT_LENGTH_MESSAGE  # type: ignore[index]  # vLLM's, as is
    assert gateway.fallbacks() == {("chat", "big", "small", "context_length"): 1.0,
                                   ("chat", "big", "small", "failed"): 1.0}


def test_a_reason_not_listed_does_not_fall_back(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        _chat(gateway, model="strict", refuse={"big": 503})  # strict falls back on overloaded only
    assert failed.value.response.headers["x-hubserve-model"] == "big"
    assert "x-hubserve-fallback" not in failed.value.response.headers
    assert gateway.fallbacks() == {}


def test_a_loading_model_starts_loading_and_the_next_answers_at_once(gateway: Gateway) -> None:
    lazy = gateway.registry.served["lazy"]
    assert lazy.engine.state is not EngineState.READY
    raw = _chat(gateway, model="patient")
    assert raw.parse().model == "small" and _answered(raw) == ("small", "lazy->small", "loading")
    deadline = time.monotonic() + 20
    while lazy.engine.state is not EngineState.READY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lazy.engine.state is EngineState.READY  # the load went on
    assert _chat(gateway, model="patient").parse().model == "lazy"


def test_a_stream_falls_back_before_its_first_byte(gateway: Gateway) -> None:
    gateway.registry.engines["big"].max_in_flight = 0
    with gateway.openai().chat.completions.with_streaming_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True) as response:
        assert _answered(response) == ("small", "big->small", "overloaded")
        chunks = list(response.parse())
    assert chunks and {c.model for c in chunks} == {"small"}


def test_no_fallback_once_a_stream_started(gateway: Gateway) -> None:
    seen = []
    with pytest.raises(openai.APIError):  # the engine died after one chunk: one error event ends the stream
        for chunk in gateway.openai().chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4,
                extra_body={"fail_after": 1}):
            seen.append(chunk.model)
    assert seen == ["big"]
    assert gateway.fallbacks() == {}


def test_anthropic_messages_name_the_model_that_answered(gateway: Gateway) -> None:
    gateway.registry.engines["big"].max_in_flight = 0  # Anthropic's 529 overloaded_error from the registry
    client = anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0)
    raw = client.messages.with_raw_response.create(model="chat", max_tokens=8,
                                                   messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().model == "small" and _answered(raw) == ("small", "big->small", "overloaded")
    gateway.registry.engines["big"].max_in_flight = 128
    message = client.messages.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                                     extra_body={"refuse": {"big": "context_length"}})
    assert message.model == "small"


def test_hub_path_names_the_alias_for_inference_client(gateway: Gateway) -> None:
    client = InferenceClient(base_url=f"{gateway.url}/models/chat", api_key=KEY)  # POST /models/chat/v1/chat/...
    out = client.chat_completion([{"role": "user", "content": "hi"}], max_tokens=4,
                                 extra_body={"refuse": {"big": 503}})
    assert out.model == "small"
    assert gateway.fallbacks() == {("chat", "big", "small", "failed"): 1.0}


def test_a_keys_rate_limit_is_no_fallback(gateway: Gateway) -> None:
    assert _chat(gateway, key=gateway.slow).parse().model == "big"
    with pytest.raises(openai.RateLimitError) as limited:
        _chat(gateway, key=gateway.slow)
    assert limited.value.code == "rate_limit_exceeded"
    assert gateway.fallbacks() == {}


def test_models_lists_aliases_with_their_candidates(gateway: Gateway) -> None:
    listed = {m.id: m for m in gateway.openai().models.list()}
    assert {"big", "small", "lazy", "chat", "patient", "strict"} <= set(listed)
    assert listed["chat"].object == "model" and listed["chat"].candidates == ["big", "small"]  # type: ignore[attr-defined]
    card = gateway.openai().models.retrieve("chat")
    assert card.candidates == ["big", "small"]  # type: ignore[attr-defined]
    assert gateway.registry.get("chat").info.name == "big"  # named outside the middleware: its first model


def test_a_key_needs_the_alias_in_its_list_and_sees_no_other_names(gateway: Gateway) -> None:
    # "chat" in its list: the alias's models answer it through the alias, and only through it
    assert _chat(gateway, key=gateway.chat_only).parse().model == "big"
    with pytest.raises(openai.NotFoundError) as direct:
        _chat(gateway, model="big", key=gateway.chat_only)
    assert "big" not in direct.value.message
    assert [m.id for m in gateway.openai(gateway.chat_only).models.list()] == ["chat"]
    # "big" in its list but not "chat": the alias reads like an unknown model, naming nothing
    with pytest.raises(openai.NotFoundError) as hidden:
        _chat(gateway, key=gateway.big_only)
    assert "chat" not in hidden.value.message and "small" not in hidden.value.message
    assert [m.id for m in gateway.openai(gateway.big_only).models.list()] == ["big"]
    with pytest.raises(openai.NotFoundError):
        gateway.openai(gateway.big_only).models.retrieve("chat")


def test_a_stopped_engine_falls_back(gateway: Gateway) -> None:
    big = gateway.registry.engines["big"]
    assert big.pid is not None
    os.kill(big.pid, signal.SIGKILL)  # it dies; the supervisor restarts it a second later
    deadline = time.monotonic() + 10
    while big.state is EngineState.READY and time.monotonic() < deadline:
        time.sleep(0.02)
    raw = _chat(gateway)
    assert raw.parse().model == "small" and _answered(raw) == ("small", "big->small", "failed")


def test_the_watchers_reload_applies_alias_edits(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    models = '[[models]]\nname = "big"\nrepo = "org/big"\n[[models]]\nname = "small"\nrepo = "org/small"\n'
    config.write_text(models + '[[aliases]]\nname = "chat"\nmodels = ["big", "small"]\n')
    settings = Settings(config=config, store=tmp_path / "store", keys_file=tmp_path / "keys.toml")  # type: ignore[call-arg]
    registry = Registry([], settings=settings)
    watcher = ManifestWatcher(settings, registry)

    async def reload() -> dict[str, Any]:
        return await watcher.reload()

    assert asyncio.run(reload())["applied"]
    assert {n: a.models for n, a in registry.aliases.items()} == {"chat": ["big", "small"]}
    config.write_text(models + '[[aliases]]\nname = "chat"\nmodels = ["small"]\nfallback_on = ["loading"]\n'
                      '[[aliases]]\nname = "fast"\nmodels = ["small", "big"]\n')
    assert asyncio.run(reload())["applied"]
    assert {n: (a.models, a.fallback_on) for n, a in registry.aliases.items()} == {
        "chat": (["small"], ["loading"]), "fast": (["small", "big"], list(FALLBACK_REASONS))}
    config.write_text(models + '[[aliases]]\nname = "chat"\nmodels = ["huge"]\n')  # invalid: the last good stays
    outcome = asyncio.run(reload())
    assert not outcome["applied"] and "aliases[0] (chat).models: 'huge' is not a model" in outcome["error"]
    assert set(registry.aliases) == {"chat", "fast"}
