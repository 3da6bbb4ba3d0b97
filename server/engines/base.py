"""The engine interface: what routes and serving code may rely on. No heavy imports here."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import httpx


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"  # died; being restarted with backoff
    FAILED = "failed"  # gave up (or could not start at all)
    STOPPED = "stopped"


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


class Engine(ABC):
    """One loaded model revision behind an OpenAI-compatible HTTP API (vLLM's, over a private socket).

    Serving code talks to it only through ``client()`` (an ``httpx.AsyncClient`` whose base URL is the
    engine's root, e.g. ``POST /v1/completions``), so a route never imports vLLM.
    """

    info: ModelInfo

    @property
    @abstractmethod
    def state(self) -> EngineState: ...

    @property
    def max_model_len(self) -> int | None:
        return None

    @abstractmethod
    async def start(self) -> None:
        """Start the engine and return once it is ready (raise EngineStartError if it cannot)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the engine and every process it started."""

    @abstractmethod
    def client(self) -> httpx.AsyncClient:
        """A shared client bound to the engine's private socket; raises EngineUnavailable if not ready."""

    @abstractmethod
    async def check_health(self) -> bool: ...
