"""A LoRA adapter as serving code sees it: an Engine whose process, socket and in-flight slots are its base's.

``registry.get("smollm2-poet")`` returns one of these; routes use it like any engine (``info`` names the
adapter, ``model_id`` is the name the base engine knows it by), and an admission holds one slot of the base
engine plus one of the adapter's own count, so an adapter's old revision is unloaded only once its requests are
done.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx

from server.engines.base import AdapterInfo, Admission, Engine, EngineState


class AdapterEngine(Engine):
    """One adapter revision loaded into ``base`` (a running engine that serves LoRA)."""

    def __init__(self, base: Engine, adapter: AdapterInfo) -> None:
        info = dataclasses.replace(base.info, name=adapter.name, repo=adapter.repo, commit=adapter.commit,
                                   default=False, on_demand=False, idle_unload_s=0.0)
        super().__init__(info, base.max_in_flight, base.retry_after_s)
        self.base = base
        self.adapter_info = adapter
        self.backend = base.backend
        self.device = base.device
        self.unloaded = False  # set once the base engine dropped this revision

    @property
    def model_id(self) -> str:
        return self.adapter_info.engine_name

    def accepts_model(self, name: str | None) -> bool:
        return name == self.model_id

    @property
    def state(self) -> EngineState:
        return EngineState.STOPPED if self.unloaded else self.base.state

    @property
    def max_model_len(self) -> int | None:
        return self.base.max_model_len

    @property
    def pid(self) -> int | None:
        return self.base.pid

    @property
    def uds(self) -> Path | None:
        return self.base.uds

    def client(self) -> httpx.AsyncClient:
        return self.base.client()

    async def check_health(self) -> bool:
        return await self.base.check_health()

    async def start(self) -> None:  # the base engine loads it
        return None

    async def stop(self) -> None:
        return None

    def memory_estimate(self) -> int:
        return 0

    def admit(self) -> Admission:
        if self.unloaded:
            raise self.unavailable()
        inner = self.base.admit()  # the base's state and in-flight limit apply
        self._in_flight += 1
        return Admission(self, inner)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out |= {"base": self.adapter_info.base, "adapter": True}
        return out
