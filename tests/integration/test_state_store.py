"""The state primitives (server/state/base.py) behave the same on every backend: each test runs on the
embedded SQLite file and on a real redis-server (tests/fixtures/redis_server.py), when one is installed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from server.state import StateStore, open_state, redact_url
from server.state.base import GetInt, HGetAll, HIncr, Incr, ZAdd, ZRangeByScore
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(params=["sqlite", "redis"], loop_scope="function")  # Redis: the test's own loop
async def state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = open_state(server.url_for(request.node.name), tmp_path / "unused.db")
    else:
        store = open_state(None, tmp_path / "state.db")
    try:
        yield store
    finally:
        await store.close()


async def test_counters_add_expire_and_go_negative(state: StateStore) -> None:
    assert await state.incr("c") == 1
    assert await state.incr("c", 5) == 6
    assert await state.incr("c", -7) == -1
    assert await state.get_int("c") == -1
    assert await state.get_int("absent") == 0
    assert await state.incr("w", 2, ttl_s=0.3) == 2
    assert await state.incr("w", 1, ttl_s=100) == 3  # the window's expiry is set once, at creation
    await asyncio.sleep(0.45)
    assert await state.get_int("w") == 0
    assert await state.incr("w", 1, ttl_s=100) == 1


async def test_values_set_add_delete_and_ttl(state: StateStore) -> None:
    assert await state.get("k") is None
    assert await state.add("k", b"first", ttl_s=0.3)
    assert not await state.add("k", b"second")
    assert await state.get("k") == b"first"
    await asyncio.sleep(0.45)
    assert await state.get("k") is None
    assert await state.add("k", b"third")
    await state.set("k", b"\x00\xffbinary")
    assert await state.get("k") == b"\x00\xffbinary"
    await state.delete("k", "never-there")
    assert await state.get("k") is None


async def test_a_lease_has_one_owner_until_released_or_expired(state: StateStore) -> None:
    assert await state.lease("job", "gw-a", 0.4)
    assert not await state.lease("job", "gw-b", 10)
    assert await state.lease("job", "gw-a", 0.4)  # renewed
    await state.release("job", "gw-b")  # not the owner: nothing happens
    assert not await state.lease("job", "gw-b", 10)
    await asyncio.sleep(0.55)
    assert await state.lease("job", "gw-b", 10)
    await state.release("job", "gw-b")
    assert await state.lease("job", "gw-a", 10)


async def test_hashes(state: StateStore) -> None:
    await state.hset("h", {"a": b"1", "b": b"two"})
    assert await state.hsetnx("h", "c", b"3")
    assert not await state.hsetnx("h", "a", b"other")
    assert await state.hget("h", "a") == b"1"
    assert await state.hget("h", "zz") is None
    assert await state.hincr("h", "n", 4) == 4
    assert await state.hincr("h", "n", -1) == 3
    assert await state.hincr("h", "a", 1) == 2  # an integer field written by hset counts on
    assert await state.hgetall("h") == {"a": b"2", "b": b"two", "c": b"3", "n": b"3"}
    assert await state.hlen("h") == 4
    await state.hdelete("h")
    assert await state.hgetall("h") == {}


async def test_sorted_sets_page_filter_and_reverse(state: StateStore) -> None:
    for n, member in enumerate(["e", "a", "d", "b", "c"]):
        await state.zadd("z", member, float(n))
    await state.zadd("z", "a", 10.0)  # moved
    assert [m for m, _ in await state.zrange("z")] == ["e", "d", "b", "c", "a"]
    assert [m for m, _ in await state.zrange("z", reverse=True, limit=2)] == ["a", "c"]
    assert [m for m, _ in await state.zrange("z", offset=1, limit=2)] == ["d", "b"]
    assert await state.zrange("z", min_score=2, max_score=4) == [("d", 2.0), ("b", 3.0), ("c", 4.0)]
    await state.zrem("z", "d")
    assert len(await state.zrange("z")) == 4


async def test_the_cache_is_bounded_in_bytes_least_recently_used_first(state: StateStore) -> None:
    for n in range(4):
        await state.cache_put(f"k{n}", bytes(100), ttl_s=60, max_bytes=300)
        await asyncio.sleep(0.01)
    assert await state.cache_get("k0") is None  # the oldest went
    assert await state.cache_bytes() == 300
    assert await state.cache_get("k1") == bytes(100)  # k1 is now the most recently used
    await asyncio.sleep(0.01)
    await state.cache_put("k4", bytes(100), ttl_s=60, max_bytes=300)
    assert await state.cache_get("k2") is None and await state.cache_get("k1") is not None
    await state.cache_put("huge", bytes(301), ttl_s=60, max_bytes=300)
    assert await state.cache_get("huge") is None
    await state.cache_put("short", b"x", ttl_s=0.2, max_bytes=300)
    await asyncio.sleep(0.3)
    assert await state.cache_get("short") is None
    assert await state.cache_bytes() == 200  # k1 and k4: the expired entry is out of the total


async def test_blobs(state: StateStore) -> None:
    assert await state.get_blob("file-abc") is None
    await state.put_blob("file-abc", b"line 1\nline 2\n")
    assert await state.get_blob("file-abc") == b"line 1\nline 2\n"
    await state.delete_blob("file-abc")
    assert await state.get_blob("file-abc") is None


async def test_concurrent_increments_lose_none(state: StateStore) -> None:
    await asyncio.gather(*(state.incr("many") for _ in range(200)))
    assert await state.get_int("many") == 200


async def test_counters_run_a_list_of_ops_in_one_call(state: StateStore) -> None:
    """``counters``: each op as its own primitive, in order (a later op sees an earlier one's write)."""
    await state.hset("h", {"other": b"7"})
    assert await state.counters([]) == []
    assert await state.counters([
        Incr("c", 5, ttl_s=0.3), Incr("c", 2, ttl_s=100), GetInt("c"), GetInt("absent"),
        HIncr("h", "g1", 3), HIncr("h", "g1", -1), HGetAll("h"), HGetAll("no-hash"),
        ZAdd("z", "a", 1.0), ZAdd("z", "b", 2.5), ZAdd("z", "c", 4.0), ZRangeByScore("z", min_score=2.0),
        ZRangeByScore("z", max_score=2.5), ZRangeByScore("no-zset"),
    ]) == [5, 7, 7, 0, 3, 2, {"other": b"7", "g1": b"2"}, {}, None, None, None, [("b", 2.5), ("c", 4.0)],
           [("a", 1.0), ("b", 2.5)], []]
    assert await state.get_int("c") == 7 and await state.hget("h", "g1") == b"2"
    assert await state.zrange("z", min_score=4) == [("c", 4.0)]
    await state.set("text", b"not a number")
    assert await state.counters([GetInt("text"), Incr("c", -10)]) == [0, -3]
    await asyncio.sleep(0.45)  # the counter's expiry was set by its first incr, not moved by the second
    assert await state.counters([GetInt("c"), Incr("c", 1, ttl_s=100)]) == [0, 1]


async def test_concurrent_counter_lists_lose_none(state: StateStore) -> None:
    ops = [Incr("a"), HIncr("h", "f", 2), GetInt("a")]
    results = await asyncio.gather(*(state.counters(ops) for _ in range(100)))
    assert await state.get_int("a") == 100 and await state.hget("h", "f") == b"200"
    assert sorted(r[2] for r in results) == list(range(1, 101))  # each list ran whole: none saw another's half


def test_sqlite_state_survives_a_reopen_and_blob_names_are_checked(tmp_path: Path) -> None:
    async def run() -> None:
        store = open_state(f"sqlite://{tmp_path / 'x' / 'state.db'}", tmp_path / "unused.db")
        await store.incr("kept", 3)
        await store.put_blob("f1", b"data")
        with pytest.raises(ValueError):
            await store.put_blob("../escape", b"no")
        await store.close()
        again = open_state(f"sqlite://{tmp_path / 'x' / 'state.db'}", tmp_path / "unused.db")
        assert await again.get_int("kept") == 3 and await again.get_blob("f1") == b"data"
        await again.close()

    asyncio.run(run())
    assert (tmp_path / "x" / "state.db").stat().st_mode & 0o077 == 0
    assert not (tmp_path / "unused.db").exists()


def test_urls_are_redacted() -> None:
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://***@host:6379/0"
    assert redact_url("redis://user:s3cret@host/0") == "redis://user:***@host/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("unix:///run/redis.sock?db=1&password=s3cret") == "unix:///run/redis.sock?db=1&password=***"
    assert redact_url("rediss://u:p@ss@host/0?prefix=a") == "rediss://u:***@host/0?prefix=a"
