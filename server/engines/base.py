"""The engine interface: what routes and serving code may rely on. No heavy imports here.

Serving code uses an engine like this::

    engine = registry.get(body.get("model"))        # ModelNotFound → 404 in the family's shape
    with engine.admit():                             # EngineUnavailable → 503, Overloaded → 429 (Retry-After)
        resp = await engine.client().post("/v1/completions", json=...)

For a streamed answer, hold the admission until the stream ends: ``slot = engine.admit(); ... slot.release()``
in the generator's ``finally`` (``Admission`` is idempotent).
"""

from __future__ import annotations

import asyncio
import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from server.errors import EngineUnavailable, Overloaded

GIB = 1024**3
DRAIN_POLL_S = 0.05


class EngineState(enum.StrEnum):
    STOPPED = "stopped"  # not started yet, or stopped on shutdown
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"  # died; being restarted with backoff
    FAILED = "failed"  # gave up (or could not start at all)
    SLEEPING = "sleeping"  # unloaded from the GPU by vLLM's sleep mode; its process waits for a wake-up


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway knows about one served model revision."""

    name: str  # served name (OpenAI `model`)
    repo: str  # Hub repo id
    commit: str  # pinned 40-hex commit
    task: str  # Hub pipeline tag, e.g. text-generation, feature-extraction
    snapshot: str  # path of the verified snapshot in the store
    engine_args: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    default: bool = False
    weights_bytes: int = 0  # size of the weight files in the store (for the memory budget)
    backend: str = "auto"  # models.toml `backend`: auto | vllm | transformers (engines/select.py decides auto)
    timeout_s: float | None = None  # models.toml `timeout_s` (None: the default of the task's kind)
    on_demand: bool = False  # models.toml `load = "on-demand"`: loaded by its first request, evicted first
    idle_unload_s: float = 0.0  # unloaded after this many idle seconds (0: never)
    load_timeout_s: float | None = None  # longest a request waits for it to load (None: HUBSERVE_LOAD_TIMEOUT_S)
    max_lora_rank: int = 0  # the engine starts with LoRA enabled up to this rank (0: no adapters, LoRA off)
    cache: bool = False  # models.toml `cache`: deterministic answers are cached (server/ops/replay.py)
    cache_ttl_s: float = 600.0  # models.toml `cache_ttl_s`

    @property
    def served_names(self) -> tuple[str, ...]:
        """Names the engine answers to: the served name and the repo id."""
        return (self.name,) if self.name == self.repo else (self.name, self.repo)


@dataclass(frozen=True)
class AdapterInfo:
    """One LoRA adapter revision served on a base model's engine."""

    name: str  # served name (OpenAI `model`, TGI `adapter_id`)
    repo: str  # Hub repo id of the adapter
    commit: str
    snapshot: str  # the adapter's verified snapshot in the store (what the engine loads)
    base: str  # served name of the base model
    rank: int

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.name,) if self.name == self.repo else (self.name, self.repo)

    @property
    def engine_name(self) -> str:
        """The adapter's name inside the engine: one per commit, so a moved adapter loads beside the old one and
        each request runs on the revision it was admitted to."""
        return f"{self.name}@{self.commit[:12]}"


