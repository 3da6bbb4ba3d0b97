"""Loading on demand, eviction and idle unload through the real gateway over real engine processes (the synthetic
engine as a supervised child: it starts and stops in milliseconds), on a loopback port."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from server.app import create_app
from server.engines.base import ModelInfo
from server.errors import Overloaded
from server.registry import Registry
from server.settings import Settings
from tests.fixtures.gateway_app import served
from tests.fixtures.sse_engine import SyntheticProcessEngine

pytestmark = pytest.mark.integration

KEY = "ondemand-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
GIB = 1024**3


def _registry(tmp_path: Path, settings: Settings, budget: int | None = None, **infos: dict[str, object]) -> Registry:
    engines = []
    for name, extra in infos.items():
        memory = int(extra.pop("memory", 0))  # type: ignore[call-overload]
        info = ModelInfo(name, f"org/{name}", "0" * 40, "text-generation", str(tmp_path), **extra)  # type: ignore[arg-type]
        engines.append(SyntheticProcessEngine(info, settings, memory))
    return Registry(engines, memory_budget=budget, settings=settings)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "models.toml").write_text("")
    return Settings(api_keys=KEY, config=tmp_path / "models.toml", watch=False, max_loaded_models=1,
                    idle_check_s=0.1, engine_start_attempts=1)  # type: ignore[arg-type]


@pytest.fixture
def two_on_demand(tmp_path: Path, settings: Settings) -> Iterator[tuple[str, Registry]]:
    registry = _registry(tmp_path, settings, a={"on_demand": True, "default": True}, b={"on_demand": True})
    with served(create_app(settings, registry)) as url:
        yield url, registry


def _complete(url: str, model: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", **extra}, headers=AUTH,
                      timeout=60)


def _state(url: str) -> dict[str, str]:
    data = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    return {m["id"]: m["state"] for m in data}


def test_a_request_loads_its_model_and_the_lru_idle_one_makes_room(two_on_demand: tuple[str, Registry]) -> None:
    url, registry = two_on_demand
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200  # nothing loaded, and ready
    assert _state(url) == {"a": "unloaded", "b": "unloaded"}
    answer = _complete(url, "a")
    assert answer.status_code == 200
    assert (answer.headers["x-hubserve-model"], answer.headers["x-hubserve-commit"]) == ("a", "0" * 40)
    assert _state(url) == {"a": "loaded", "b": "unloaded"}
    a_pid = registry.engines["a"].pid
    assert a_pid is not None
    assert _complete(url, "b").status_code == 200
    assert _state(url) == {"a": "unloaded", "b": "loaded"}
    assert not psutil.pid_exists(a_pid)  # unloaded: its process is gone
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["models"]["a"]["unloads"] == 1 and health["models"]["a"]["load"] == "on-demand"


def test_a_model_with_requests_in_flight_is_never_evicted(two_on_demand: tuple[str, Registry]) -> None:
    url, _ = two_on_demand
    assert _complete(url, "a").status_code == 200
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_complete, url, "a", delay=1.5)  # in flight on a while b asks for room
        time.sleep(0.3)
        started = time.monotonic()
        other = pool.submit(_complete, url, "b")
        assert slow.result().status_code == 200
        assert other.result().status_code == 200
    assert time.monotonic() - started >= 1.0  # b waited for a's request to end, then a was unloaded
    assert _state(url) == {"a": "unloaded", "b": "loaded"}


def test_scale_up_timeout_zero_answers_503_in_each_family(two_on_demand: tuple[str, Registry]) -> None:
    url, _ = two_on_demand
    headers = AUTH | {"X-Scale-Up-Timeout": "0"}
    hub = httpx.post(f"{url}/models/org/b", json={"inputs": "x"}, headers=headers, timeout=10)
    assert hub.status_code == 503 and int(hub.headers["Retry-After"]) >= 1
    assert "is loading" in hub.json()["error"] and hub.json()["estimated_time"] > 0
    oa = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x"}, headers=headers, timeout=10)
    assert oa.status_code == 503 and oa.json()["error"]["code"] == "model_loading"
    anthropic = httpx.post(f"{url}/v1/messages", json={"model": "a", "max_tokens": 4, "messages": [
        {"role": "user", "content": "x"}]}, headers=headers | {"anthropic-version": "2023-06-01"}, timeout=10)
    assert anthropic.status_code in (503, 529) and anthropic.json()["type"] == "error"
    assert _complete(url, "a").status_code == 200  # without the header, the request waits for the load


def test_idle_model_is_unloaded(tmp_path: Path, settings: Settings) -> None:
    registry = _registry(tmp_path, settings, a={"idle_unload_s": 0.5})
    with served(create_app(settings, registry)) as url:
        deadline = time.monotonic() + 30
        while registry.engines["a"].pid is None and time.monotonic() < deadline:  # loaded at startup
            time.sleep(0.05)
        pid = registry.engines["a"].pid
        assert pid is not None
        deadline = time.monotonic() + 10
        while _state(url)["a"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _state(url)["a"] == "unloaded" and not psutil.pid_exists(pid)
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
        assert _complete(url, "a").status_code == 200  # loads again on demand
        assert _state(url)["a"] == "loaded"


async def test_the_memory_budget_makes_room_like_the_count(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text("")
    settings = Settings(config=tmp_path / "models.toml", watch=False, engine_start_attempts=1)  # type: ignore[arg-type]
    registry = _registry(tmp_path, settings, budget=3 * GIB, a={"on_demand": True, "memory": 2 * GIB},
                         b={"on_demand": True, "memory": 2 * GIB}, c={"on_demand": True, "memory": GIB})
    try:
        for name in ("a", "c", "b"):
            slot = await registry.admit(name)
            slot.release()
            await asyncio.sleep(0.01)
        loaded = {n for n, s in registry.served.items() if s.loaded}
        assert loaded == {"b", "c"}  # b (2 GiB) needed a's room: a was the least recently used
    finally:
        await registry.stop_all()


def test_requests_for_both_models_at_once_all_succeed(two_on_demand: tuple[str, Registry]) -> None:
    """Room for one, requests for both interleaved: each waits for an unload and a load, none fails (a request
    arriving while its model's engine stops waits and loads it again)."""
    url, _ = two_on_demand
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_complete, url, "ab"[i % 2], delay=0.05 * (i % 3)) for i in range(16)]
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 16


