"""One served name as the registry and the lifecycle share it: its engine now, the requests waiting for it, its
adapters, and what its last rollout or load did."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from server.engines.base import AdapterInfo, Engine, EngineState, ModelInfo

UNLOADED = (EngineState.STOPPED, EngineState.SLEEPING)  # takes no device memory; loads again on demand


class ServedModel:
    """One served name: the engine answering it now, requests waiting for a slot, and its last rollout."""

    def __init__(self, engine: Engine, adapters: list[AdapterInfo] | None = None) -> None:
        self.engine = engine
        self.held = False  # an in-place swap is under way: new requests wait
        self.rollout: dict[str, Any] | None = None  # the last rollout: state, commits, error, timings
        self.failed: ModelInfo | None = None  # a revision that failed to start (not retried until it changes)
        self.adapters: list[AdapterInfo] = list(adapters or [])  # what should be loaded into the engine
        self.loading: asyncio.Task[None] | None = None  # a load in progress (on demand)
        self.load_started = 0.0  # when that load began (monotonic)
        self.load_s: float | None = None  # how long the last load took (the estimate a 503 gives)
        self.unloads = 0
        self.load_waiters = 0  # requests waiting for a load to finish
        self.unloading = False  # its engine is being stopped (or put to sleep): new requests wait
        self.room_reserved = False  # its load made room and is starting it: it counts against the limits
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.attach(engine)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def loaded(self) -> bool:
        """Its engine runs (or is starting): it takes memory and counts against HUBSERVE_MAX_LOADED_MODELS."""
        return self.engine.state not in UNLOADED or self.loading is not None

    @property
    def holds_room(self) -> bool:
        """Whether it takes a place under HUBSERVE_MAX_LOADED_MODELS and the memory budget now: its engine runs, or
        its load has made room. A load still waiting for room holds none, so two loads that start together each
        wait for a model that is really there, never for each other."""
        return self.engine.state not in UNLOADED or self.room_reserved

    @property
    def unloadable(self) -> bool:
        """Whether it may be unloaded to make room: loaded on demand or set to unload when idle."""
        return self.info.on_demand or self.info.idle_unload_s > 0

    @property
    def idle(self) -> bool:
        return (self.engine.state is EngineState.READY and self.engine.in_flight == 0 and self.queued == 0
                and self.load_waiters == 0 and not self.held and self.loading is None and not self.unloading)

    @property
    def load_state(self) -> str:
        """loaded | loading | unloaded (what /v1/models says of an on-demand model)."""
        if self.loading is not None or self.engine.state is EngineState.STARTING:
            return "loading"
        return "unloaded" if self.engine.state in UNLOADED else "loaded"

    def attach(self, engine: Engine) -> None:
        engine.on_release = self.wake_one

    def wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def wait(self, timeout: float) -> bool:
        """Wait until woken (a slot freed, a swap finished) or ``timeout``; False on timeout."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def describe(self) -> dict[str, Any]:
        out = self.engine.describe()
        out["queued"] = self.queued
        if self.held:
            out["state"] = "swapping"
        elif self.loading is not None:
            out["state"] = "loading"
        if self.unloadable:
            out["load"] = "on-demand" if self.info.on_demand else "startup"
            out["idle_unload_s"] = self.info.idle_unload_s
            out["unloads"] = self.unloads
        if self.rollout is not None:
            out["rollout"] = self.rollout
        return out
