"""Durable usage per key per UTC day, in the shared state: a hash per key and day (``requests``, ``tokens_in``,
``tokens_out``), a sorted set of each key's days, and one of the keys that have usage.

A request counts when admitted (before anything is answered, so a gateway killed mid-request loses no count);
its tokens are added when it ends (known only then). ``hubserve keys usage`` reads the same records, from the
SQLite file or from Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable

from server.state.base import StateStore

KEYS = "usage:keys"  # key name -> last day it was used (epoch day)
FIELDS = ("requests", "tokens_in", "tokens_out")


def day_of(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()


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

    async def request(self, store: StateStore, name: str) -> str:
        """Count one request of ``name`` today; the day, for ``tokens`` at the end."""
        day = day_of(self._clock())
        calls: list[Awaitable[object]] = [store.hincr(f"usage:{name}:{day}", "requests", 1)]
        if (name, day) not in self._indexed:
            calls += [store.zadd(f"usage:days:{name}", day, _epoch_day(day)), store.zadd(KEYS, name, _epoch_day(day))]
        await asyncio.gather(*calls)
        self._indexed = {(n, d) for n, d in self._indexed if d == day} | {(name, day)}
        return day

    async def tokens(self, store: StateStore, name: str, day: str, tokens_in: int, tokens_out: int) -> None:
        """Add a finished request's tokens to the day it was admitted on."""
        await asyncio.gather(*(store.hincr(f"usage:{name}:{day}", field, n)
                               for field, n in (("tokens_in", tokens_in), ("tokens_out", tokens_out)) if n))


async def key_names(store: StateStore) -> list[str]:
    """Every key name with recorded usage."""
    return sorted(n for n, _ in await store.zrange(KEYS))


async def usage_of(store: StateStore, name: str, since: str | None = None) -> list[DayUsage]:
    """``name``'s usage per day, oldest first (from ``since``, an ISO date, on)."""
    days = await store.zrange(f"usage:days:{name}", min_score=_epoch_day(since) if since else None)
    out = []
    for day, _ in days:
        fields = await store.hgetall(f"usage:{name}:{day}")
        out.append(DayUsage(name, day, *(int(fields.get(f, b"0")) for f in FIELDS)))
    return out
