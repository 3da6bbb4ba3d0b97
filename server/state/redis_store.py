"""The shared backend: one Redis (``HUBSERVE_STATE_URL=redis://...``) for several gateway replicas.

Every primitive is one Redis command, or one Lua script where one command is not atomic (a counter's expiry set
at creation, a lease renewed or released only by its owner, the byte-bounded LRU cache), so replicas never race.
Expiry is Redis's own (PX/PEXPIRE) and the cache's clock is the server's (TIME), so replicas agree on time.

Keys are ``<prefix><kind>:<key>`` (prefix ``hubserve:``, or ``?prefix=name`` in the URL): kinds keep values,
hashes, sorted sets, cache entries and blobs apart, as the SQLite backend's tables do, and the prefix makes a
shared Redis safe. Blobs are single strings of at most MAX_BLOB_BYTES (Redis caps a string at 512 MB).
Run Redis with ``maxmemory-policy noeviction`` (budgets and usage must never be evicted) and, for budgets and
batches to survive a Redis restart, ``appendonly yes``. Redis Cluster is not supported (scripts touch keys they
compute); one server, or a Sentinel-managed primary, is.

redis.asyncio connections belong to the event loop that opened them, so each loop gets its own client (the app's
loop, a CLI's ``asyncio.run``, a test's loop) over the one URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from server.state import redact_url
from server.state.base import CounterOp, GetInt, HGetAll, HIncr, Incr, StateStore, ZAdd, ZRangeByScore
from server.state.errors import StateUnavailable
from server.state.sqlite_store import BLOB_NAME_RE

DEFAULT_PREFIX = "hubserve:"
MAX_BLOB_BYTES = 256 * 1024**2  # one Redis string; an OpenAI batch input file is at most 200 MB
MAX_CONNECTIONS = 64  # per gateway process (and event loop)
LANE_IDLE = 16  # connections the hot path (scripts) keeps open per gateway process (and event loop)
EXPIRED_PER_PUT = 1000  # expired cache entries a put drops at most (the rest go on the next put)

# KEYS[1] counter; ARGV amount, ttl ms ('' = none). The expiry is set only when this call creates the counter.
INCR = """
local created = redis.call('EXISTS', KEYS[1]) == 0
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if created and ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""
# ``counters``: ARGV[1] the prefix, ARGV[2] the ops as JSON, each [code, kind:key, a, b]: 'i' incr (amount, ttl ms
# or -1), 'g' get_int, 'h' hincr (field, amount), 'z' zadd (member, score), 'H' hgetall, 'r' zrange by score
# (min, max). One script: the ops run with no other command in between, in one round trip. The ops and the
# reply are one JSON string each, not a Redis argument and reply element per value: encoding and parsing
# those in redis-py cost more than the round trip. Integers go back as strings ('%d': exact, where cjson
# prints 14 digits); hash values and scores are Redis's strings as they are.
COUNTERS = """
local p, out = ARGV[1], {}
for i, o in ipairs(cjson.decode(ARGV[2])) do
  local code, k, a, b = o[1], p .. o[2], o[3], o[4]
  if code == 'i' then
    local created = redis.call('EXISTS', k) == 0
    out[i] = string.format('%d', redis.call('INCRBY', k, a))
    if created and b >= 0 then redis.call('PEXPIRE', k, b) end
  elseif code == 'g' then
    out[i] = redis.call('GET', k)
  elseif code == 'h' then
    out[i] = string.format('%d', redis.call('HINCRBY', k, a, b))
  elseif code == 'z' then
    redis.call('ZADD', k, b, a)
    out[i] = 0
  elseif code == 'H' then
    out[i] = redis.call('HGETALL', k)
  else
    out[i] = redis.call('ZRANGE', k, a, b, 'BYSCORE', 'WITHSCORES')
  end
end
return cjson.encode(out)
"""
# KEYS[1] lease; ARGV owner, ttl ms
LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
# The cache: <p>cv:<key> the value (PX), <p>c:used a zset of last use (µs, server clock), <p>c:exp a zset of
# expiry (ms), <p>c:size a hash of sizes, <p>c:total the running byte total. ARGV[1] is the prefix.
CACHE_LIB = """
local p = ARGV[1]
local used, exp, sizes, total = p .. 'c:used', p .. 'c:exp', p .. 'c:size', p .. 'c:total'
local t = redis.call('TIME')
-- Lua prints numbers with 14 digits: the last use (µs) goes to ZADD as an exact string, expiry is in ms
local now_us = t[1] .. string.format('%06d', tonumber(t[2]))
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop(m)
  local s = redis.call('HGET', sizes, m)
  if s then redis.call('DECRBY', total, s) end
  redis.call('HDEL', sizes, m)
  redis.call('ZREM', used, m)
  redis.call('ZREM', exp, m)
  redis.call('DEL', p .. 'cv:' .. m)
end
local function sweep()
  for _, m in ipairs(redis.call('ZRANGE', exp, '-inf', now, 'BYSCORE', 'LIMIT', 0, EXPIRED_PER_PUT)) do drop(m) end
end
""".replace("EXPIRED_PER_PUT", str(EXPIRED_PER_PUT))
CACHE_GET = CACHE_LIB + """
-- no sweep here (a get stays cheap): an expired value is gone already (PX); puts sweep the indexes
local v = redis.call('GET', p .. 'cv:' .. ARGV[2])
if not v then return false end
redis.call('ZADD', used, now_us, ARGV[2])
return v
"""
# ARGV prefix, key, value, ttl ms, max bytes
CACHE_PUT = CACHE_LIB + """
local k, val, ttl, maxb = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
sweep()
drop(k)
if #val > maxb then return 0 end
redis.call('SET', p .. 'cv:' .. k, val, 'PX', ttl)
redis.call('HSET', sizes, k, #val)
local tot = redis.call('INCRBY', total, #val)
redis.call('ZADD', used, now_us, k)
redis.call('ZADD', exp, now + ttl, k)
while tot > maxb do
  local victim = nil
  for _, m in ipairs(redis.call('ZRANGE', used, 0, 1)) do
    if m ~= k then victim = m; break end
  end
  if not victim then break end
  drop(victim)
  tot = tonumber(redis.call('GET', total) or '0')
end
return 1
"""
CACHE_BYTES = CACHE_LIB + """
sweep()
return tonumber(redis.call('GET', total) or '0')
"""
SCRIPTS = {"incr": INCR, "counters": COUNTERS, "lease": LEASE, "release": RELEASE, "cache_get": CACHE_GET,
           "cache_put": CACHE_PUT, "cache_bytes": CACHE_BYTES}


