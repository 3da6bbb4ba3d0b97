"""Dynamic batching: concurrent requests' items are collected for a short window and run as one batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741


class Batcher(Generic[I, O]):
    """Runs ``run(items, key)`` on batches of at most ``max_batch`` items with the same ``key``.

    A batch starts once ``window_s`` has passed since the first waiting item arrived (so concurrent requests
    join it), or at once when ``max_batch`` items wait; items that arrive while a batch runs form the next one.
    ``run`` is blocking (a model forward) and runs on ``executor``, one batch at a time. An exception it returns in
    place of an item's output fails that item's request alone; one it raises fails the batch.
    """

    def __init__(self, run: Callable[[list[I], Hashable], list[O]], max_batch: int, window_s: float,
                 executor: Executor | None = None) -> None:
        self._run = run
        self.max_batch = max(1, max_batch)
        self.window_s = window_s
        self._executor = executor
        self._pending: list[tuple[I, Hashable, asyncio.Future[O]]] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._first_at = 0.0  # when the oldest waiting item arrived (loop time)
        self.batches = 0  # batches run (for tests and /info)
        self.items = 0

    async def submit(self, items: Sequence[I], key: Hashable = None) -> list[O]:
        """The outputs for ``items``, in order (batched with other requests' items)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="batcher")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[O]] = [loop.create_future() for _ in items]
        if not self._pending:
            self._first_at = loop.time()
        self._pending.extend((item, key, f) for item, f in zip(items, futures, strict=True))
        self._arrived.set()
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            # the window counts from the first waiting item: items that waited through the last batch run at once
            remaining = self._first_at + self.window_s - loop.time()
            if len(self._pending) < self.max_batch and remaining > 0:
                await asyncio.sleep(remaining)
            key = self._pending[0][1]
            batch = [p for p in self._pending if p[1] == key][: self.max_batch]
            taken = {id(p) for p in batch}
            self._pending = [p for p in self._pending if id(p) not in taken]
            if not self._pending:
                self._arrived.clear()
            else:
                self._first_at = loop.time()  # the rest (another key, or past max_batch) waits from now
            live = [p for p in batch if not p[2].done()]  # a cancelled request's items are skipped
            if not live:
                continue
            try:
                outputs: list[Any] = await loop.run_in_executor(self._executor, self._run, [p[0] for p in live], key)
            except Exception as e:  # one bad batch fails its requests, not the worker
                for _, _, future in live:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.items += len(live)
            for (_, _, future), output in zip(live, outputs, strict=True):
                if future.done():
                    continue
                if isinstance(output, BaseException):  # ``run`` may fail one item without failing its batch
                    future.set_exception(output)
                else:
                    future.set_result(output)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
