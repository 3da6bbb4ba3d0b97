"""Served name / repo id → engine; admission of requests; revision rollout (blue/green or in place).

API (what serving code uses)::

    engine = registry.get(name_or_repo)   # Engine now serving it; None or "" → the default model
    slot = await registry.admit(engine)   # waits (bounded) through an in-place swap, then takes a slot:
    slot.engine.client()...               #   use slot.engine: after a swap it is the new revision's engine
    slot.release()                        # (or ``with slot:``)
    registry.engines                      # dict: served name → Engine, in manifest order
    registry.ready                        # every model of the manifest is served by a ready engine

Rollout: ``await registry.apply(desired)`` brings the served set to ``desired`` (a list of ModelInfo): new
models start, removed ones drain and stop, a changed revision is swapped. Blue/green when memory holds both
engines (the new one starts beside the old, new requests go to it once ready, the old drains, then stops);
otherwise in place (new requests wait in the gateway, bounded, while the old drains and the new starts).
A new revision that fails to start leaves the old one serving; the failure shows in /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from server.engines.base import Admission, Engine, EngineState, ModelInfo
from server.errors import EngineUnavailable, InvalidRequest, ModelNotFound, ModelNotVerified, Overloaded
from server.ops.auth import authorize
from server.ops.context import bound_time, note_queue
from server.settings import RolloutStrategy, Settings
from server.tasks.catalog import task_timeout_s
from sync.lock import pinned_commit, read_lock
from sync.manifest import Config
from sync.store import Store

log = logging.getLogger("hubserve.registry")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
GIB = 1024**3
DRAIN_POLL_S = 0.05
DEFAULT_TASK = "text-generation"  # a model with no `task` whose repo has no pipeline_tag

EngineFactory = Callable[[ModelInfo, Settings], Engine]


@dataclasses.dataclass(frozen=True)
class Desired:
    """What the manifest, the lock and the store say should be served now."""

    models: list[ModelInfo]
    waiting: dict[str, str]  # served name → why it cannot be served yet (not pinned / not verified)
    pending: dict[str, str]  # served name → why its new pin is not served yet (the old revision serves)


def desired_models(config: Config, keep: dict[str, ModelInfo] | None = None) -> Desired:
    """Every model of the manifest whose pinned revision is verified in the store.

    A model whose new pin is not verified yet keeps its ``keep`` (currently served) revision: a revision
    reaches the server only once the store has it whole.
    """
    store = Store(config.store_path)
    lock = read_lock(config.lock_path)
    default = config.manifest.default_model()
    keep = keep or {}
    models: list[ModelInfo] = []
    waiting: dict[str, str] = {}
    pending: dict[str, str] = {}
    for spec in config.manifest.models:
        commit = pinned_commit(lock, spec.name, spec.repo, spec.revision)
        record = store.get_revision(spec.repo, commit) if commit else None
        if commit is None or record is None:
            reason = (
                f"model '{spec.name}' ({spec.repo}@{spec.revision}) is not pinned in {config.lock_path.name}; "
                "run `hubserve sync`"
                if commit is None
                else f"model '{spec.name}' ({spec.repo}@{commit[:12]}) is not verified in the store {store.root}; "
                "run `hubserve sync`"
            )
            current = keep.get(spec.name)
            if current is not None and current.repo == spec.repo:
                models.append(current)
                pending[spec.name] = reason
            else:
                waiting[spec.name] = reason
            continue
        models.append(
            ModelInfo(
                name=spec.name,
                repo=spec.repo,
                commit=commit,
                task=spec.task or record.pipeline_tag or DEFAULT_TASK,
                snapshot=str(store.snapshot_dir(spec.repo, commit)),
                engine_args=dict(spec.engine),
                trust_remote_code=spec.trust_remote_code,
                default=default is not None and default.name == spec.name,
                weights_bytes=sum(f.size for f in record.files if f.path.endswith(WEIGHT_SUFFIXES)),
                backend=spec.backend,
                timeout_s=spec.timeout_s,
            )
        )
    return Desired(models, waiting, pending)


def resolve_models(config: Config) -> list[ModelInfo]:
    """The verified revision of every model of the manifest; ModelNotVerified names the first one missing."""
    desired = desired_models(config)
    if desired.waiting:
        raise ModelNotVerified(next(iter(desired.waiting.values())))
    return desired.models


def same_engine(a: ModelInfo, b: ModelInfo) -> bool:
    """Whether one engine can serve both: they differ at most in the default flag."""
    return dataclasses.replace(a, default=False) == dataclasses.replace(b, default=False)


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


class ServedModel:
    """One served name: the engine answering it now, requests waiting for a slot, and its last rollout."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.held = False  # an in-place swap is under way: new requests wait
        self.rollout: dict[str, Any] | None = None  # the last rollout: state, commits, error, timings
        self.failed: ModelInfo | None = None  # a revision that failed to start (not retried until it changes)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.attach(engine)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

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
        if self.rollout is not None:
            out["rollout"] = self.rollout
        return out