class Admission:
    """One admitted request: holds a slot of ``engine``'s in-flight limit until released.

    ``engine`` is the engine the request must use: after a revision swap it may differ from the one a route
    looked up before it was admitted. ``inner``: the slot an adapter's admission holds on its base engine.
    """

    def __init__(self, engine: Engine, inner: Admission | None = None) -> None:
        self.engine = engine
        self.inner = inner
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.engine._in_flight -= 1
            self.engine.last_used = time.monotonic()
            if self.inner is not None:
                self.inner.release()
            if self.engine.on_release is not None:
                self.engine.on_release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class Engine(ABC):
    """One loaded model revision behind an OpenAI-compatible HTTP API (vLLM's, over a private socket).

    Serving code talks to it only through ``client()`` (an ``httpx.AsyncClient`` whose base URL is the
    engine's root, e.g. ``POST /v1/completions``), so a route never imports vLLM.
    """

    backend = "none"  # which engine implementation serves the model (shown in /health and /v1/models)
    device = "cpu"  # "gpu" when it runs on GPUs (its start then takes a share of their memory)
    # Set by the registry before start when other engines run on the same CPU cores (several models, or a
    # blue/green swap): the engine must not pin its threads to the cores it would take on an idle machine.
    shares_cores = False
    supports_adapters = False  # whether set_adapters can load LoRA adapters into the running engine

    def __init__(self, info: ModelInfo, max_in_flight: int = 128, retry_after_s: float = 5.0) -> None:
        self.info = info
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self._in_flight = 0
        self.on_release: Callable[[], None] | None = None  # the registry wakes requests waiting for a slot
        self.restarts = 0
        self.last_error: str | None = None
        self.ready_since: float | None = None
        self.last_used = time.monotonic()  # when a request last ended (or the engine was made): LRU eviction

    # ---- what implementations provide ---------------------------------------------------------------
    @property
    @abstractmethod
    def state(self) -> EngineState: ...

    @property
    def max_model_len(self) -> int | None:
        """Context length the engine serves (prompt + generated tokens), once known."""
        return None

    @property
    def pid(self) -> int | None:
        """Process id of the engine's main process, if it runs in one."""
        return None

    @property
    def uds(self) -> Path | None:
        """The private Unix socket of a ready engine's HTTP API, when it has one (the relay's fast path)."""
        return None

    @abstractmethod
    async def start(self) -> None:
        """Start the engine, keep it supervised, and return once it is ready (EngineStartError if it cannot)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the engine and every process it started."""

    @abstractmethod
    def client(self) -> httpx.AsyncClient:
        """A shared client bound to the engine's private socket; raises EngineUnavailable if not ready."""

    @abstractmethod
    async def check_health(self) -> bool: ...

    @property
    def model_id(self) -> str:
        """The model name requests to the engine carry (an adapter's differs from its served name)."""
        return self.info.name

    def accepts_model(self, name: str | None) -> bool:
        """Whether a body naming ``name`` as its model reaches this engine as is (else ``model_id`` replaces it)."""
        return name in self.info.served_names

    def memory_estimate(self) -> int:
        """Host memory the engine needs while it starts and runs (the registry's memory budget)."""
        return self.info.weights_bytes * 2 + 2 * GIB

    def gpu_memory_share(self) -> float:
        """The fraction of each of its GPUs' memory the engine takes (0 on CPU)."""
        return 0.0

    @property
    def can_sleep(self) -> bool:
        """Whether ``sleep()`` can unload the model from its device with the process kept (vLLM's sleep mode)."""
        return False

    async def sleep(self) -> None:
        """Free the device memory, keeping the weights in host memory (state SLEEPING)."""
        raise NotImplementedError

    async def wake(self) -> None:
        """Undo ``sleep()`` (state READY)."""
        raise NotImplementedError

    async def set_adapters(self, adapters: list[AdapterInfo]) -> None:
        """Serve exactly these LoRA adapters (loaded into the running engine, no restart)."""
        if adapters:
            raise NotImplementedError(f"the {self.backend} engine serves no LoRA adapters")

    def adapter(self, name: str) -> Engine | None:
        """The engine view that serves the adapter ``name`` (a served name or repo id) now, if loaded."""
        return None

    def lower_priority(self, niceness: int) -> int | None:
        """Make the engine's processes ``niceness`` nicer; the niceness before, or None if nothing changed."""
        return None

    def restore_priority(self, niceness: int) -> None:
        """Undo ``lower_priority`` (may need CAP_SYS_NICE: raising priority back is privileged)."""
        return None

    # ---- shared behaviour ---------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    def unavailable(self) -> EngineUnavailable:
        detail = f": {self.last_error}" if self.state is EngineState.FAILED and self.last_error else ""
        return EngineUnavailable(
            f"Model `{self.info.name}` is {self.state.value}{detail}; retry later.", retry_after=self.retry_after_s
        )

    def admit(self) -> Admission:
        """Take one in-flight slot: EngineUnavailable unless ready, Overloaded when the limit is reached."""
        if self.state is not EngineState.READY:
            raise self.unavailable()
        if self._in_flight >= self.max_in_flight:
            raise Overloaded(
                f"Model `{self.info.name}` has {self._in_flight} requests in flight (limit {self.max_in_flight}); "
                "retry later.",
                retry_after=self.retry_after_s,
            )
        self._in_flight += 1
        return Admission(self)

    def describe(self) -> dict[str, Any]:
        """The model's entry in /health."""
        return {
            "state": self.state.value,
            "repo": self.info.repo,
            "commit": self.info.commit,
            "task": self.info.task,
            "backend": self.backend,
            "default": self.info.default,
            "pid": self.pid,
            "in_flight": self._in_flight,
            "max_in_flight": self.max_in_flight,
            "max_model_len": self.max_model_len,
            "restarts": self.restarts,
            "ready_for_s": round(time.monotonic() - self.ready_since, 1) if self.ready_since else None,
            "last_error": self.last_error,
        }


async def drained(engine: Engine, timeout_s: float) -> bool:
    """Wait until ``engine`` has no request in flight, at most ``timeout_s``; whether it got there."""
    deadline = time.monotonic() + timeout_s
    while engine.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    return engine.in_flight == 0
