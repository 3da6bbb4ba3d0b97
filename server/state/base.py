"""The gateway's shared state: one small set of primitives, two backends (embedded SQLite, Redis).

Everything that must outlive a request or be one across gateway replicas — rate-limit windows, budgets and
usage, idempotency records, the response cache, batch jobs and their files — is built on these primitives, so
each feature is written once and runs on either backend. Every primitive is atomic on its own (a Redis command
or script; one SQLite transaction); features compose them (e.g. ``incr`` then undo when over a limit).

Keys are plain strings the features namespace themselves (``"rl:<key>:<minute>"``); values are bytes.
Expiry (``ttl_s``) is wall-clock seconds, so replicas agree on it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any


# ---- counter operations, run together by ``StateStore.counters`` ------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Incr:
    """``incr``: the counter's new value (int)."""

    key: str
    amount: int = 1
    ttl_s: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GetInt:
    """``get_int``: the counter's value (int)."""

    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class HIncr:
    """``hincr``: the field's new value (int)."""

    key: str
    field: str
    amount: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class ZAdd:
    """``zadd``: None."""

    key: str
    member: str
    score: float


@dataclasses.dataclass(frozen=True, slots=True)
class HGetAll:
    """``hgetall``: every field (dict[str, bytes])."""

    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class ZRangeByScore:
    """``zrange`` ascending within [min_score, max_score]: list[tuple[str, float]]."""

    key: str
    min_score: float | None = None
    max_score: float | None = None


CounterOp = Incr | GetInt | HIncr | ZAdd | HGetAll | ZRangeByScore


class StateStore(abc.ABC):
    """Async primitives over the shared state. ``url`` names the backend for logs (never a password)."""

    url: str = ""

    # ---- counters ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        """Add ``amount`` (may be negative) to the integer at ``key`` (0 when absent or expired) and return the
        new value. ``ttl_s`` sets the expiry only when the counter is created (a fixed window)."""

    @abc.abstractmethod
    async def get_int(self, key: str) -> int:
        """The counter's value; 0 when absent or expired."""

    @abc.abstractmethod
    async def counters(self, ops: Sequence[CounterOp]) -> list[Any]:
        """Run ``ops`` in order in one round trip, with no other call in between (one SQLite transaction, one
        Redis script); each op's result as its own primitive returns it. A request's admission and its
        settling are one such call each, not one round trip per counter (server/ops/auth.py)."""

    # ---- values -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value at ``key``; None when absent or expired."""

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store ``value`` (replacing any), expiring after ``ttl_s`` seconds (None: never)."""

    @abc.abstractmethod
    async def add(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired); True when this call stored it."""

    @abc.abstractmethod
    async def delete(self, *keys: str) -> None:
        """Remove values and counters (absent keys are ignored)."""

    # ---- leases (one owner at a time, e.g. the gateway that runs a batch) -------------------------------
    @abc.abstractmethod
    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        """Take ``key`` for ``owner`` for ``ttl_s`` seconds, or renew it when ``owner`` holds it already;
        False when another owner holds an unexpired lease."""

    @abc.abstractmethod
    async def release(self, key: str, owner: str) -> None:
        """Give the lease back if ``owner`` holds it."""

    # ---- hashes (records with fields: a batch, a day's usage) -------------------------------------------
    @abc.abstractmethod
    async def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        """Set the fields of ``mapping`` (others are kept)."""

    @abc.abstractmethod
    async def hsetnx(self, key: str, field: str, value: bytes) -> bool:
        """Set one field only if it is absent; True when this call set it."""

    @abc.abstractmethod
    async def hget(self, key: str, field: str) -> bytes | None:
        """One field; None when absent."""

    @abc.abstractmethod
    async def hgetall(self, key: str) -> dict[str, bytes]:
        """Every field (empty when the hash is absent)."""

    @abc.abstractmethod
    async def hincr(self, key: str, field: str, amount: int = 1) -> int:
        """Add to an integer field (0 when absent) and return the new value."""

    @abc.abstractmethod
    async def hlen(self, key: str) -> int:
        """How many fields the hash has."""

    @abc.abstractmethod
    async def hdelete(self, key: str) -> None:
        """Remove the whole hash."""

    # ---- sorted sets (indexes: batches by creation time, a key's days of usage) -------------------------
    @abc.abstractmethod
    async def zadd(self, key: str, member: str, score: float) -> None:
        """Add ``member`` (or move it to ``score``)."""

    @abc.abstractmethod
    async def zrem(self, key: str, member: str) -> None:
        """Remove ``member`` (absent is ignored)."""

    @abc.abstractmethod
    async def zrange(
        self, key: str, *, offset: int = 0, limit: int | None = None, reverse: bool = False,
        min_score: float | None = None, max_score: float | None = None,
    ) -> list[tuple[str, float]]:
        """Members with their scores, by score (then member), ascending unless ``reverse``; optionally only
        scores within [min_score, max_score]; ``offset``/``limit`` page the result."""

    # ---- the response cache: bounded in bytes, least recently used out first ----------------------------
    @abc.abstractmethod
    async def cache_get(self, key: str) -> bytes | None:
        """A cached answer (and mark it used); None when absent or expired."""

    @abc.abstractmethod
    async def cache_put(self, key: str, value: bytes, ttl_s: float, max_bytes: int) -> None:
        """Cache ``value`` for ``ttl_s`` seconds, then evict the least recently used entries until every entry
        together is at most ``max_bytes``. A value larger than ``max_bytes`` is not cached."""

    @abc.abstractmethod
    async def cache_bytes(self) -> int:
        """Bytes held by unexpired cache entries."""

    # ---- blobs (uploaded files, batch outputs: larger values, written once) -----------------------------
    @abc.abstractmethod
    async def put_blob(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` durably (a crash leaves the old blob or the new one, never half)."""

    @abc.abstractmethod
    async def get_blob(self, name: str) -> bytes | None:
        """The blob; None when absent."""

    @abc.abstractmethod
    async def delete_blob(self, name: str) -> None:
        """Remove the blob (absent is ignored)."""

    # ---- lifecycle --------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StateUnavailable when the backend cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads."""
