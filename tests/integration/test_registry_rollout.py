"""The registry's rollout and admission rules, in process, with engines whose start the test controls.

Real engines (vLLM) run these paths in tests/e2e/test_rollout*.py; here each rule is pinned down exactly:
which engine a request is admitted on around a swap, when the old engine stops, what waits and what is 429.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from server.desired import Desired
from server.engines.base import EngineState, ModelInfo
from server.errors import EngineStartError, ModelNotFound, Overloaded
from server.registry import Registry
from server.settings import Settings
from tests.fixtures.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.integration

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


class GatedEngine(ScriptedEngine):
    """A scripted engine whose start waits for the test (``release_start``) and can be made to fail."""

    def __init__(self, info: ModelInfo, fail: bool = False) -> None:
        super().__init__(info, lambda _r: httpx.Response(200, json={}))
        self._state_now = EngineState.STOPPED
        self.may_start = asyncio.Event()
        self.fail = fail
        self.stopped = False

    @property
    def state(self) -> EngineState:
        return self._state_now

    async def start(self) -> None:
        self._state_now = EngineState.STARTING
        await self.may_start.wait()
        if self.fail:
            self._state_now = EngineState.FAILED
            raise EngineStartError(f"model '{self.info.name}': engine exited with code 1 while starting: bad weights")
        self._state_now = EngineState.READY

    async def stop(self) -> None:
        self.stopped = True
        self._state_now = EngineState.STOPPED


def info(commit: str, name: str = "m") -> ModelInfo:
    return ModelInfo(name=name, repo="org/m", commit=commit, task="text-generation", snapshot="/nonexistent")


class Factory:
    """Makes GatedEngines and remembers them; ``fail`` names commits whose engine will not start."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.made: list[GatedEngine] = []
        self.fail = fail

    def __call__(self, model: ModelInfo, settings: Settings) -> GatedEngine:
        engine = GatedEngine(model, fail=model.commit in self.fail)
        engine.max_in_flight = settings.max_concurrent_requests
        self.made.append(engine)
        return engine


async def ready_registry(factory: Factory, **settings: object) -> tuple[Registry, GatedEngine]:
    s = Settings.model_validate(settings)
    registry = Registry.from_models([info(COMMIT_A)], s, factory)
    old = factory.made[0]
    old.may_start.set()
    await registry.start_all()
    assert old.state is EngineState.READY
    return registry, old


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_blue_green_requests_in_flight_finish_on_the_old_engine() -> None:
    factory = Factory()
    registry, old = await ready_registry(factory, rollout="blue-green")
    before = await registry.admit("m")
    assert before.engine is old
    swap = asyncio.create_task(registry.apply([info(COMMIT_B)]))
    await wait_until(lambda: len(factory.made) == 2)
    new = factory.made[1]
    assert new.shares_cores and not old.shares_cores  # it starts beside the old one: no thread pinning
    during = await registry.admit("m")  # the new engine is not ready yet: the old one still serves
    assert during.engine is old and registry.get("m").info.commit == COMMIT_A
    new.may_start.set()
    await wait_until(lambda: registry.get("m") is new)
    after = await registry.admit("m")
    assert after.engine is new
    await asyncio.sleep(0.2)
    assert not old.stopped, "the old engine stopped with requests in flight"
    before.release()
    during.release()
    await asyncio.wait_for(swap, 5)
    assert old.stopped and not new.stopped
    rollout = registry.served["m"].rollout
    assert rollout is not None and rollout["state"] == "swapped" and rollout["mode"] == "blue-green"
    after.release()


async def test_in_place_holds_new_requests_until_the_new_engine_serves() -> None:
    factory = Factory()
    registry, old = await ready_registry(factory, rollout="in-place", swap_wait_timeout_s=10)
    in_flight = await registry.admit("m")
    swap = asyncio.create_task(registry.apply([info(COMMIT_B)]))
    await wait_until(lambda: registry.served["m"].held)
    waiting = asyncio.create_task(registry.admit("m"))
    await asyncio.sleep(0.2)
    assert not waiting.done() and not old.stopped  # held while the old engine drains
    in_flight.release()
    await wait_until(lambda: old.stopped and len(factory.made) == 2)
    assert not waiting.done()  # still held while the new engine starts
    assert registry.served["m"].describe()["state"] == "swapping"
    factory.made[1].may_start.set()
    slot = await asyncio.wait_for(waiting, 5)
    assert slot.engine is factory.made[1] and slot.engine.info.commit == COMMIT_B
    await asyncio.wait_for(swap, 5)
    slot.release()