@dataclass
class _Conn:
    client: aioredis.Redis
    scripts: dict[str, AsyncScript]
    idle: list[AbstractConnection] = field(default_factory=list)  # the scripts' own connections, free now

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        with contextlib.suppress(RedisError, OSError):
            for conn in idle:
                await conn.disconnect()
            await self.client.aclose()
            await self.client.connection_pool.disconnect()  # a pool handed to the client is not closed with it


def split_prefix(url: str) -> tuple[str, str]:
    """``url`` without its ``prefix`` query parameter (redis-py would pass it on to the connection), and the
    prefix (``hubserve:`` when none; a ``:`` is added when it does not end with one)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "") or DEFAULT_PREFIX
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix if prefix.endswith(":") else prefix + ":"


class RedisStore(StateStore):
    def __init__(self, url: str, *, connect_timeout_s: float = 2.0, timeout_s: float = 10.0) -> None:
        self._url, self.prefix = split_prefix(url)
        self.url = redact_url(url)
        self._secret = urlsplit(self._url).password or ""
        self._options: dict[str, Any] = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": timeout_s,
                         # a dropped connection (a Redis restart) is retried at once on a fresh one, not for seconds
                         "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2)}
        self._conns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Conn] = weakref.WeakKeyDictionary()
        try:
            aioredis.ConnectionPool.from_url(self._url)  # parse now: a bad URL fails at startup, not per request
        except (ValueError, RedisError) as e:
            raise StateUnavailable(f"HUBSERVE_STATE_URL {self.url!r}: {self._scrub(e)}") from None

    def _conn(self) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = self._conns.get(loop)
        if conn is None:
            # a blocking pool: a burst of requests waits for a free connection instead of failing
            pool = aioredis.BlockingConnectionPool.from_url(self._url, max_connections=MAX_CONNECTIONS,
                                                            timeout=self._options["socket_timeout"],
                                                            **self._options)
            client = aioredis.Redis(connection_pool=pool, retry=self._options["retry"])
            conn = _Conn(client, {name: client.register_script(src) for name, src in SCRIPTS.items()})
            self._conns[loop] = conn
        return conn

    def _k(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    def _scrub(self, e: BaseException) -> str:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return text.replace(self._secret, "***") if self._secret else text

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as e:
            raise StateUnavailable(f"state backend {self.url}: {self._scrub(e)}") from None

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script on a connection of the scripts' own (redis-py's Connection, which still does the URL's
        auth, TLS, database and parsing) without the client's pool, retry and instrumentation layers: those
        cost about as much CPU as the round trip itself, and scripts are the per-request path (admission,
        settling, cache lookups). A dropped idle connection (a Redis restart) is retried once on a fresh one."""
        conn = self._conn()
        script = conn.scripts[name]
        for attempt in (0, 1):
            reused = bool(conn.idle)
            c = conn.idle.pop() if reused else conn.client.connection_pool.make_connection()
            try:
                reply = await _evalsha(c, script, keys, args)
            except RedisConnectionError as e:
                await c.disconnect(nowait=True)
                if reused and attempt == 0:
                    continue
                raise StateUnavailable(f"state backend {self.url}: {self._scrub(e)}") from None
            except (RedisError, OSError) as e:
                await c.disconnect(nowait=True)
                raise StateUnavailable(f"state backend {self.url}: {self._scrub(e)}") from None
            except BaseException:  # cancelled: a reply may be left unread on it
                await c.disconnect(nowait=True)
                raise
            if len(conn.idle) < LANE_IDLE:
                conn.idle.append(c)
            else:
                await c.disconnect()
            return reply
        raise AssertionError("unreachable")

    # ---- counters ---------------------------------------------------------------------------------------
    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        ttl = "" if ttl_s is None else _ms(ttl_s)
        return int(await self._script("incr", [self._k("v", key)], [amount, ttl]))

    async def get_int(self, key: str) -> int:
        with self._unavailable():
            raw = await self._conn().client.get(self._k("v", key))
        try:
            return int(raw) if raw is not None else 0
        except ValueError:  # a value, not a counter (the SQLite backend reads it as 0 too)
            return 0

    async def counters(self, ops: Sequence[CounterOp]) -> list[Any]:
        if not ops:
            return []
        encoded: list[list[Any]] = []
        for op in ops:
            if isinstance(op, Incr):
                encoded.append(["i", "v:" + op.key, op.amount, -1 if op.ttl_s is None else _ms(op.ttl_s)])
            elif isinstance(op, GetInt):
                encoded.append(["g", "v:" + op.key])
            elif isinstance(op, HIncr):
                encoded.append(["h", "h:" + op.key, op.field, op.amount])
            elif isinstance(op, ZAdd):
                encoded.append(["z", "z:" + op.key, op.member, float(op.score)])
            elif isinstance(op, HGetAll):
                encoded.append(["H", "h:" + op.key])
            elif isinstance(op, ZRangeByScore):
                encoded.append(["r", "z:" + op.key, "-inf" if op.min_score is None else repr(float(op.min_score)),
                                "+inf" if op.max_score is None else repr(float(op.max_score))])
            else:
                raise TypeError(f"not a counter op: {op!r}")
        raw = await self._script("counters", [], [self.prefix, json.dumps(encoded)])
        # bytes that are not UTF-8 (a binary hash value) pass through the JSON as surrogates and back
        replies = json.loads(raw.decode("utf-8", "surrogateescape"))
        return [_counter_result(op, value) for op, value in zip(ops, replies, strict=True)]

    # ---- values -----------------------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        with self._unavailable():
            return _opt(await self._conn().client.get(self._k("v", key)))

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        with self._unavailable():
            await self._conn().client.set(self._k("v", key), value, px=None if ttl_s is None else _ms(ttl_s))

    async def add(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        with self._unavailable():
            done = await self._conn().client.set(self._k("v", key), value, nx=True,
                                                 px=None if ttl_s is None else _ms(ttl_s))
        return bool(done)

    async def delete(self, *keys: str) -> None:
        if keys:
            with self._unavailable():
                await self._conn().client.delete(*(self._k("v", k) for k in keys))

    # ---- leases -----------------------------------------------------------------------------------------
    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        with self._unavailable():
            return bool(await self._conn().scripts["lease"](keys=[self._k("v", key)], args=[owner, _ms(ttl_s)]))

    async def release(self, key: str, owner: str) -> None:
        with self._unavailable():
            await self._conn().scripts["release"](keys=[self._k("v", key)], args=[owner])

    # ---- hashes -----------------------------------------------------------------------------------------
    async def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        if mapping:
            with self._unavailable():
                await self._conn().client.hset(self._k("h", key), mapping=mapping)  # type: ignore[arg-type]

    async def hsetnx(self, key: str, field: str, value: bytes) -> bool:
        with self._unavailable():
            return bool(await self._conn().client.hsetnx(self._k("h", key), field, value))

    async def hget(self, key: str, field: str) -> bytes | None:
        with self._unavailable():
            return _opt(await self._conn().client.hget(self._k("h", key), field))

    async def hgetall(self, key: str) -> dict[str, bytes]:
        with self._unavailable():
            raw: dict[bytes, bytes] = await self._conn().client.hgetall(self._k("h", key))  # type: ignore[assignment]
        return {f.decode(): v for f, v in raw.items()}

    async def hincr(self, key: str, field: str, amount: int = 1) -> int:
        with self._unavailable():
            return int(await self._conn().client.hincrby(self._k("h", key), field, amount))

    async def hlen(self, key: str) -> int:
        with self._unavailable():
            return int(await self._conn().client.hlen(self._k("h", key)))

    async def hdelete(self, key: str) -> None:
        with self._unavailable():
            await self._conn().client.delete(self._k("h", key))

    # ---- sorted sets ------------------------------------------------------------------------------------
    async def zadd(self, key: str, member: str, score: float) -> None:
        with self._unavailable():
            await self._conn().client.zadd(self._k("z", key), {member: score})

    async def zrem(self, key: str, member: str) -> None:
        with self._unavailable():
            await self._conn().client.zrem(self._k("z", key), member)

    async def zrange(
        self, key: str, *, offset: int = 0, limit: int | None = None, reverse: bool = False,
        min_score: float | None = None, max_score: float | None = None,
    ) -> list[tuple[str, float]]:
        low = "-inf" if min_score is None else repr(float(min_score))
        high = "+inf" if max_score is None else repr(float(max_score))
        # ZRANGE ... BYSCORE [REV] LIMIT: by score, then member (bytes), both reversed with REV, as SQLite sorts
        args: list[str | int] = [high, low, "BYSCORE", "REV"] if reverse else [low, high, "BYSCORE"]
        args += ["LIMIT", offset, -1 if limit is None else limit, "WITHSCORES"]
        with self._unavailable():
            raw = await self._conn().client.execute_command("ZRANGE", self._k("z", key), *args)
        pairs = raw if raw and isinstance(raw[0], list | tuple) else list(zip(raw[::2], raw[1::2], strict=True))
        return [(m.decode(), float(s)) for m, s in pairs]

    # ---- cache ------------------------------------------------------------------------------------------
    async def cache_get(self, key: str) -> bytes | None:
        return _opt(await self._script("cache_get", [], [self.prefix, key]))

    async def cache_put(self, key: str, value: bytes, ttl_s: float, max_bytes: int) -> None:
        with self._unavailable():
            await self._conn().scripts["cache_put"](keys=[], args=[self.prefix, key, value, _ms(ttl_s), max_bytes])

    async def cache_bytes(self) -> int:
        with self._unavailable():
            return int(await self._conn().scripts["cache_bytes"](keys=[], args=[self.prefix]))

    # ---- blobs ------------------------------------------------------------------------------------------
    def _blob_key(self, name: str) -> str:
        if not BLOB_NAME_RE.match(name) or ".." in name:
            raise ValueError(f"blob name {name!r}: letters, digits, '.', '_' and '-' only")
        return self._k("b", name)

    async def put_blob(self, name: str, data: bytes) -> None:
        key = self._blob_key(name)
        if len(data) > MAX_BLOB_BYTES:
            raise ValueError(f"blob {name}: {len(data)} bytes, more than the Redis state's {MAX_BLOB_BYTES} limit")
        with self._unavailable():
            await self._conn().client.set(key, data)  # one SET: the old blob or the new one, never half

    async def get_blob(self, name: str) -> bytes | None:
        key = self._blob_key(name)
        with self._unavailable():
            return _opt(await self._conn().client.get(key))

    async def delete_blob(self, name: str) -> None:
        key = self._blob_key(name)
        with self._unavailable():
            await self._conn().client.delete(key)

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def ping(self) -> None:
        with self._unavailable():
            await self._conn().client.ping()

    async def close(self) -> None:
        """Close every loop's connections: this loop's here, a running other loop's on that loop (a closed loop's
        are gone with it)."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        conns, self._conns = dict(self._conns), weakref.WeakKeyDictionary()
        for loop, conn in conns.items():
            if loop is here:
                await conn.close()
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(conn.close(), loop)


async def _evalsha(conn: AbstractConnection, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA on ``conn``; EVAL (which caches it) when the server does not know the script yet."""
    await conn.send_packed_command(conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args),
                                   check_health=False)
    try:
        return await conn.read_response()
    except NoScriptError:
        await conn.send_packed_command(conn.pack_command("EVAL", script.script, len(keys), *keys, *args),
                                       check_health=False)
        return await conn.read_response()


def _counter_result(op: CounterOp, raw: Any) -> Any:
    """One op's reply from the ``counters`` script (decoded JSON), as its primitive returns it."""
    if isinstance(op, Incr | HIncr):
        return int(raw)
    if isinstance(op, GetInt):
        try:
            return int(raw) if isinstance(raw, str) else 0  # false: absent
        except ValueError:  # a value, not a counter (as get_int)
            return 0
    if isinstance(op, ZAdd):
        return None
    pairs = zip(raw[::2], raw[1::2], strict=True) if raw else ()  # cjson writes an empty list as {}
    if isinstance(op, HGetAll):
        return {_back(f).decode(): _back(v) for f, v in pairs}
    return [(_back(m).decode(), float(sc)) for m, sc in pairs]


def _back(text: str) -> bytes:
    """The bytes Redis held, from the JSON reply's text."""
    return text.encode("utf-8", "surrogateescape")


def _opt(raw: object) -> bytes | None:
    """A reply that is bytes or nil (the clients decode nothing: decode_responses is off)."""
    assert raw is None or isinstance(raw, bytes)
    return raw


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
