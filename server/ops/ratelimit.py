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

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

from server.errors import RateLimited
from server.ops.context import Principal
from server.state.base import CounterOp, GetInt, Incr, StateStore

WINDOW_S = 60
TTL_S = 2 * WINDOW_S  # a minute's counter is read as "the previous minute" during the next one
DEFAULT_RESERVE = 256  # tokens a request reserves when the server sets no HUBSERVE_MAX_NEW_TOKENS


@dataclasses.dataclass
class Taken:
    """What the limiter counted for one request: its minute, whether it counted a request, tokens reserved."""

    minute: int
    request: bool = False
    reserved: int = 0
    at: float = 0.0  # when it was admitted (epoch seconds)


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
    ``min(tpm, reserve)`` tokens. ``settle`` replaces the reservation with what the request used.

    The gateway runs these counters together with the other limits' in one ``StateStore.counters`` call
    (server/ops/auth.py): ``plan`` gives the ops, ``refusal`` decides on their results, ``undo_ops`` and
    ``settle_ops`` give what takes them back. ``admit``/``undo``/``settle`` do the same alone."""

    def __init__(self, reserve: int = DEFAULT_RESERVE, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.reserve = reserve

    def plan(self, who: Principal) -> tuple[Taken | None, list[CounterOp]]:
        """What admitting a request of ``who`` counts (nothing when it has no rpm or tpm): each window's
        counter incremented and the previous minute's read."""
        if who.rpm is None and who.tpm is None:
            return None, []
        now = self._clock()
        minute = math.floor(now / WINDOW_S)
        reserve = min(who.tpm, self.reserve) if who.tpm is not None else 0
        taken = Taken(minute, request=who.rpm is not None, reserved=reserve, at=now)
        ops: list[CounterOp] = []
        for kind, limit, amount in (("r", who.rpm, 1), ("t", who.tpm, reserve)):
            if limit is not None:
                ops += [Incr(f"rl:{who.name}:{kind}:{minute}", amount, ttl_s=TTL_S),
                        GetInt(f"rl:{who.name}:{kind}:{minute - 1}")]
        return taken, ops

    def refusal(self, who: Principal, taken: Taken, counts: Sequence[int]) -> RateLimited | None:
        """The 429 for the counts ``plan``'s ops returned, or None when the request is within both limits."""
        now, values = taken.at, list(counts)
        if who.rpm is not None:
            rpm, cur, prev = who.rpm, values.pop(0), values.pop(0)
            if estimate(prev, cur, now) > rpm:
                return RateLimited(f"Key `{who.name}` is over its limit of {rpm} requests per minute; retry later.",
                                   retry_after=wait_s(prev, cur - 1, now, lambda v: v + 1 <= rpm))
        if who.tpm is not None:
            tpm, reserve, cur, prev = who.tpm, taken.reserved, values.pop(0), values.pop(0)
            if estimate(prev, cur - reserve, now) >= tpm:
                return RateLimited(f"Key `{who.name}` is over its limit of {tpm} tokens per minute; retry later.",
                                   retry_after=wait_s(prev, cur - reserve, now, lambda v: v < tpm))
        return None

    def undo_ops(self, who: Principal, taken: Taken) -> list[CounterOp]:
        """What takes back everything ``plan`` counted (the request was refused)."""
        ops = self.settle_ops(who, taken, 0)
        if taken.request:
            ops.append(Incr(f"rl:{who.name}:r:{taken.minute}", -1))
            taken.request = False
        return ops

    def settle_ops(self, who: Principal, taken: Taken, tokens: int) -> list[CounterOp]:
        """At the request's end, however it ended: its reservation goes, the tokens it used count (in the minute
        it was admitted while that minute's counter lives, else in the current one)."""
        if who.tpm is None:
            return []
        now = self._clock()
        if taken.reserved and now < (taken.minute + 2) * WINDOW_S:
            delta, minute = tokens - taken.reserved, taken.minute
        else:
            delta, minute = tokens, math.floor(now / WINDOW_S)
        taken.reserved = 0
        return [Incr(f"rl:{who.name}:t:{minute}", delta, ttl_s=TTL_S)] if delta else []

    async def admit(self, store: StateStore, who: Principal) -> Taken | None:
        taken, ops = self.plan(who)
        if taken is None:
            return None
        refusal = self.refusal(who, taken, await store.counters(ops))
        if refusal is not None:
            await store.counters(self.undo_ops(who, taken))
            raise refusal
        return taken

    async def undo(self, store: StateStore, who: Principal, taken: Taken) -> None:
        await store.counters(self.undo_ops(who, taken))

    async def settle(self, store: StateStore, who: Principal, taken: Taken, tokens: int) -> None:
        await store.counters(self.settle_ops(who, taken, tokens))
