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

Both run their counters in the one ``StateStore.counters`` call of a request's admission and the one of its
settling (server/ops/auth.py): ``plan`` gives the ops, ``refusal`` decides on their results, the ``*_ops``
methods give what settles or takes back. ``admit``/``settle``/``take``/``release`` do the same alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from server.errors import BudgetExceeded, TooManyConcurrent
from server.ops.context import Principal
from server.state.base import CounterOp, HGetAll, HIncr, Incr, StateStore, ZAdd, ZRangeByScore

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


@functools.lru_cache(maxsize=4)
def windows_of(epoch_day: int) -> tuple[tuple[str, float], tuple[str, float]]:
    """((label, end) of the UTC day, (label, end) of the UTC month) for a day since the epoch, ends as epoch
    seconds. Cached: a request needs them, and they change once a day."""
    when = dt.datetime.fromtimestamp(epoch_day * 86400, dt.UTC)
    (day, day_end), (month, month_end) = day_window(when), month_window(when)
    return (day, day_end.timestamp()), (month, month_end.timestamp())


@dataclasses.dataclass
class Reserved:
    key: str
    tokens: int
    end: float  # epoch seconds: the window's end
    what: str = "daily"  # which budget
    limit: int = 0


class Budgets:
    """``admit`` raises BudgetExceeded (429, Retry-After to the reset) for a key whose day's or month's used and
    reserved tokens reached its budget; else it reserves tokens in both. ``settle`` charges what was used."""

    def __init__(self, reserve: int, clock: Callable[[], float] = time.time) -> None:
        self.reserve = reserve
        self._clock = clock

    def plan(self, who: Principal) -> tuple[list[Reserved], list[CounterOp]]:
        """The reservations a request of ``who`` makes (one per budget it has) and their ops."""
        now = self._clock()
        taken = []
        if who.daily_tokens is not None or who.monthly_tokens is not None:
            day, month = windows_of(int(now // 86400))
            for what, limit, (label, end) in (("daily", who.daily_tokens, day), ("monthly", who.monthly_tokens, month)):
                if limit is not None:
                    taken.append(Reserved(f"budget:{who.name}:{label}", min(limit, self.reserve), end, what, limit))
        return taken, [Incr(r.key, r.tokens, ttl_s=r.end - now + GRACE_S) for r in taken]

    def refusal(self, who: Principal, taken: list[Reserved], values: Sequence[int]) -> BudgetExceeded | None:
        """The 429 for the totals ``plan``'s ops returned, or None when every budget has room."""
        for r, value in zip(taken, values, strict=True):
            if value - r.tokens >= r.limit:
                end = dt.datetime.fromtimestamp(r.end, dt.UTC)
                return BudgetExceeded(
                    f"Key `{who.name}` is over its {r.what} budget of {r.limit} tokens ({r.what}_tokens); it resets "
                    f"at {end.isoformat()} (UTC).", code=f"{r.what}_tokens_exceeded",
                    retry_after=r.end - self._clock())
        return None

    def settle_ops(self, taken: list[Reserved], tokens: int) -> list[CounterOp]:
        """What replaces each reservation with ``tokens`` (while the window's counter lives); 0: gives it back."""
        now = self._clock()
        ops: list[CounterOp] = [Incr(r.key, tokens - r.tokens) for r in taken
                                if tokens != r.tokens and now < r.end + GRACE_S]
        taken.clear()
        return ops

    async def admit(self, store: StateStore, who: Principal) -> list[Reserved]:
        taken, ops = self.plan(who)
        refusal = self.refusal(who, taken, await store.counters(ops))
        if refusal is not None:
            await store.counters(self.settle_ops(taken, 0))
            raise refusal
        return taken

    async def settle(self, store: StateStore, taken: list[Reserved], tokens: int) -> None:
        await store.counters(self.settle_ops(taken, tokens))


class Slots:
    """Requests in flight per key over every gateway on the store (see the module's docstring)."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.time) -> None:
        self.lease_s = lease_s
        self.gateway = uuid.uuid4().hex
        self._clock = clock
        self._held: collections.Counter[str] = collections.Counter()
        self._beat: asyncio.Task[None] | None = None
        self._store: StateStore | None = None

    def plan(self, store: StateStore, who: Principal) -> list[CounterOp]:
        """The ops that take one of ``who``'s slots and read the key's count on every live gateway (none when it
        has no cap). The slot counts as held here from now on: ``forget`` it when the ops did not run."""
        if who.max_concurrent is None:
            return []
        beat = not self._held  # the heartbeat is fresh before this gateway's count can matter
        self._held[who.name] += 1
        self._start_beating(store)
        now = self._clock()
        return [*([ZAdd(GATEWAYS, self.gateway, now)] if beat else []), HIncr(f"cc:{who.name}", self.gateway, 1),
                ZRangeByScore(GATEWAYS, min_score=now - self.lease_s), HGetAll(f"cc:{who.name}")]

    def refusal(self, who: Principal, values: Sequence[Any]) -> TooManyConcurrent | None:
        """The 429 when the count ``plan``'s ops read (this request included) is over the key's cap."""
        limit = who.max_concurrent
        if limit is None or self._count(values[-2], values[-1]) <= limit:
            return None
        return TooManyConcurrent(f"Key `{who.name}` has {limit} requests in flight, its limit (max_concurrent); "
                                 "retry when one ends.", retry_after=1)

    def release_ops(self, name: str) -> list[CounterOp]:
        """What gives a slot back in the store (then ``forget`` it)."""
        return [HIncr(f"cc:{name}", self.gateway, -1)]

    def forget(self, name: str) -> None:
        """This gateway no longer holds one of ``name``'s slots; it stops beating when it holds none."""
        self._held[name] -= 1
        if self._held[name] <= 0:
            del self._held[name]
        if not self._held and self._beat is not None:
            self._beat.cancel()
            self._beat = None

    def _count(self, gateways: list[tuple[str, float]], counts: dict[str, bytes]) -> int:
        live = {g for g, _ in gateways} | {self.gateway}
        return sum(max(0, int(v)) for g, v in counts.items() if g in live)

    async def take(self, store: StateStore, who: Principal) -> bool:
        """Take one of ``who``'s slots; TooManyConcurrent when all are taken. False when it has no cap."""
        ops = self.plan(store, who)
        if not ops:
            return False
        try:
            values = await store.counters(ops)
        except BaseException:
            self.forget(who.name)
            raise
        refusal = self.refusal(who, values)
        if refusal is not None:
            await self.release(store, who.name)
            raise refusal
        return True

    async def in_flight(self, store: StateStore, name: str) -> int:
        """The key's requests in flight on every gateway whose heartbeat is alive."""
        gateways, counts = await store.counters([ZRangeByScore(GATEWAYS, min_score=self._clock() - self.lease_s),
                                                 HGetAll(f"cc:{name}")])
        return self._count(gateways, counts)

    async def release(self, store: StateStore, name: str, counted: bool = True) -> None:
        try:
            if counted:
                await store.counters(self.release_ops(name))
        finally:
            self.forget(name)

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