async def test_in_place_queue_is_bounded_then_429() -> None:
    factory = Factory()
    registry, _ = await ready_registry(factory, rollout="in-place", max_queued_requests=2, swap_wait_timeout_s=10)
    swap = asyncio.create_task(registry.apply([info(COMMIT_B)]))
    await wait_until(lambda: len(factory.made) == 2)
    waiters = [asyncio.create_task(registry.admit("m")) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(Overloaded) as refused:
        await registry.admit("m")
    assert refused.value.retry_after == 5 and "swapping" in str(refused.value)
    factory.made[1].may_start.set()
    for slot in await asyncio.gather(*waiters):
        slot.release()
    await swap


async def test_in_place_wait_times_out_with_429() -> None:
    factory = Factory()
    registry, _ = await ready_registry(factory, rollout="in-place", swap_wait_timeout_s=0.2)
    swap = asyncio.create_task(registry.apply([info(COMMIT_B)]))
    await wait_until(lambda: len(factory.made) == 2)
    with pytest.raises(Overloaded):
        await registry.admit("m")
    factory.made[1].may_start.set()
    await swap


@pytest.mark.parametrize("rollout", ["blue-green", "in-place"])
async def test_a_revision_that_fails_to_start_leaves_the_old_one_serving(rollout: str) -> None:
    factory = Factory(fail=(COMMIT_B,))
    registry, old = await ready_registry(factory, rollout=rollout)
    swap = asyncio.create_task(registry.apply([info(COMMIT_B)]))
    await wait_until(lambda: len(factory.made) == 2)
    factory.made[1].may_start.set()
    await asyncio.wait_for(swap, 5)
    slot = await registry.admit("m")
    assert slot.engine is old and old.state is EngineState.READY
    slot.release()
    rollout_state = registry.served["m"].rollout
    assert rollout_state is not None and rollout_state["state"] == "failed"
    assert "bad weights" in rollout_state["error"] and rollout_state["commit"] == COMMIT_B
    await registry.apply([info(COMMIT_B)])  # the same failed revision is not retried on every reload
    assert len(factory.made) == 2
    registry.forget_failures()  # SIGHUP / POST /admin/reload
    retry = asyncio.create_task(registry.apply([info(COMMIT_B)]))
    await wait_until(lambda: len(factory.made) == 3)
    factory.made[2].may_start.set()
    await asyncio.wait_for(retry, 5)
    assert registry.get("m") is old


async def test_removed_model_drains_then_stops_and_answers_404() -> None:
    factory = Factory()
    registry, old = await ready_registry(factory)
    slot = await registry.admit("m")
    removal = asyncio.create_task(registry.apply(Desired([], {}, {})))
    await asyncio.sleep(0.1)
    with pytest.raises(ModelNotFound):
        await registry.admit("m")
    assert not old.stopped
    slot.release()
    await asyncio.wait_for(removal, 5)
    assert old.stopped and registry.names() == []


async def test_default_flag_change_needs_no_new_engine() -> None:
    factory = Factory()
    registry, old = await ready_registry(factory)
    await registry.apply([dataclasses.replace(info(COMMIT_A), default=True)])
    assert len(factory.made) == 1 and registry.get(None) is old


async def test_at_the_in_flight_limit_a_request_waits_for_a_slot_when_allowed() -> None:
    factory = Factory()
    registry, old = await ready_registry(factory, max_concurrent_requests=1, queue_timeout_s=5)
    first = await registry.admit("m")
    second = asyncio.create_task(registry.admit("m"))
    await asyncio.sleep(0.1)
    assert not second.done()
    first.release()
    slot = await asyncio.wait_for(second, 5)
    assert slot.engine is old and old.in_flight == 1
    slot.release()
    registry.settings = Settings.model_validate({"max_concurrent_requests": 1, "queue_timeout_s": 0})
    held = await registry.admit("m")
    with pytest.raises(Overloaded):
        await registry.admit("m")
    held.release()
