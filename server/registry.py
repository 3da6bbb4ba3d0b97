"""Served name / repo id → engine. Loads the manifest's verified revisions and starts their engines.

API (what serving code uses)::

    registry.get(name_or_repo)   # Engine; None or "" → the default model; ModelNotFound lists served names
    registry.default()           # Engine of the default model (manifest `default = true`, or the only one)
    registry.engines             # dict: served name → Engine, in manifest order
    registry.names()             # served names, in manifest order
    registry.ready               # every engine READY
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from server.engines.base import Engine, EngineState, ModelInfo
from server.errors import InvalidRequest, ModelNotFound, ModelNotVerified
from server.settings import Settings
from sync.lock import pinned_commit, read_lock
from sync.manifest import Config
from sync.store import Store

log = logging.getLogger("hubserve.registry")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
GIB = 1024**3


def resolve_models(config: Config) -> list[ModelInfo]:
    """The verified revision of every model of the manifest; ModelNotVerified names the first one missing."""
    store = Store(config.store_path)
    lock = read_lock(config.lock_path)
    default = config.manifest.default_model()
    models = []
    for spec in config.manifest.models:
        commit = pinned_commit(lock, spec.name, spec.repo, spec.revision)
        if commit is None:
            raise ModelNotVerified(
                f"model '{spec.name}' ({spec.repo}@{spec.revision}) is not pinned in {config.lock_path.name}; "
                "run `hubserve sync`"
            )
        record = store.get_revision(spec.repo, commit)
        if record is None:
            raise ModelNotVerified(
                f"model '{spec.name}' ({spec.repo}@{commit[:12]}) is not verified in the store {store.root}; "
                "run `hubserve sync`"
            )
        models.append(
            ModelInfo(
                name=spec.name,
                repo=spec.repo,
                commit=commit,
                task=spec.task,
                snapshot=str(store.snapshot_dir(spec.repo, commit)),
                engine_args=dict(spec.engine),
                trust_remote_code=spec.trust_remote_code,
                default=default is not None and default.name == spec.name,
                weights_bytes=sum(f.size for f in record.files if f.path.endswith(WEIGHT_SUFFIXES)),
            )
        )
    return models


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


class Registry:
    """The engines of one server, by served name, with lookup by repo id and a default model."""

    def __init__(self, engines: Iterable[Engine], memory_budget: int | None = None, max_parallel: int = 0) -> None:
        self.engines: dict[str, Engine] = {}
        for engine in engines:
            if engine.info.name in self.engines:
                raise ValueError(f"two engines serve the name {engine.info.name!r}")
            self.engines[engine.info.name] = engine
        self._by_repo: dict[str, Engine] = {}
        for engine in self.engines.values():  # a repo served twice resolves to its default, else the first
            if engine.info.repo not in self._by_repo or engine.info.default:
                self._by_repo[engine.info.repo] = engine
        self.memory_budget = memory_budget
        self.max_parallel = max_parallel

    @classmethod
    def from_models(
        cls, models: list[ModelInfo], settings: Settings, factory: Callable[[ModelInfo, Settings], Engine] | None = None
    ) -> Registry:
        if factory is None:
            from server.engines.vllm import VLLMEngine

            factory = VLLMEngine
        engines = [factory(m, settings) for m in models]
        max_parallel = settings.max_parallel_starts
        if not max_parallel and any(getattr(e, "device", None) == "gpu" for e in engines):
            max_parallel = 1  # vLLM sizes its KV cache from free GPU memory at start: concurrent starts race
        return cls(engines, memory_budget=_available_memory(), max_parallel=max_parallel)

    # ---- lookup -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.engines)

    def get(self, name_or_repo: str | None) -> Engine:
        """The engine serving ``name_or_repo`` (served name first, then repo id); None → ``default()``."""
        if not name_or_repo:
            return self.default()
        engine = self.engines.get(name_or_repo) or self._by_repo.get(name_or_repo)
        if engine is None:
            raise ModelNotFound(name_or_repo, self.names())
        return engine

    def default(self) -> Engine:
        for engine in self.engines.values():
            if engine.info.default:
                return engine
        if len(self.engines) == 1:
            return next(iter(self.engines.values()))
        raise InvalidRequest(
            f"This server serves several models and none is the default; name one of: {', '.join(self.names())}.",
            param="model",
        )

    @property
    def ready(self) -> bool:
        return bool(self.engines) and all(e.state is EngineState.READY for e in self.engines.values())

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start_all(self) -> None:
        """Start every engine, in parallel where the memory budget allows; failures are logged, not raised
        (a failed engine answers 503 and shows in /health; the others serve)."""
        engines = list(self.engines.values())
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
        await asyncio.gather(*(e.stop() for e in self.engines.values()), return_exceptions=True)


def engine_memory_estimate(engine: Engine) -> int:
    """Host memory an engine needs while it starts: weights (fp32 on CPU may double bf16), KV cache, runtime."""
    estimate = getattr(engine, "memory_estimate", None)
    if callable(estimate):
        return int(estimate())
    return engine.info.weights_bytes * 2 + 2 * GIB


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
