"""Per-key requests/min and tokens/min, counted in the shared state (server/state/): one count over every gateway.

Window: a sliding-window estimate over two fixed one-minute counters (the previous minute's count weighted by
how much of it still lies in the last 60 s, plus this minute's). A plain fixed window lets a key send twice its
rate across a minute boundary; an exact sliding log needs one stored entry per request. The estimate needs only
``incr`` with a ttl and ``get_int``, so it runs unchanged on SQLite and Redis. Admission is increment-then-check
(undone when over): atomic under concurrency and across replicas, never over-admitting (near the limit,
simultaneous requests may refuse each other, the safe side).

Tokens are known only when a request ends, so a request of a key with a tokens-per-minute limit reserves an
estimate when it is admitted and settles when it ends (the reservation is replaced by what it used): concurrent
requests see each other's reservations, so concurrency cannot run past the limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable

from server.errors import RateLimited
from server.ops.context import Principal
from server.state.base import StateStore

WINDOW_S = 60
TTL_S = 2 * WINDOW_S  # a minute's counter is read as "the previous minute" during the next one
DEFAULT_RESERVE = 256  # tokens a request reserves when the server sets no HUBSERVE_MAX_NEW_TOKENS


@dataclasses.dataclass
class Taken:
    """What the limiter counted for one request: its minute, whether it counted a request, tokens reserved."""

    minute: int
    request: bool = False
    reserved: int = 0


def estimate(prev: int, cur: int, now: float) -> float:
    """The sliding-window estimate of the last 60 s at ``now``. Pure."""
    into = now - math.floor(now / WINDOW_S) * WINDOW_S
    return prev * (1 - into / WINDOW_S) + cur


def wait_s(prev: int, cur: int, now: float, fits: Callable[[float], bool]) -> float:
    """Seconds (1..120) until the estimate, with no new traffic, ``fits``. Pure."""
    start = math.floor(now / WINDOW_S) * WINDOW_S
    for t in range(1, 2 * WINDOW_S + 1):
        at = now + t
        if at < start + WINDOW_S:
            value = estimate(prev, cur, at)
        elif at < start + 2 * WINDOW_S:
            value = estimate(cur, 0, at)
        else:
            value = 0
        if fits(value):
            return float(t)
    return float(2 * WINDOW_S)


class RateLimiter:
    """``admit`` raises RateLimited (429 with Retry-After) for a key over its rpm, or whose tokens of the last
    minute plus those reserved in flight reached its tpm; else it counts the request and reserves
    ``min(tpm, reserve)`` tokens. ``settle`` replaces the reservation with what the request used."""

    def __init__(self, reserve: int = DEFAULT_RESERVE, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.reserve = reserve

    async def admit(self, store: StateStore, who: Principal) -> Taken | None:
        if who.rpm is None and who.tpm is None:
            return None
        now = self._clock()
        minute = math.floor(now / WINDOW_S)
        reserve = min(who.tpm, self.reserve) if who.tpm is not None else 0
        taken = Taken(minute, request=who.rpm is not None, reserved=reserve)
        calls = []  # both windows counted and read in one round trip (a Redis pipeline, one SQLite queue)
        for kind, limit, amount in (("r", who.rpm, 1), ("t", who.tpm, reserve)):
            if limit is not None:
                calls += [store.incr(f"rl:{who.name}:{kind}:{minute}", amount, ttl_s=TTL_S),
                          store.get_int(f"rl:{who.name}:{kind}:{minute - 1}")]
        counts = list(await asyncio.gather(*calls))
        refusal: RateLimited | None = None
        if who.rpm is not None:
            rpm, cur, prev = who.rpm, counts.pop(0), counts.pop(0)
            if estimate(prev, cur, now) > rpm:
                refusal = RateLimited(f"Key `{who.name}` is over its limit of {rpm} requests per minute; retry later.",
                                      retry_after=wait_s(prev, cur - 1, now, lambda v: v + 1 <= rpm))
        if who.tpm is not None and refusal is None:
            tpm, cur, prev = who.tpm, counts.pop(0), counts.pop(0)
            if estimate(prev, cur - reserve, now) >= tpm:
                refusal = RateLimited(f"Key `{who.name}` is over its limit of {tpm} tokens per minute; retry later.",
                                      retry_after=wait_s(prev, cur - reserve, now, lambda v: v < tpm))
        if refusal is not None:
            await self.undo(store, who, taken)
            raise refusal
        return taken

    async def undo(self, store: StateStore, who: Principal, taken: Taken) -> None:
        """Take back what ``admit`` counted (a later admission step refused the request)."""
        calls: list[Awaitable[object]] = [self.settle(store, who, taken, 0)]
        if taken.request:
            calls.append(store.incr(f"rl:{who.name}:r:{taken.minute}", -1))
            taken.request = False
        await asyncio.gather(*calls)

    async def settle(self, store: StateStore, who: Principal, taken: Taken, tokens: int) -> None:
        """At the request's end, however it ended: its reservation goes, the tokens it used count (in the minute
        it was admitted while that minute's counter lives, else in the current one)."""
        if who.tpm is None:
            return
        now = self._clock()
        if taken.reserved and now < (taken.minute + 2) * WINDOW_S:
            delta, minute = tokens - taken.reserved, taken.minute
        else:
            delta, minute = tokens, math.floor(now / WINDOW_S)
        taken.reserved = 0
        if delta:
            await store.incr(f"rl:{who.name}:t:{minute}", delta, ttl_s=TTL_S)
