"""The embedded backend: one SQLite file (WAL) beside keys.toml, blobs as files in a folder beside it.

Every call runs on one dedicated thread with one connection, so the gateway's event loop never waits on the
disk and writes never contend inside this process; each primitive is one transaction. Other processes (the
``hubserve keys usage`` and ``hubserve batches`` commands) read the same file safely: WAL lets readers and
the writer run together, and ``busy_timeout`` covers the short write lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from server.state.base import CounterOp, GetInt, HGetAll, HIncr, Incr, StateStore, ZAdd, ZRangeByScore
from server.state.errors import StateUnavailable
from sync.diskio import atomic_write

T = TypeVar("T")
BLOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
SWEEP_EVERY = 500  # writes between two removals of expired rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB, num INTEGER, expires REAL);
CREATE TABLE IF NOT EXISTS hashes (key TEXT, field TEXT, value BLOB, num INTEGER, PRIMARY KEY (key, field));
CREATE TABLE IF NOT EXISTS zsets (key TEXT, member TEXT, score REAL, PRIMARY KEY (key, member));
CREATE INDEX IF NOT EXISTS zsets_by_score ON zsets (key, score, member);
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value BLOB, size INTEGER, expires REAL, used REAL);
CREATE INDEX IF NOT EXISTS cache_by_use ON cache (used);
"""


