"""Durable usage per key per UTC day, in the shared state: a hash per key and day (``requests``, ``tokens_in``,
``tokens_out``), a sorted set of each key's days, and one of the keys that have usage.

A request counts when admitted (before anything is answered, so a gateway killed mid-request loses no count);
its tokens are added when it ends (known only then). ``hubserve keys usage`` reads the same records, from the
SQLite file or from Redis. The gateway runs these ops in the one ``StateStore.counters`` call of a request's
admission (``plan``; ``undo_ops`` when it is refused after all) and the one of its settling (``tokens_ops``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import time
from collections.abc import Callable

from server.state.base import CounterOp, HIncr, StateStore, ZAdd

KEYS = "usage:keys"  # key name -> last day it was used (epoch day)
FIELDS = ("requests", "tokens_in", "tokens_out")


def day_of(now: float) -> str:
    return _day_label(int(now // 86400))


@functools.lru_cache(maxsize=4)
def _day_label(epoch_day: int) -> str:
    return dt.date.fromordinal(dt.date(1970, 1, 1).toordinal() + epoch_day).isoformat()


def _epoch_day(day: str) -> float:
    return float(dt.date.fromisoformat(day).toordinal())


@dataclasses.dataclass
class DayUsage:
    key: str
    day: str
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


class UsageRecorder:
    """Counts requests and tokens per key and day. Each gateway indexes a (key, day) once."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._indexed: set[tuple[str, str]] = set()

    def plan(self, name: str) -> tuple[str, list[CounterOp]]:
        """The day a request of ``name`` counts on and the ops that count it (and index the day, the first time
        this gateway sees it: then call ``indexed``)."""
        day = day_of(self._clock())
        ops: list[CounterOp] = [HIncr(f"usage:{name}:{day}", "requests", 1)]
        if (name, day) not in self._indexed:
            ops += [ZAdd(f"usage:days:{name}", day, _epoch_day(day)), ZAdd(KEYS, name, _epoch_day(day))]
        return day, ops

    def indexed(self, name: str, day: str) -> None:
        """``plan``'s ops ran: (name, day) is in the indexes (older days are forgotten)."""
        if (name, day) not in self._indexed:
            self._indexed = {(n, d) for n, d in self._indexed if d == day} | {(name, day)}

    def undo_ops(self, name: str, day: str) -> list[CounterOp]:
        """What takes the count back (the request was refused): refusals are not usage."""
        return [HIncr(f"usage:{name}:{day}", "requests", -1)]

    def tokens_ops(self, name: str, day: str, tokens_in: int, tokens_out: int) -> list[CounterOp]:
        """What adds a finished request's tokens to the day it was admitted on."""
        return [HIncr(f"usage:{name}:{day}", field, n)
                for field, n in (("tokens_in", tokens_in), ("tokens_out", tokens_out)) if n]

    async def request(self, store: StateStore, name: str) -> str:
        """Count one request of ``name`` today; the day, for ``tokens`` at the end."""
        day, ops = self.plan(name)
        await store.counters(ops)
        self.indexed(name, day)
        return day

    async def tokens(self, store: StateStore, name: str, day: str, tokens_in: int, tokens_out: int) -> None:
        await store.counters(self.tokens_ops(name, day, tokens_in, tokens_out))


async def key_names(store: StateStore) -> list[str]:
    """Every key name with recorded usage."""
    return sorted(n for n, _ in await store.zrange(KEYS))


async def usage_of(store: StateStore, name: str, since: str | None = None) -> list[DayUsage]:
    """``name``'s usage per day, oldest first (from ``since``, an ISO date, on)."""
    days = await store.zrange(f"usage:days:{name}", min_score=_epoch_day(since) if since else None)
    out = []
    for day, _ in days:
        fields = await store.hgetall(f"usage:{name}:{day}")
        usage = DayUsage(name, day, *(int(fields.get(f, b"0")) for f in FIELDS))
        if usage.requests or usage.tokens:  # a day whose every request was refused (counted, then undone): none
            out.append(usage)
    return out
