"""Engines coming and going: start (in waves that fit the memory budget), load on demand, evict, unload when
idle, stop, and the two rollout state machines (blue/green, in place). The registry looks models up and admits
requests; everything that starts or stops an engine process happens here.

Loading on demand: a request for a model that is not loaded calls ``load(served)`` (one load per model, shared by
every request waiting for it). Before it starts, ``_make_room`` unloads the least recently used idle model that
may be unloaded (``load = "on-demand"`` or ``idle_unload_s``; never one with requests in flight or waiting) until
HUBSERVE_MAX_LOADED_MODELS and the memory budget hold the new one. Idle models are unloaded by ``_reaper``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from server.desired import Desired
from server.engines.base import AdapterInfo, Engine, EngineState, ModelInfo, drained
from server.errors import EngineUnavailable, ModelLoading
from server.served import ServedModel
from server.settings import RolloutStrategy

if TYPE_CHECKING:
    from server.registry import Registry

log = logging.getLogger("hubserve.lifecycle")

GIB = 1024**3
ROOM_POLL_S = 0.1
DEFAULT_LOAD_ESTIMATE_S = 60.0  # what a 503 says a first load takes, before one was measured


def same_engine(a: ModelInfo, b: ModelInfo) -> bool:
    """Whether one engine can serve both: they differ at most in the default flag, the load and cache policies."""
    def key(m: ModelInfo) -> ModelInfo:
        return dataclasses.replace(m, default=False, on_demand=False, idle_unload_s=0.0, load_timeout_s=None,
                                   cache=False, cache_ttl_s=600.0)
    return key(a) == key(b)


def start_waves(costs: list[int], budget: int, max_parallel: int = 0) -> list[list[int]]:
    """Group engine indexes into waves started together: each wave fits ``budget`` bytes (a lone engine
    always gets a wave of its own) and has at most ``max_parallel`` engines (0: no limit). Pure."""
    waves: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, cost in enumerate(costs):
        full = max_parallel and len(current) >= max_parallel
        if current and (used + cost > budget or full):
            waves.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        waves.append(current)
    return waves


def eviction_order(candidates: list[ServedModel]) -> list[ServedModel]:
    """Models that may be unloaded now, least recently used first. Pure (reads the models' state)."""
    idle = [s for s in candidates if s.unloadable and s.idle]
    return sorted(idle, key=lambda s: s.engine.last_used)


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Lifecycle:
    """Starts, loads, evicts, swaps and stops the engines of one registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.settings = registry.settings
        self._apply_lock = asyncio.Lock()
        self._retiring: set[Engine] = set()  # old engines draining after a swap or removal
        self._reaper: asyncio.Task[None] | None = None

    @property
    def _served(self) -> dict[str, ServedModel]:
        return self.registry._served

    # ---- boot and shutdown --------------------------------------------------------------------------
    async def start_all(self) -> None:
        """Start every model loaded at startup, in parallel where the memory budget allows; failures are logged,
        not raised (a failed engine answers 503 and shows in /health; the others serve). On-demand models wait
        for their first request."""
        self._start_reaper()
        boot = [s for s in self._served.values() if not s.info.on_demand]
        engines = [s.engine for s in boot]
        for engine in engines:
            engine.shares_cores = len(self._served) > 1
        costs = [e.memory_estimate() for e in engines]
        budget = self.registry.memory_budget if self.registry.memory_budget is not None else sum(costs)
        for wave in start_waves(costs, budget, self.registry.max_parallel):
            log.info("starting engines: %s", ", ".join(engines[i].info.name for i in wave))
            results = await asyncio.gather(*(self._start(boot[i]) for i in wave), return_exceptions=True)
            for i, result in zip(wave, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    log.error("model %s did not start: %s", engines[i].info.name, result, exc_info=result)

    async def stop_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
            self._reaper = None
        for served in self._served.values():
            if served.loading is not None:
                served.loading.cancel()
        engines = [s.engine for s in self._served.values()] + list(self._retiring)
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)

    async def _start(self, served: ServedModel) -> None:
        """Start ``served``'s engine (wake it, when it sleeps) and load its adapters."""
        started = time.monotonic()
        if served.engine.state is EngineState.SLEEPING:
            await served.engine.wake()
        else:
            await served.engine.start()
        served.load_s = time.monotonic() - started
        served.engine.last_used = time.monotonic()  # idle from now, not from before it was unloaded
        await self._set_adapters(served)

    async def _set_adapters(self, served: ServedModel) -> None:
        engine = served.engine
        if not served.adapters and not engine.supports_adapters:
            return
        try:
            await engine.set_adapters(served.adapters)
        except Exception as e:  # the base serves on; the adapters answer 503 with the reason
            log.error("model %s: adapters not loaded: %s", served.info.name, e)
            served.rollout = {**(served.rollout or {}), "adapters_error": str(e)}

    # ---- loading on demand --------------------------------------------------------------------------
    async def wait_loaded(self, served: ServedModel, patience: float) -> None:
        """Load ``served`` (or join the load under way) and wait at most ``patience`` s for it: ModelLoading
        (503 + Retry-After, with the estimated time) when it takes longer; EngineUnavailable if it failed."""
        task = self.load(served)
        served.load_waiters += 1  # not idle while requests wait for it
        try:
            await asyncio.wait_for(asyncio.shield(task), patience)
        except TimeoutError:
            raise self.loading_error(served) from None
        except asyncio.CancelledError:
            if task.cancelled() and not _current_cancelled():
                raise EngineUnavailable(f"Model `{served.info.name}` is unloading; retry later.",
                                        retry_after=self.settings.retry_after_s) from None
            raise
        except Exception:
            raise served.engine.unavailable() from None
        finally:
            served.load_waiters -= 1

    def loading_error(self, served: ServedModel) -> ModelLoading:
        estimate = served.load_s or DEFAULT_LOAD_ESTIMATE_S
        elapsed = time.monotonic() - served.load_started if served.loading is not None else 0.0
        return ModelLoading(served.info.name, max(1.0, estimate - elapsed))

    def load(self, served: ServedModel) -> asyncio.Task[None]:
        """The load of ``served`` under way, or a new one."""
        if served.loading is None:
            task = asyncio.create_task(self._load(served), name=f"load:{served.info.name}")
            served.loading, served.load_started = task, time.monotonic()
            task.add_done_callback(lambda t: self._loaded(served, t))
        return served.loading

    def _loaded(self, served: ServedModel, task: asyncio.Task[None]) -> None:
        if served.loading is task:
            served.loading = None
        served.wake_all()
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: failed to load: %s", served.info.name, task.exception())

    async def _load(self, served: ServedModel) -> None:
        await self._make_room(served)
        served.room_reserved = True  # no await since _make_room's last check: no other load took this room
        log.info("model %s: loading on demand (%s@%s)", served.info.name, served.info.repo, served.info.commit[:12])
        served.engine.shares_cores = len(self._served) > 1
        try:
            await self._start(served)
        finally:
            served.room_reserved = False  # from here the engine's own state says whether it holds room
        log.info("model %s: loaded in %.1f s", served.info.name, served.load_s or 0.0)

    def _over(self, served: ServedModel) -> str | None:
        """Why ``served`` cannot load beside the loaded models now (None: it can)."""
        loaded = [s for s in self._served.values() if s is not served and s.holds_room]
        if not loaded:
            return None  # a lone engine always starts
        limit = self.settings.max_loaded_models
        if limit and len(loaded) + 1 > limit:
            return f"HUBSERVE_MAX_LOADED_MODELS={limit} models are loaded"
        if served.engine.device == "gpu":
            share = sum(s.engine.gpu_memory_share() for s in loaded) + served.engine.gpu_memory_share()
            if share > 1.0:
                return f"the GPU memory is taken by the loaded models ({share:.2f} of it would be needed)"
        budget = self.registry.memory_budget
        if budget is not None:
            asleep = [s for s in self._served.values() if s is not served and s.engine.state is EngineState.SLEEPING]
            used = sum(s.engine.memory_estimate() for s in loaded + asleep)
            need = 0 if served.engine.state is EngineState.SLEEPING else served.engine.memory_estimate()
            if need and used + need > budget:
                return f"the memory budget ({budget / GIB:.1f} GiB) holds {used / GIB:.1f} GiB of loaded models"
        return None

    async def _make_room(self, served: ServedModel) -> None:
        """Unload least recently used idle models until ``served`` fits; wait (bounded by the load timeout) for one
        to become idle when none is."""
        deadline = time.monotonic() + self.load_timeout_s(served.info)
        while (reason := self._over(served)) is not None:
            victims = eviction_order([s for s in self._served.values() if s is not served])
            if victims:
                victim = victims[0]
                log.info("model %s: unloading %s (least recently used) to make room: %s",
                         served.info.name, victim.info.name, reason)
                await self.unload(victim, why=f"room for {served.info.name}")
                continue
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"Model `{served.info.name}` cannot be loaded: {reason}, and none of them is "
                                        "idle and unloadable; retry later.", retry_after=self.settings.retry_after_s)
            await asyncio.sleep(ROOM_POLL_S)

    def load_timeout_s(self, info: ModelInfo) -> float:
        return info.load_timeout_s or self.settings.load_timeout_s

    async def unload(self, served: ServedModel, why: str) -> None:
        """Unload ``served`` (its requests are done: callers pick idle models); it loads again on demand. On GPUs
        it sleeps (vLLM's sleep mode) when host memory holds its weights beside the rest; else it stops."""
        engine = served.engine
        started = time.monotonic()
        how = "stopped"
        served.unloading = True  # requests arriving meanwhile wait, then load it again
        try:
            if engine.can_sleep and self._host_holds(served):
                try:
                    await engine.sleep()
                    how = "asleep"
                except Exception as e:
                    log.warning("model %s: sleep failed (%s); stopping it", served.info.name, e)
                    await engine.stop()
            else:
                await engine.stop()
        finally:
            served.unloading = False
            served.wake_all()
        served.unloads += 1
        log.info("model %s: unloaded, %s (%s) in %.1f s", served.info.name, how, why, time.monotonic() - started)

    def _host_holds(self, served: ServedModel) -> bool:
        """Whether host memory holds ``served``'s weights asleep beside every other engine's host memory."""
        budget = self.registry.memory_budget
        if budget is None:
            return True
        others = sum(s.engine.memory_estimate() for s in self._served.values() if s is not served
                     and s.engine.state is not EngineState.STOPPED)
        return others + served.engine.memory_estimate() + served.info.weights_bytes <= budget

    def _start_reaper(self) -> None:
        if self._reaper is None:  # models with idle_unload_s may come with any reload: it always runs
            self._reaper = asyncio.create_task(self._reap_idle(), name="idle-unload")

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idle_check_s)
            now = time.monotonic()
            for served in list(self._served.values()):
                limit = served.info.idle_unload_s
                if limit > 0 and served.idle and now - served.engine.last_used >= limit:
                    with contextlib.suppress(Exception):
                        await self.unload(served, why=f"idle for {limit:g} s")

    # ---- rollout ------------------------------------------------------------------------------------
    async def apply(self, desired: Desired) -> None:
        """Bring the served models to ``desired``: start new ones, drain and stop removed ones, swap changed
        revisions (concurrently per model), load, move and drop adapters. One apply at a time."""
        registry = self.registry
        async with self._apply_lock:
            registry.waiting, registry.pending = dict(desired.waiting), dict(desired.pending)
            wanted = {m.name: m for m in desired.models}
            jobs = []
            for name in [n for n in self._served if n not in wanted]:
                jobs.append(self._remove(name))
            for info in desired.models:
                adapters = desired.adapters.get(info.name, [])
                served = self._served.get(info.name)
                if served is None:
                    jobs.append(self._add(info, adapters))
                elif same_engine(served.info, info):
                    served.engine.info = info  # only the default flag or the load policy may differ
                    served.failed = None
                    if adapters != served.adapters:
                        served.adapters = adapters
                        if served.engine.state is not EngineState.STOPPED:
                            jobs.append(self._set_adapters(served))
                elif served.failed is not None and same_engine(served.failed, info):
                    continue  # failed before; retried when the pin changes again or on an explicit reload
                elif not served.loaded:  # not loaded: the next load starts the new revision
                    served.engine = registry.new_engine(info)
                    served.attach(served.engine)
                    served.adapters = adapters
                    served.rollout = {"state": "pinned", "commit": info.commit}
                    log.info("model %s: pinned to %s; loads on its next request", info.name, info.commit[:12])
                else:
                    served.adapters = adapters
                    jobs.append(self._swap(served, info))
            registry.reorder([m.name for m in desired.models])
            if jobs:
                await asyncio.gather(*jobs)

    def forget_failures(self) -> None:
        """Let the next apply retry revisions that failed to start (SIGHUP, POST /admin/reload)."""
        for served in self._served.values():
            served.failed = None

    async def _add(self, info: ModelInfo, adapters: list[AdapterInfo]) -> None:
        engine = self.registry.new_engine(info)
        served = self._served[info.name] = ServedModel(engine, adapters)
        if info.on_demand:
            log.info("model %s: added (%s@%s); loads on its first request", info.name, info.repo, info.commit[:12])
            return
        engine.shares_cores = len(self._served) > 1
        log.info("model %s: added (%s@%s); starting", info.name, info.repo, info.commit[:12])
        started = time.monotonic()
        try:
            await self._start(served)
        except Exception as e:
            served.failed = info
            served.rollout = {"state": "failed", "commit": info.commit, "error": str(e)}
            log.error("model %s: failed to start: %s", info.name, e)
            return
        served.rollout = {"state": "added", "commit": info.commit, "start_s": round(time.monotonic() - started, 2)}
        log.info("model %s: serving %s", info.name, info.commit[:12])

    async def _remove(self, name: str) -> None:
        served = self._served.pop(name)
        served.wake_all()  # waiters learn the model is gone
        if served.loading is not None:
            served.loading.cancel()
        log.info("model %s: removed from the manifest; draining %d request(s)", name, served.engine.in_flight)
        await self._drain_and_stop(served.engine)
        log.info("model %s: unloaded", name)

    async def _drain_and_stop(self, engine: Engine) -> None:
        self._retiring.add(engine)  # cancelled half-way (shutdown), stop_all still stops it
        if not await drained(engine, self.settings.drain_timeout_s):
            log.warning("model %s: %d request(s) still in flight after %.0f s; stopping the engine",
                        engine.info.name, engine.in_flight, self.settings.drain_timeout_s)
        await engine.stop()
        self._retiring.discard(engine)

    def _fits_beside(self, new: Engine) -> bool:
        """Whether the new revision's engine fits in memory beside every running engine (blue/green)."""
        strategy = self.settings.rollout
        if strategy is RolloutStrategy.BLUE_GREEN:
            return True
        if strategy is RolloutStrategy.IN_PLACE:
            return False
        running = [s.engine for s in self._served.values() if s.loaded]
        if new.device == "gpu":  # vLLM takes a fixed share of the GPU's memory at start
            return sum(e.gpu_memory_share() for e in running) + new.gpu_memory_share() <= 1.0
        need = new.memory_estimate()
        if self.settings.memory_budget_gib:
            return sum(e.memory_estimate() for e in running) + need <= self.settings.memory_budget_gib * GIB
        free = available_memory()
        return free is None or need <= free

    async def _swap(self, served: ServedModel, info: ModelInfo) -> None:
        if served.loading is not None:  # a load under way finishes first (then this swap replaces it)
            with contextlib.suppress(Exception):
                await asyncio.shield(served.loading)
        old = served.engine
        new = self.registry.new_engine(info)  # not started yet: an object, no process
        mode = "blue-green" if self._fits_beside(new) else "in-place"
        log.info("model %s: rolling out %s -> %s (%s)", info.name, old.info.commit[:12], info.commit[:12], mode)
        served.rollout = {"state": "starting", "mode": mode, "from": old.info.commit, "commit": info.commit}
        if mode == "blue-green":
            await self._swap_blue_green(served, info, new)
        else:
            await self._swap_in_place(served, info, new)

    async def _start_new(self, served: ServedModel, new: Engine) -> None:
        await new.start()
        if served.adapters or new.supports_adapters:
            await new.set_adapters(served.adapters)

    async def _swap_blue_green(self, served: ServedModel, info: ModelInfo, new: Engine) -> None:
        old = served.engine
        started = time.monotonic()
        # On CPU both engines share the cores, and vLLM's CPU worker busy-polls after every request: an old
        # engine under steady traffic can starve the new one's start for many minutes. The old one keeps
        # serving, at a lower priority, until the new one is ready (then it drains and stops).
        on_cpu = new.device != "gpu"
        new.shares_cores = True
        niceness = old.lower_priority(self.settings.rollout_nice) if on_cpu else None
        try:
            await self._start_new(served, new)
        except Exception as e:
            await new.stop()
            if niceness is not None:
                old.restore_priority(niceness)
            self._failed(served, info, e)
            return
        ready = time.monotonic()
        served.attach(new)
        served.engine = new  # from here on new requests are admitted on the new revision
        served.failed = None
        served.wake_all()
        switch = time.monotonic() - ready
        log.info("model %s: swapped %s -> %s (engine start %.1f s, switch %.3f s); draining %d request(s)",
                 info.name, old.info.commit[:12], info.commit[:12], ready - started, switch, old.in_flight)
        served.rollout = {
            "state": "swapped", "mode": "blue-green", "from": old.info.commit, "commit": info.commit,
            "start_s": round(ready - started, 2), "switch_s": round(switch, 4),
        }
        await self._drain_and_stop(old)
        log.info("model %s: previous revision %s drained and stopped", info.name, old.info.commit[:12])

    async def _swap_in_place(self, served: ServedModel, info: ModelInfo, new: Engine) -> None:
        old = served.engine
        served.held = True  # new requests wait in the gateway from here
        try:
            served.rollout = {**(served.rollout or {}), "state": "draining"}
            drain_started = time.monotonic()
            await self._drain_and_stop(old)
            new.shares_cores = len(self._served) > 1
            started = time.monotonic()
            served.rollout = {**served.rollout, "state": "starting"}
            try:
                await self._start_new(served, new)
            except Exception as e:
                await new.stop()
                self._failed(served, info, e)
                log.info("model %s: restarting the previous revision %s", info.name, old.info.commit[:12])
                with contextlib.suppress(Exception):
                    await old.start()
                return
            ready = time.monotonic()
            served.attach(new)
            served.engine = new
            served.failed = None
            served.held = False
            served.wake_all()  # the requests held meanwhile go to the new engine
            served.rollout = {
                "state": "swapped", "mode": "in-place", "from": old.info.commit, "commit": info.commit,
                "drain_s": round(started - drain_started, 2), "start_s": round(ready - started, 2),
                "switch_s": round(time.monotonic() - ready, 4),
            }
            log.info("model %s: swapped %s -> %s in place (drain %.1f s, engine start %.1f s)",
                     info.name, old.info.commit[:12], info.commit[:12], started - drain_started, ready - started)
        finally:
            served.held = False
            served.wake_all()

    def _failed(self, served: ServedModel, info: ModelInfo, error: Exception) -> None:
        served.failed = info
        served.rollout = {
            "state": "failed", "from": served.engine.info.commit, "commit": info.commit, "error": str(error),
        }
        log.error("model %s: revision %s failed to start; %s keeps serving: %s",
                  info.name, info.commit[:12], served.engine.info.commit[:12], error)


def _current_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