async def test_two_loads_started_together_do_not_wait_for_each_other(tmp_path: Path) -> None:
    """Room for one, both unloaded, a request for each in the same loop turn: one loads and answers, then the other
    evicts it. (Each load once counted the other's pending load as loaded, and both waited for it to go idle until
    the load timeout.)"""
    (tmp_path / "models.toml").write_text("")
    settings = Settings(config=tmp_path / "models.toml", watch=False, engine_start_attempts=1, max_loaded_models=1,
                        load_timeout_s=20)  # type: ignore[arg-type]
    registry = _registry(tmp_path, settings, a={"on_demand": True}, b={"on_demand": True})

    async def answer(name: str) -> str:
        slot = await registry.admit(name)
        slot.release()
        return slot.engine.info.name

    try:
        started = time.monotonic()
        answered = await asyncio.wait_for(asyncio.gather(answer("a"), answer("b")), 15)
        assert sorted(answered) == ["a", "b"] and time.monotonic() - started < 15
        assert sum(s.loaded for s in registry.served.values()) == 1
    finally:
        await registry.stop_all()


async def test_a_pin_moved_on_an_unloaded_model_loads_the_new_commit_next_time(tmp_path: Path) -> None:
    import dataclasses

    from server.desired import Desired

    (tmp_path / "models.toml").write_text("")
    settings = Settings(config=tmp_path / "models.toml", watch=False, engine_start_attempts=1,
                        max_queued_requests=2)  # type: ignore[arg-type]
    registry = _registry(tmp_path, settings, a={"on_demand": True})
    registry._factory = lambda info, s: SyntheticProcessEngine(info, s)  # type: ignore[assignment]
    try:
        old = registry.engines["a"]
        moved = dataclasses.replace(old.info, commit="1" * 40)
        await registry.apply(Desired([moved], {}, {}))
        new = registry.engines["a"]
        assert new is not old and new.info.commit == "1" * 40 and new.pid is None  # nothing started
        waiting = [asyncio.ensure_future(registry.admit("a")) for _ in range(3)]  # a load; 2 may wait for it
        done, _ = await asyncio.wait(waiting, timeout=60, return_when=asyncio.ALL_COMPLETED)
        outcomes = [t.exception() or t.result() for t in done]
        slots = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(slots) == 2 and sum(isinstance(o, Overloaded) for o in outcomes) == 1
        assert slots[0].engine.info.commit == "1" * 40
        for slot in slots:
            slot.release()
    finally:
        await registry.stop_all()