class Registry:
    """The engines of one server, by served name, with lookup by repo id and a default model."""

    def __init__(
        self,
        engines: Iterable[Engine],
        memory_budget: int | None = None,
        max_parallel: int = 0,
        settings: Settings | None = None,
        factory: EngineFactory | None = None,
    ) -> None:
        self._served: dict[str, ServedModel] = {}
        for engine in engines:
            if engine.info.name in self._served:
                raise ValueError(f"two engines serve the name {engine.info.name!r}")
            self._served[engine.info.name] = ServedModel(engine)
        self.memory_budget = memory_budget
        self.max_parallel = max_parallel
        self.settings = settings or Settings()
        self._factory = factory
        self.waiting: dict[str, str] = {}  # manifest models not servable yet, with the reason
        self.pending: dict[str, str] = {}  # served models whose new pin is not verified yet
        self._apply_lock = asyncio.Lock()
        self._retiring: set[Engine] = set()  # old engines draining after a swap or removal

    @classmethod
    def from_models(
        cls, models: list[ModelInfo], settings: Settings, factory: EngineFactory | None = None
    ) -> Registry:
        if factory is None:
            from server.engines.select import make_engine

            factory = make_engine
        engines = [factory(m, settings) for m in models]
        max_parallel = settings.max_parallel_starts
        if not max_parallel and any(getattr(e, "device", None) == "gpu" for e in engines):
            max_parallel = 1  # vLLM sizes its KV cache from free GPU memory at start: concurrent starts race
        budget = int(settings.memory_budget_gib * GIB) if settings.memory_budget_gib else _available_memory()
        return cls(engines, memory_budget=budget, max_parallel=max_parallel, settings=settings, factory=factory)

    # ---- lookup -------------------------------------------------------------------------------------
    @property
    def engines(self) -> dict[str, Engine]:
        """Served name → the engine serving it now, in manifest order."""
        return {name: served.engine for name, served in self._served.items()}

    @property
    def served(self) -> dict[str, ServedModel]:
        return dict(self._served)

    def names(self) -> list[str]:
        return list(self._served)

    def _lookup(self, name_or_repo: str | None) -> ServedModel:
        if not name_or_repo:
            return self._served[self.default().info.name]
        if name_or_repo in self.waiting and name_or_repo not in self._served:
            raise EngineUnavailable(
                f"Model `{name_or_repo}` is not loaded yet: {self.waiting[name_or_repo]}; retry later.",
                retry_after=self.settings.retry_after_s,
            )
        served = self._served.get(name_or_repo)
        if served is None:  # a repo served twice resolves to its default, else the first
            by_repo = [s for s in self._served.values() if s.info.repo == name_or_repo]
            served = next((s for s in by_repo if s.info.default), by_repo[0] if by_repo else None)
        if served is None:
            raise ModelNotFound(name_or_repo, self.names())
        authorize(served.info)  # the request's key may use this model (403 otherwise); every family comes here
        bound_time(self.timeout_s(served.info))  # the model's time limit replaces the server's
        return served

    def timeout_s(self, info: ModelInfo) -> float:
        """How long one request to ``info`` may take: its ``timeout_s``, else its task kind's default."""
        return info.timeout_s or task_timeout_s(info.task, self.settings.request_timeout_s)

    def get(self, name_or_repo: str | None) -> Engine:
        """The engine serving ``name_or_repo`` (served name first, then repo id); None → ``default()``."""
        return self._lookup(name_or_repo).engine

    def default(self) -> Engine:
        for served in self._served.values():
            if served.info.default:
                authorize(served.info)
                return served.engine
        if len(self._served) == 1:
            return self._lookup(next(iter(self._served))).engine
        raise InvalidRequest(
            f"This server serves several models and none is the default; name one of: {', '.join(self.names())}.",
            param="model",
        )

    @property
    def ready(self) -> bool:
        return (
            bool(self._served)
            and not self.waiting
            and all(s.held or s.engine.state is EngineState.READY for s in self._served.values())
        )

    # ---- admission ----------------------------------------------------------------------------------
    async def admit(self, engine_or_name: Engine | str | None) -> Admission:
        """A slot on the engine serving that model now.

        During an in-place swap the request waits (at most ``swap_wait_timeout_s``, with at most
        ``max_queued_requests`` waiting); at the in-flight limit it waits ``queue_timeout_s`` (0: not at all).
        Then Overloaded (429). An engine that is down answers EngineUnavailable (503) at once.
        """
        name = engine_or_name.info.name if isinstance(engine_or_name, Engine) else engine_or_name
        served = self._lookup(name)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        entered = loop.time()
        while True:
            engine = served.engine
            if not served.held:
                if engine.state is not EngineState.READY:
                    raise engine.unavailable()
                if engine.in_flight < engine.max_in_flight:
                    note_queue(loop.time() - entered)  # for the request's log line and the queue histogram
                    return engine.admit()
            patience = self.settings.swap_wait_timeout_s if served.held else self.settings.queue_timeout_s
            if deadline is None:
                deadline = loop.time() + patience
            remaining = deadline - loop.time()
            if remaining <= 0 or served.queued >= self.settings.max_queued_requests:
                raise Overloaded(
                    f"Model `{engine.info.name}` "
                    + ("is swapping to a new revision" if served.held else f"has {engine.in_flight} requests in flight")
                    + f" and {served.queued} waiting; retry later.",
                    retry_after=engine.retry_after_s,
                )
            await served.wait(remaining)
            if served is not self._served.get(served.info.name):  # removed while we waited
                raise ModelNotFound(served.info.name, self.names())

    @contextlib.asynccontextmanager
    async def using(self, engine_or_name: Engine | str | None) -> AsyncIterator[Engine]:
        """``async with registry.using(engine) as engine:`` admits a request and releases its slot at the end."""
        slot = await self.admit(engine_or_name)
        try:
            yield slot.engine
        finally:
            slot.release()

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start_all(self) -> None:
        """Start every engine, in parallel where the memory budget allows; failures are logged, not raised
        (a failed engine answers 503 and shows in /health; the others serve)."""
        engines = [s.engine for s in self._served.values()]
        await self._start_engines(engines)

    async def _start_engines(self, engines: list[Engine]) -> None:
        for engine in engines:
            engine.shares_cores = len(self._served) > 1
        costs = [engine_memory_estimate(e) for e in engines]
        budget = self.memory_budget if self.memory_budget is not None else sum(costs)
        for wave in start_waves(costs, budget, self.max_parallel):
            names = ", ".join(engines[i].info.name for i in wave)
            log.info("starting engines: %s", names)
            results = await asyncio.gather(*(engines[i].start() for i in wave), return_exceptions=True)
            for i, result in zip(wave, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    log.error("model %s did not start: %s", engines[i].info.name, result)

    async def stop_all(self) -> None:
        engines = [s.engine for s in self._served.values()] + list(self._retiring)
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)

    # ---- rollout ------------------------------------------------------------------------------------
    async def apply(self, desired: Desired | list[ModelInfo]) -> None:
        """Bring the served models to ``desired``: start new ones, drain and stop removed ones, swap changed
        revisions (concurrently per model). One apply at a time."""
        if not isinstance(desired, Desired):
            desired = Desired(desired, {}, {})
        async with self._apply_lock:
            self.waiting, self.pending = dict(desired.waiting), dict(desired.pending)
            wanted = {m.name: m for m in desired.models}
            jobs = []
            for name in [n for n in self._served if n not in wanted]:
                jobs.append(self._remove(name))
            for info in desired.models:
                served = self._served.get(info.name)
                if served is None:
                    jobs.append(self._add(info))
                elif same_engine(served.info, info):
                    served.engine.info = info  # only the default flag may differ
                    served.failed = None
                elif served.failed is not None and same_engine(served.failed, info):
                    continue  # failed before; retried when the pin changes again or on an explicit reload
                else:
                    jobs.append(self._swap(served, info))
            self._reorder([m.name for m in desired.models])
            if jobs:
                await asyncio.gather(*jobs)

    def forget_failures(self) -> None:
        """Let the next apply retry revisions that failed to start (SIGHUP, POST /admin/reload)."""
        for served in self._served.values():
            served.failed = None

    def _reorder(self, order: list[str]) -> None:
        rank = {name: i for i, name in enumerate(order)}
        self._served = dict(sorted(self._served.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    def _new_engine(self, info: ModelInfo) -> Engine:
        if self._factory is None:
            from server.engines.select import make_engine

            self._factory = make_engine
        return self._factory(info, self.settings)

    async def _add(self, info: ModelInfo) -> None:
        engine = self._new_engine(info)
        served = self._served[info.name] = ServedModel(engine)
        engine.shares_cores = len(self._served) > 1
        log.info("model %s: added (%s@%s); starting", info.name, info.repo, info.commit[:12])
        started = time.monotonic()
        try:
            await engine.start()
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
        log.info("model %s: removed from the manifest; draining %d request(s)", name, served.engine.in_flight)
        await self._drain_and_stop(served.engine)
        log.info("model %s: unloaded", name)

    async def _drain_and_stop(self, engine: Engine) -> None:
        self._retiring.add(engine)  # cancelled half-way (shutdown), stop_all still stops it
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while engine.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if engine.in_flight > 0:
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
        if getattr(new, "device", None) == "gpu":  # vLLM takes a fixed share of the GPU's memory at start
            used_share = sum(gpu_memory_share(s.engine) for s in self._served.values())
            return used_share + gpu_memory_share(new) <= 1.0
        need = engine_memory_estimate(new)
        if self.settings.memory_budget_gib:
            used = sum(engine_memory_estimate(s.engine) for s in self._served.values())
            return used + need <= self.settings.memory_budget_gib * GIB
        free = _available_memory()
        return free is None or need <= free

    async def _swap(self, served: ServedModel, info: ModelInfo) -> None:
        old = served.engine
        new = self._new_engine(info)  # not started yet: an object, no process
        mode = "blue-green" if self._fits_beside(new) else "in-place"
        log.info("model %s: rolling out %s -> %s (%s)", info.name, old.info.commit[:12], info.commit[:12], mode)
        served.rollout = {"state": "starting", "mode": mode, "from": old.info.commit, "commit": info.commit}
        if mode == "blue-green":
            await self._swap_blue_green(served, info, new)
        else:
            await self._swap_in_place(served, info, new)

    async def _swap_blue_green(self, served: ServedModel, info: ModelInfo, new: Engine) -> None:
        old = served.engine
        started = time.monotonic()
        # On CPU both engines share the cores, and vLLM's CPU worker busy-polls after every request: an old
        # engine under steady traffic can starve the new one's start for many minutes. The old one keeps
        # serving, at a lower priority, until the new one is ready (then it drains and stops).
        on_cpu = getattr(new, "device", "cpu") != "gpu"
        new.shares_cores = True
        niceness = old.lower_priority(self.settings.rollout_nice) if on_cpu else None
        try:
            await new.start()
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
                await new.start()
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


def engine_memory_estimate(engine: Engine) -> int:
    """Host memory an engine needs while it starts: weights (fp32 on CPU may double bf16), KV cache, runtime."""
    estimate = getattr(engine, "memory_estimate", None)
    if callable(estimate):
        return int(estimate())
    return engine.info.weights_bytes * 2 + 2 * GIB


def gpu_memory_share(engine: Engine) -> float:
    """The fraction of each of its GPUs' memory a GPU engine takes (vLLM's gpu_memory_utilization)."""
    if getattr(engine, "device", None) != "gpu":
        return 0.0
    return float(engine.info.engine_args.get("gpu_memory_utilization", 0.9))


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
