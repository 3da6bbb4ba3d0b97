"""A key's token budgets (per UTC day, per UTC calendar month) and its cap on requests in flight, in the shared
state (server/state/), so several gateways on one store enforce one budget and one cap.

Budgets are fixed calendar windows (what a budget means to whoever pays it; Retry-After is the time to the UTC
reset). Like tokens per minute (ratelimit.py), a request reserves ``min(budget, reserve)`` tokens at admission
and settles to what it used at its end; a request is admitted while the window's used + reserved tokens are
under the budget, so the one that crosses it finishes and the next is refused. The reservation is in the store
from admission on: a gateway killed mid-request leaves it charged (the safe side), never lost.

Requests in flight: each gateway counts its own requests per key (one field per gateway in a hash) and renews a
heartbeat (a sorted set of gateways by last beat) while it holds any; the in-flight count of a key is the sum
over gateways whose heartbeat is younger than the lease. A killed gateway stops beating, so its slots come back
one lease later. Admission is increment-then-check, never over-admitting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable

from server.errors import BudgetExceeded, TooManyConcurrent
from server.ops.context import Principal
from server.state.base import StateStore

log = logging.getLogger("hubserve.budgets")

GRACE_S = 86400.0  # a window's counter outlives its end this long, for requests that end after it
GATEWAYS = "cc:gateways"  # gateway id -> time of its last heartbeat
FORGET_S = 7 * 86400.0  # gateways silent this long are dropped from the heartbeat set


def day_window(now: dt.datetime) -> tuple[str, dt.datetime]:
    """(label, end) of the UTC day holding ``now``. Pure."""
    start = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start.date().isoformat(), start + dt.timedelta(days=1)


def month_window(now: dt.datetime) -> tuple[str, dt.datetime]:
    """(label, end) of the UTC calendar month holding ``now``. Pure."""
    start = now.astimezone(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m"), end


@dataclasses.dataclass
class Reserved:
    key: str
    tokens: int
    end: float  # epoch seconds: the window's end


class Budgets:
    """``admit`` raises BudgetExceeded (429, Retry-After to the reset) for a key whose day's or month's used and
    reserved tokens reached its budget; else it reserves tokens in both. ``settle`` charges what was used."""

    def __init__(self, reserve: int, clock: Callable[[], float] = time.time) -> None:
        self.reserve = reserve
        self._clock = clock

    async def admit(self, store: StateStore, who: Principal) -> list[Reserved]:
        now = self._clock()
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        limits = (("daily", who.daily_tokens, day_window), ("monthly", who.monthly_tokens, month_window))
        windows = [(what, limit, *window(when)) for what, limit, window in limits if limit is not None]
        taken = [Reserved(f"budget:{who.name}:{label}", min(limit, self.reserve), end.timestamp())
                 for _, limit, label, end in windows]
        values = await asyncio.gather(*(store.incr(r.key, r.tokens, ttl_s=r.end - now + GRACE_S) for r in taken))
        for (what, limit, _, end), r, value in zip(windows, taken, values, strict=True):
            if value - r.tokens >= limit:
                await self.settle(store, taken, 0)
                raise BudgetExceeded(
                    f"Key `{who.name}` is over its {what} budget of {limit} tokens ({what}_tokens); it resets at "
                    f"{end.isoformat()} (UTC).", code=f"{what}_tokens_exceeded", retry_after=end.timestamp() - now)
        return taken

    async def settle(self, store: StateStore, taken: list[Reserved], tokens: int) -> None:
        """Replace each reservation with ``tokens`` (while the window's counter lives)."""
        now = self._clock()
        await asyncio.gather(*(store.incr(r.key, tokens - r.tokens) for r in taken
                               if tokens != r.tokens and now < r.end + GRACE_S))
        taken.clear()


class Slots:
    """Requests in flight per key over every gateway on the store (see the module's docstring)."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.time) -> None:
        self.lease_s = lease_s
        self.gateway = uuid.uuid4().hex
        self._clock = clock
        self._held: collections.Counter[str] = collections.Counter()
        self._beat: asyncio.Task[None] | None = None
        self._store: StateStore | None = None

    async def take(self, store: StateStore, who: Principal) -> bool:
        """Take one of ``who``'s slots; TooManyConcurrent when all are taken. False when it has no cap."""
        limit = who.max_concurrent
        if limit is None:
            return False
        beat = not self._held  # the heartbeat is fresh before this gateway's count can matter
        self._held[who.name] += 1
        self._start_beating(store)
        try:
            await asyncio.gather(store.zadd(GATEWAYS, self.gateway, self._clock()) if beat else asyncio.sleep(0),
                                 store.hincr(f"cc:{who.name}", self.gateway, 1))
        except BaseException:
            await self.release(store, who.name, counted=False)
            raise
        try:
            in_flight = await self.in_flight(store, who.name)
        except BaseException:
            await self.release(store, who.name)
            raise
        if in_flight > limit:
            await self.release(store, who.name)
            raise TooManyConcurrent(f"Key `{who.name}` has {limit} requests in flight, its limit (max_concurrent); "
                                    "retry when one ends.", retry_after=1)
        return True

    async def in_flight(self, store: StateStore, name: str) -> int:
        """The key's requests in flight on every gateway whose heartbeat is alive."""
        gateways, counts = await asyncio.gather(store.zrange(GATEWAYS, min_score=self._clock() - self.lease_s),
                                                store.hgetall(f"cc:{name}"))
        live = {g for g, _ in gateways} | {self.gateway}
        return sum(max(0, int(v)) for g, v in counts.items() if g in live)

    async def release(self, store: StateStore, name: str, counted: bool = True) -> None:
        try:
            if counted:
                await store.hincr(f"cc:{name}", self.gateway, -1)
        finally:
            self._held[name] -= 1
            if self._held[name] <= 0:
                del self._held[name]
            if not self._held and self._beat is not None:
                self._beat.cancel()
                self._beat = None

    def _start_beating(self, store: StateStore) -> None:
        if self._beat is None or self._beat.done():
            self._beat = asyncio.get_running_loop().create_task(self._beating(store), name="key-slots-heartbeat")

    async def _beating(self, store: StateStore) -> None:
        """Renew this gateway's heartbeat while it holds slots; drop gateways long silent."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            now = self._clock()
            with contextlib.suppress(Exception):  # a store hiccup: the next beat tries again
                await store.zadd(GATEWAYS, self.gateway, now)
                for gone, _ in await store.zrange(GATEWAYS, max_score=now - FORGET_S, limit=100):
                    await store.zrem(GATEWAYS, gone)
