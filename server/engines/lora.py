"""The LoRA adapters loaded into one running vLLM engine, changed at runtime without restarting it.

vLLM (started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``) loads an adapter with
``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and drops it with ``/v1/unload_lora_adapter``. Each
adapter revision gets its own engine name (``name@commit``), so a moved adapter is loaded beside the old one,
new requests go to the new one at once, and the old one is unloaded once its last request is done: every request
runs on one revision from start to end, and vLLM's prefix cache (keyed on name and path) never mixes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx

from server.engines.adapter import AdapterEngine
from server.engines.base import AdapterInfo, Engine, drained
from server.errors import EngineStartError

log = logging.getLogger("hubserve.lora")



class AdapterSet:
    """The adapters of ``base``: what is loaded now, by served name and repo id."""

    def __init__(self, base: Engine, drain_timeout_s: float) -> None:
        self.base = base
        self.drain_timeout_s = drain_timeout_s
        self.current: dict[str, AdapterEngine] = {}  # served name → the view requests are admitted to
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._live: httpx.AsyncClient | None = None  # the running process's client, once it loaded the adapters

    def lookup(self, name: str) -> AdapterEngine | None:
        view = self.current.get(name)
        if view is None:
            view = next((v for v in self.current.values() if name in v.adapter_info.served_names), None)
        return view

    async def load_all(self, client: httpx.AsyncClient) -> None:
        """After the engine (re)started, before it takes requests: load every current adapter (a new process
        knows none). Under the lock, so an ``apply`` meanwhile either comes first or loads through ``client``."""
        async with self._lock:
            self._live = None
            for view in list(self.current.values()):
                try:
                    await _load(client, view.adapter_info)
                    view.unloaded = False  # it may have failed to load into the engine's previous process
                except EngineStartError as e:  # the base serves on; the adapter answers 503 with the reason
                    log.error("model %s: %s", self.base.info.name, e)
                    view.unloaded = True
                    view.last_error = str(e)
            self._live = client

    async def apply(self, wanted: list[AdapterInfo]) -> None:
        """Serve exactly ``wanted``: new and moved adapters are loaded first, then requests switch to them; an
        old revision is unloaded in the background once its requests are done."""
        async with self._lock:
            by_name = {a.name: a for a in wanted}
            for adapter in wanted:
                view = self.current.get(adapter.name)
                if view is not None and view.adapter_info == adapter:
                    continue
                started = time.monotonic()
                live = self._live
                if live is not None and not live.is_closed:  # a stopped engine loads them when it starts
                    try:
                        await _load(live, adapter)
                    except EngineStartError:
                        if self.base.uds is not None:
                            raise  # the running engine refused it
                        # the engine died meanwhile: its restart loads the adapter (load_all)
                self.current[adapter.name] = AdapterEngine(self.base, adapter)
                log.info("model %s: adapter %s %s %s in %.2f s", self.base.info.name, adapter.name,
                         "moved to" if view else "loaded at", adapter.commit[:12], time.monotonic() - started)
                if view is not None:
                    self._retire(view)
            for name in [n for n in self.current if n not in by_name]:
                self._retire(self.current.pop(name))
                log.info("model %s: adapter %s removed", self.base.info.name, name)

    def _retire(self, view: AdapterEngine) -> None:
        task = asyncio.create_task(self._unload_when_idle(view), name=f"unload-adapter:{view.adapter_info.engine_name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _unload_when_idle(self, view: AdapterEngine) -> None:
        await drained(view, self.drain_timeout_s)
        view.unloaded = True
        live = self._live
        if live is None or live.is_closed:
            return
        with contextlib.suppress(httpx.HTTPError):
            await live.post("/v1/unload_lora_adapter", json={"lora_name": view.adapter_info.engine_name},
                            timeout=30.0)

    async def close(self) -> None:
        """The engine stopped: nothing is loaded any more (a start loads the current adapters again)."""
        self._live = None
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _load(client: httpx.AsyncClient, adapter: AdapterInfo) -> None:
    body = {"lora_name": adapter.engine_name, "lora_path": adapter.snapshot}
    try:
        response = await client.post("/v1/load_lora_adapter", json=body, timeout=300.0)
    except httpx.HTTPError as e:
        raise EngineStartError(f"adapter {adapter.name!r}: the engine did not answer the load ({e})") from e
    if response.status_code == 400 and "already been loaded" in response.text:
        return  # loaded by an earlier attempt
    if response.status_code >= 400:
        raise EngineStartError(f"adapter {adapter.name!r} ({adapter.repo}@{adapter.commit[:12]}): the engine "
                               f"refused it: {response.text[:500]}")
