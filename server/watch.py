"""How a running server learns what to serve: models.toml, models.lock and the store's revision records.

The daemon (or `hubserve sync`, or `hubserve rollback`) writes the store and then the lock; the server only
reads them. A reload re-reads all three and hands the result to ``Registry.apply``, which starts, swaps or
stops engines. Reloads are triggered by a file event on models.toml or models.lock (watchfiles), by SIGHUP,
by ``POST /admin/reload``, and every ``reload_poll_s`` seconds as a fallback (a store on a network volume
may send no events). Triggers coalesce: one reload runs at a time and a burst of events makes one more.
An invalid models.toml is logged once, and the last good configuration stays in force.

A models.toml is read only once it has been unchanged for a moment, and an empty one is not applied while models
are served (sync/manifest.py: ``unsettled_s``, ``emptied``): one truncated and then written in place is never
read half-way as a manifest with fewer models, or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from server.desired import desired_models
from server.registry import Registry
from server.settings import Settings
from sync.errors import HubserveError
from sync.manifest import SETTLE_MAX_S, emptied, find_config, load_config, unsettled_s

log = logging.getLogger("hubserve.watch")


class ManifestWatcher:
    """Keeps a registry in step with the manifest, the lock and the store."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.config_path = find_config(settings.config)
        self._trigger = asyncio.Event()
        self._last_error: str | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def watched_names(self) -> set[str]:
        return {self.config_path.name, self.config_path.with_suffix(".lock").name}

    def trigger(self, retry_failed: bool = False) -> None:
        if retry_failed:
            self.registry.forget_failures()
        self._trigger.set()

    async def reload(self, retry_failed: bool = False) -> dict[str, Any]:
        """Re-read the manifest, lock and store and apply them; the outcome in a few words."""
        if retry_failed:
            self.registry.forget_failures()
        await settled(self.config_path)
        try:
            if (half_written := emptied(self.config_path, bool(self.registry.names()))) is not None:
                raise half_written
            config = load_config(self.config_path, self.settings.store)
        except HubserveError as e:
            message = str(e)
            if message != self._last_error:  # once per distinct error, not once per poll
                log.error("models.toml not applied, the last good configuration stays in force: %s", message)
                self._last_error = message
            return {"applied": False, "error": message}
        if self._last_error is not None:
            log.info("%s is valid again; applying it", self.config_path.name)
            self._last_error = None
        keep = {name: engine.info for name, engine in self.registry.engines.items()}
        keep_adapters = {a.name: a for _, a in self.registry.adapters()}
        # reads the lock, the store's records and adapters' safetensors headers: off the event loop
        desired = await asyncio.to_thread(desired_models, config, keep, keep_adapters)
        await self.registry.apply(desired)
        return {"applied": True, "waiting": desired.waiting, "pending": desired.pending}

    # ---- background tasks ---------------------------------------------------------------------------
    def start(self) -> None:
        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one INFO line per event otherwise
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, self.trigger, True)
        self._tasks = [
            asyncio.create_task(self._reloader(), name="reloader"),
            asyncio.create_task(self._poll(), name="reload-poll"),
            asyncio.create_task(self._watch_files(), name="watch-files"),
        ]

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _reloader(self) -> None:
        while True:
            await self._trigger.wait()
            self._trigger.clear()
            try:
                await self.reload()
            except Exception:  # a bug here must not stop future reloads
                log.exception("reload failed")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            self._trigger.set()

    async def _watch_files(self) -> None:
        from watchfiles import awatch

        names = self.watched_names

        def relevant(_change: object, path: str) -> bool:
            return Path(path).name in names

        directory = self.config_path.parent
        async for _changes in awatch(directory, watch_filter=relevant, recursive=False, debounce=200, step=50):
            log.debug("%s changed", ", ".join(sorted(names)))
            self._trigger.set()



async def settled(path: Path) -> None:
    """Return once ``path`` has been unchanged for a moment (at most SETTLE_MAX_S from now)."""
    deadline = asyncio.get_running_loop().time() + SETTLE_MAX_S
    while (wait := unsettled_s(path)) > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(wait)