class SQLiteStore(StateStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite://{path}"
        self.blob_dir = path.with_name(path.name + ".files")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubserve-state")
        self._writes = 0
        self._db: sqlite3.Connection | None = None  # opened by the first call: an app that keeps no state makes no file
        self._pending: dict[asyncio.AbstractEventLoop, list[Any]] = {}  # calls of this loop turn, not sent yet

    @property
    def _conn(self) -> sqlite3.Connection:
        """The connection (state thread only), opened on first use."""
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = self._connect()
            except OSError as e:
                raise StateUnavailable(f"state database {self.path}: cannot open it ({e.strerror or e})") from None
        return self._db

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill, fsync at checkpoint
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)
        return conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the state thread. Calls made in one turn of the event loop (a request's limit checks,
        issued together with ``asyncio.gather``) go to the thread as one job: one hop, not one per call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        pending = self._pending.setdefault(loop, [])
        pending.append((fn, args, future))
        if len(pending) == 1:
            loop.call_soon(self._flush, loop)
        try:
            return await future
        except sqlite3.Error as e:
            raise StateUnavailable(f"state database {self.path}: {e}") from None

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        calls = self._pending.pop(loop, [])
        try:
            self._executor.submit(self._run_calls, loop, calls)
        except RuntimeError as e:  # closed
            for _, _, future in calls:
                if not future.done():
                    future.set_exception(StateUnavailable(f"state database {self.path}: {e}"))

    def _run_calls(self, loop: asyncio.AbstractEventLoop, calls: list[tuple[Callable[..., Any], tuple[Any, ...],
                                                                                 asyncio.Future[Any]]]) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for fn, args, future in calls:
            try:
                outcomes.append((future, fn(*args), None))
            except BaseException as e:  # handed to its caller
                outcomes.append((future, None, e))
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_settle, outcomes)

    def _tx(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, now, *args)`` in one immediate transaction (writers serialize on the file lock)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn, time.time(), *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._writes += 1
        if self._writes % SWEEP_EVERY == 0:
            self._sweep()
        return out

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self._conn, time.time(), *args)

    def _sweep(self) -> None:
        now = time.time()
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))
            self._conn.execute("DELETE FROM cache WHERE expires <= ?", (now,))

    # ---- counters ---------------------------------------------------------------------------------------
    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        return await self._run(self._tx, _incr, key, amount, ttl_s)

    async def get_int(self, key: str) -> int:
        return await self._run(self._read, _get_int, key)

    async def counters(self, ops: Sequence[CounterOp]) -> list[Any]:
        def op(c: sqlite3.Connection, now: float) -> list[Any]:
            return [_COUNTER_OPS[type(o)](c, now, o) for o in ops]

        return await self._run(self._tx, op) if ops else []

    # ---- values -----------------------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        def op(c: sqlite3.Connection, now: float) -> bytes | None:
            row = c.execute("SELECT value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
                            (key, now)).fetchone()
            return bytes(row[0]) if row is not None and row[0] is not None else None

        return await self._run(self._read, op)

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            c.execute("REPLACE INTO kv (key, value, num, expires) VALUES (?, ?, NULL, ?)",
                      (key, value, now + ttl_s if ttl_s is not None else None))

        await self._run(self._tx, op)

    async def add(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        def op(c: sqlite3.Connection, now: float) -> bool:
            row = c.execute("SELECT expires FROM kv WHERE key = ?", (key,)).fetchone()
            if row is not None and (row[0] is None or row[0] > now):
                return False
            c.execute("REPLACE INTO kv (key, value, num, expires) VALUES (?, ?, NULL, ?)",
                      (key, value, now + ttl_s if ttl_s is not None else None))
            return True

        return await self._run(self._tx, op)

    async def delete(self, *keys: str) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            c.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys])

        if keys:
            await self._run(self._tx, op)

    # ---- leases -----------------------------------------------------------------------------------------
    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        def op(c: sqlite3.Connection, now: float) -> bool:
            row = c.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
            if row is not None and row[1] is not None and row[1] > now and bytes(row[0]) != owner.encode():
                return False
            c.execute("REPLACE INTO kv (key, value, num, expires) VALUES (?, ?, NULL, ?)",
                      (key, owner.encode(), now + ttl_s))
            return True

        return await self._run(self._tx, op)

    async def release(self, key: str, owner: str) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            c.execute("DELETE FROM kv WHERE key = ? AND value = ?", (key, owner.encode()))

        await self._run(self._tx, op)

    # ---- hashes -----------------------------------------------------------------------------------------
    async def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            c.executemany("REPLACE INTO hashes (key, field, value, num) VALUES (?, ?, ?, NULL)",
                          [(key, f, v) for f, v in mapping.items()])

        if mapping:
            await self._run(self._tx, op)

    async def hsetnx(self, key: str, field: str, value: bytes) -> bool:
        def op(c: sqlite3.Connection, now: float) -> bool:
            cur = c.execute("INSERT OR IGNORE INTO hashes (key, field, value, num) VALUES (?, ?, ?, NULL)",
                            (key, field, value))
            return cur.rowcount == 1

        return await self._run(self._tx, op)

    async def hget(self, key: str, field: str) -> bytes | None:
        def op(c: sqlite3.Connection, now: float) -> bytes | None:
            row = c.execute("SELECT value, num FROM hashes WHERE key = ? AND field = ?", (key, field)).fetchone()
            return None if row is None else _field_bytes(row)

        return await self._run(self._read, op)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        return await self._run(self._read, _hgetall, key)

    async def hincr(self, key: str, field: str, amount: int = 1) -> int:
        return await self._run(self._tx, _hincr, key, field, amount)

    async def hlen(self, key: str) -> int:
        def op(c: sqlite3.Connection, now: float) -> int:
            return int(c.execute("SELECT COUNT(*) FROM hashes WHERE key = ?", (key,)).fetchone()[0])

        return await self._run(self._read, op)

    async def hdelete(self, key: str) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            c.execute("DELETE FROM hashes WHERE key = ?", (key,))

        await self._run(self._tx, op)

    # ---- sorted sets ------------------------------------------------------------------------------------
    async def zadd(self, key: str, member: str, score: float) -> None:
        await self._run(self._tx, _zadd, key, member, score)

    async def zrem(self, key: str, member: str) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            c.execute("DELETE FROM zsets WHERE key = ? AND member = ?", (key, member))

        await self._run(self._tx, op)

    async def zrange(
        self, key: str, *, offset: int = 0, limit: int | None = None, reverse: bool = False,
        min_score: float | None = None, max_score: float | None = None,
    ) -> list[tuple[str, float]]:
        order = "DESC" if reverse else "ASC"
        sql = f"SELECT member, score FROM zsets WHERE key = ? AND score >= ? AND score <= ? " \
              f"ORDER BY score {order}, member {order} LIMIT ? OFFSET ?"
        low = min_score if min_score is not None else float("-inf")
        high = max_score if max_score is not None else float("inf")

        def op(c: sqlite3.Connection, now: float) -> list[tuple[str, float]]:
            rows = c.execute(sql, (key, low, high, -1 if limit is None else limit, offset)).fetchall()
            return [(str(m), float(s)) for m, s in rows]

        return await self._run(self._read, op)

    # ---- cache ------------------------------------------------------------------------------------------
    async def cache_get(self, key: str) -> bytes | None:
        def op(c: sqlite3.Connection, now: float) -> bytes | None:
            row = c.execute("SELECT value FROM cache WHERE key = ? AND expires > ?", (key, now)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE cache SET used = ? WHERE key = ?", (now, key))
            return bytes(row[0])

        return await self._run(self._tx, op)

    async def cache_put(self, key: str, value: bytes, ttl_s: float, max_bytes: int) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            c.execute("DELETE FROM cache WHERE expires <= ?", (now,))
            if len(value) > max_bytes:
                c.execute("DELETE FROM cache WHERE key = ?", (key,))
                return
            c.execute("REPLACE INTO cache (key, value, size, expires, used) VALUES (?, ?, ?, ?, ?)",
                      (key, value, len(value), now + ttl_s, now))
            total = int(c.execute("SELECT COALESCE(SUM(size), 0) FROM cache").fetchone()[0])
            while total > max_bytes:
                row = c.execute("SELECT key, size FROM cache WHERE key != ? ORDER BY used LIMIT 1", (key,)).fetchone()
                if row is None:
                    break
                c.execute("DELETE FROM cache WHERE key = ?", (row[0],))
                total -= int(row[1])

        await self._run(self._tx, op)

    async def cache_bytes(self) -> int:
        def op(c: sqlite3.Connection, now: float) -> int:
            return int(c.execute("SELECT COALESCE(SUM(size), 0) FROM cache WHERE expires > ?", (now,)).fetchone()[0])

        return await self._run(self._read, op)

    # ---- blobs ------------------------------------------------------------------------------------------
    def _blob_path(self, name: str) -> Path:
        if not BLOB_NAME_RE.match(name) or ".." in name:
            raise ValueError(f"blob name {name!r}: letters, digits, '.', '_' and '-' only")
        return self.blob_dir / name

    async def put_blob(self, name: str, data: bytes) -> None:
        path = self._blob_path(name)

        def op() -> None:
            self.blob_dir.mkdir(mode=0o700, exist_ok=True)
            atomic_write(path, data, mode=0o600)

        try:
            await asyncio.get_running_loop().run_in_executor(None, op)
        except OSError as e:
            raise StateUnavailable(f"state files {self.blob_dir}: cannot write {name} ({e.strerror or e})") from None

    async def get_blob(self, name: str) -> bytes | None:
        path = self._blob_path(name)

        def op() -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        return await asyncio.get_running_loop().run_in_executor(None, op)

    async def delete_blob(self, name: str) -> None:
        path = self._blob_path(name)
        await asyncio.get_running_loop().run_in_executor(None, lambda: path.unlink(missing_ok=True))

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def ping(self) -> None:
        await self._run(self._read, lambda c, now: c.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def op() -> None:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

        with contextlib.suppress(RuntimeError):
            await asyncio.get_running_loop().run_in_executor(self._executor, op)
        self._executor.shutdown(wait=False)


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in outcomes:
        if future.done():  # its caller was cancelled
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


# ---- the primitives' statements, shared by each primitive and by ``counters`` ----------------------------
# one statement each (an upsert that returns the new value): a request's admission runs ten of them
INCR_SQL = """
INSERT INTO kv (key, value, num, expires) VALUES (:key, NULL, :amount, :expires)
ON CONFLICT (key) DO UPDATE SET value = NULL,
  num = CASE WHEN kv.num IS NULL OR kv.expires <= :now THEN :amount ELSE kv.num + :amount END,
  expires = CASE WHEN kv.num IS NULL OR kv.expires <= :now THEN :expires ELSE kv.expires END
RETURNING num
"""
HINCR_SQL = """
INSERT INTO hashes (key, field, value, num) VALUES (?, ?, NULL, ?)
ON CONFLICT (key, field) DO UPDATE SET num = hashes.num + excluded.num WHERE hashes.value IS NULL
RETURNING num
"""


def _incr(c: sqlite3.Connection, now: float, key: str, amount: int, ttl_s: float | None) -> int:
    params = {"key": key, "amount": amount, "expires": now + ttl_s if ttl_s is not None else None, "now": now}
    return int(c.execute(INCR_SQL, params).fetchone()[0])


def _get_int(c: sqlite3.Connection, now: float, key: str) -> int:
    row = c.execute("SELECT num FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)", (key, now)).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def _hincr(c: sqlite3.Connection, now: float, key: str, field: str, amount: int) -> int:
    row = c.execute(HINCR_SQL, (key, field, amount)).fetchone()
    if row is not None:
        return int(row[0])
    # the field holds bytes (written by hset): counts on from their number (not a number: ValueError, as Redis)
    current = int(_field_bytes(c.execute("SELECT value, num FROM hashes WHERE key = ? AND field = ?",
                                         (key, field)).fetchone()))
    c.execute("REPLACE INTO hashes (key, field, value, num) VALUES (?, ?, NULL, ?)", (key, field, current + amount))
    return current + amount


def _hgetall(c: sqlite3.Connection, now: float, key: str) -> dict[str, bytes]:
    rows = c.execute("SELECT field, value, num FROM hashes WHERE key = ?", (key,)).fetchall()
    return {r[0]: _field_bytes(r[1:]) for r in rows}


def _zadd(c: sqlite3.Connection, now: float, key: str, member: str, score: float) -> None:
    c.execute("REPLACE INTO zsets (key, member, score) VALUES (?, ?, ?)", (key, member, score))


def _zrange_by_score(c: sqlite3.Connection, now: float, op: ZRangeByScore) -> list[tuple[str, float]]:
    low = op.min_score if op.min_score is not None else float("-inf")
    high = op.max_score if op.max_score is not None else float("inf")
    rows = c.execute("SELECT member, score FROM zsets WHERE key = ? AND score >= ? AND score <= ? "
                     "ORDER BY score, member", (op.key, low, high)).fetchall()
    return [(str(m), float(s)) for m, s in rows]


_COUNTER_OPS: dict[type, Callable[[sqlite3.Connection, float, Any], Any]] = {
    Incr: lambda c, now, o: _incr(c, now, o.key, o.amount, o.ttl_s),
    GetInt: lambda c, now, o: _get_int(c, now, o.key),
    HIncr: lambda c, now, o: _hincr(c, now, o.key, o.field, o.amount),
    ZAdd: lambda c, now, o: _zadd(c, now, o.key, o.member, o.score),
    HGetAll: lambda c, now, o: _hgetall(c, now, o.key),
    ZRangeByScore: _zrange_by_score,
}


def _field_bytes(row: Any) -> bytes:
    value, num = row[0], row[1]
    return str(num).encode() if value is None else bytes(value)
