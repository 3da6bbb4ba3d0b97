"""What only the Redis backend promises: several clients (gateway replicas) see one state, lose no increment and
agree on a lease; a prefix keeps a shared Redis safe; Redis down or restarted is a 503 StateUnavailable whose
message never carries the password, and the store reconnects by itself once Redis is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from server.state import StateStore, StateUnavailable, open_state, redis_store
from tests.fixtures.redis_server import RedisServer, free_port, require_redis

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(loop_scope="function")
async def two(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[tuple[StateStore, ...]]:
    """Two stores over one URL: what two gateway replicas hold."""
    url = redis_server.url_for(request.node.name)
    a, b = open_state(url, Path("unused")), open_state(url, Path("unused"))
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_two_clients_see_one_state(two: tuple[StateStore, StateStore]) -> None:
    a, b = two
    await a.incr("budget:k1:day", 40, ttl_s=60)
    assert await b.incr("budget:k1:day", 2) == 42
    assert await b.add("idem:k1:x", b"answer", ttl_s=60)
    assert not await a.add("idem:k1:x", b"another")
    assert await a.get("idem:k1:x") == b"answer"
    await a.hset("batch:1", {"status": b"in_progress"})
    await a.zadd("batches", "batch:1", 1.5)
    assert await b.hgetall("batch:1") == {"status": b"in_progress"}
    assert await b.zrange("batches") == [("batch:1", 1.5)]
    await a.cache_put("commit:body", b"cached answer", ttl_s=60, max_bytes=1000)
    assert await b.cache_get("commit:body") == b"cached answer" and await b.cache_bytes() == 13
    await b.put_blob("file-1", b"{}\n")
    assert await a.get_blob("file-1") == b"{}\n"


async def test_concurrent_increments_from_two_clients_lose_none(two: tuple[StateStore, StateStore]) -> None:
    a, b = two
    await asyncio.gather(*(s.incr("rpm", 1, ttl_s=60) for s in (a, b) for _ in range(150)))
    assert await a.get_int("rpm") == await b.get_int("rpm") == 300


async def test_a_lease_held_by_one_is_refused_to_the_other(two: tuple[StateStore, StateStore]) -> None:
    a, b = two
    assert await a.lease("batch:1:runner", "gw-a", 0.4)
    assert not await b.lease("batch:1:runner", "gw-b", 10)
    await b.release("batch:1:runner", "gw-b")  # not its lease
    assert await a.lease("batch:1:runner", "gw-a", 0.4)
    await asyncio.sleep(0.55)  # gw-a stopped renewing: the lease is free
    assert await b.lease("batch:1:runner", "gw-b", 10)
    assert not await a.lease("batch:1:runner", "gw-a", 10)


async def test_expired_cache_entries_leave_the_byte_total(two: tuple[StateStore, StateStore]) -> None:
    a, b = two
    await a.cache_put("short", bytes(50), ttl_s=0.2, max_bytes=1000)
    await b.cache_put("long", bytes(70), ttl_s=60, max_bytes=1000)
    assert await a.cache_bytes() == 120
    await asyncio.sleep(0.3)
    assert await b.cache_bytes() == 70
    await a.cache_put("long", bytes(20), ttl_s=60, max_bytes=1000)  # replaced, counted once
    assert await b.cache_bytes() == 20


async def test_a_prefix_keeps_a_shared_redis_apart(redis_server: RedisServer) -> None:
    one, other = open_state(redis_server.url_for("one"), Path("x")), open_state(redis_server.url_for("two"), Path("x"))
    try:
        await one.incr("c", 5)
        await one.hset("h", {"f": b"v"})
        await one.cache_put("k", b"v", ttl_s=60, max_bytes=100)
        assert await other.get_int("c") == 0 and await other.hgetall("h") == {} and await other.cache_get("k") is None
        assert await other.cache_bytes() == 0
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            prefix = one.prefix  # type: ignore[attr-defined]
            keys = [k.decode() async for k in raw.scan_iter(match=f"{prefix}*")]
            assert keys and all(k.startswith(prefix) for k in keys)
        finally:
            await raw.aclose()
    finally:
        await one.close()
        await other.close()


async def test_redis_down_is_a_503_without_the_password_and_a_restart_reconnects(tmp_path: Path) -> None:
    require_redis()
    server = RedisServer.start(tmp_path / "redis")
    store = open_state(server.url, tmp_path / "unused.db")
    try:
        await store.incr("c")
        assert server.password not in store.url and "***" in store.url
        server.stop()
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as down:
            await store.incr("c")
        assert time.monotonic() - started < 5  # fails fast: a request is not held for long
        assert down.value.status == 503 and down.value.code == "state_unavailable"
        assert server.password not in str(down.value) and "127.0.0.1" in str(down.value)
        with pytest.raises(StateUnavailable):
            await store.ping()
        server.run()  # back on the same port (empty: this test server keeps nothing on disk)
        assert await store.incr("c") == 1
        await store.ping()
    finally:
        await store.close()
        server.stop()


async def test_an_unreachable_or_malformed_url_is_state_unavailable(tmp_path: Path) -> None:
    store = open_state(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0", tmp_path / "unused.db")
    try:
        with pytest.raises(StateUnavailable) as e:
            await store.get("k")
        assert "hunter2" not in str(e.value) and "***" in str(e.value)
    finally:
        await store.close()
    with pytest.raises(StateUnavailable) as bad:
        open_state("redis://:hunter2-secret@127.0.0.1:notaport/0", tmp_path / "unused.db")
    assert "hunter2" not in str(bad.value)


async def test_blobs_are_capped_and_named_safely(
    two: tuple[StateStore, StateStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = two
    monkeypatch.setattr(redis_store, "MAX_BLOB_BYTES", 10)
    with pytest.raises(ValueError, match="10"):
        await a.put_blob("big", bytes(11))
    with pytest.raises(ValueError):
        await a.put_blob("../escape", b"x")
    await a.put_blob("small", bytes(10))
    assert await a.get_blob("small") == bytes(10)
