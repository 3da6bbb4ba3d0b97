"""Pure pieces of key budgets: --expires and --scopes parsing, keys files without the new fields, the UTC day and
month windows, the budget reservations and in-flight slots on the real SQLite state, input-token queries."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from server.errors import BudgetExceeded, TooManyConcurrent
from server.ops.budgets import Budgets, Slots, day_window, month_window
from server.ops.context import Principal
from server.ops.input_cap import tokenize_query
from server.ops.keys import DEFAULT_SCOPES, new_key, parse_expires, parse_scopes, read_keys, write_keys
from server.state import open_state
from sync.errors import ConfigError

pytestmark = pytest.mark.unit
NOW = dt.datetime(2026, 12, 31, 23, 0, tzinfo=dt.UTC)


def test_expires_and_scopes_parse() -> None:
    assert parse_expires("30d", NOW) == "2027-01-30T23:00:00+00:00"
    assert parse_expires("12h", NOW) == "2027-01-01T11:00:00+00:00"
    assert parse_expires("90m", NOW) == "2027-01-01T00:30:00+00:00"
    assert parse_expires("2027-02-01", NOW) == "2027-02-01T00:00:00+00:00"
    assert parse_expires("2027-02-01T10:00:00+02:00", NOW) == "2027-02-01T08:00:00+00:00"
    with pytest.raises(ConfigError, match="--expires 'soon'"):
        parse_expires("soon", NOW)
    assert parse_scopes("admin, inference") == ("inference", "admin")
    with pytest.raises(ConfigError, match="--scopes 'root'"):
        parse_scopes("root")


def test_old_keys_files_read_with_default_scopes_and_new_fields_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "old"\nid = "0123456789ab"\nsalt = "00"\nhash = "0"\n')
    [old] = read_keys(path).values()
    assert old.scopes == DEFAULT_SCOPES and old.daily_tokens is None and old.expires is None and not old.expired()
    _, record = new_key("new", daily_tokens=5, monthly_tokens=6, max_concurrent=1, max_input_tokens=9,
                        expires="2020-01-01T00:00:00+00:00", scopes=("mirror",))
    write_keys(path, {record.id: record})
    assert read_keys(path) == {record.id: record} and record.expired()
    path.write_text(path.read_text().replace('"mirror"', '"root"'))
    with pytest.raises(ConfigError, match="scopes must be a list of"):
        read_keys(path)


def test_utc_windows() -> None:
    assert day_window(NOW) == ("2026-12-31", dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
    assert month_window(NOW) == ("2026-12", dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
    assert month_window(dt.datetime(2027, 2, 10, tzinfo=dt.UTC))[1] == dt.datetime(2027, 3, 1, tzinfo=dt.UTC)


async def test_budget_reserves_settles_and_resets_at_midnight(tmp_path: Path) -> None:
    store = open_state(None, tmp_path / "state.db")
    now = [NOW.timestamp()]
    budgets = Budgets(reserve=4, clock=lambda: now[0])
    who = Principal("k", daily_tokens=10)
    try:
        first = await budgets.admit(store, who)
        second = await budgets.admit(store, who)
        third = await budgets.admit(store, who)  # 8 reserved before it: under 10, admitted
        with pytest.raises(BudgetExceeded, match="daily budget of 10") as e:
            await budgets.admit(store, who)  # 12 reserved
        assert e.value.retry_after == 3600 and e.value.code == "daily_tokens_exceeded"
        for taken in (first, second, third):
            await budgets.settle(store, taken, 1)
        await budgets.admit(store, who)  # 3 used + 4 reserved
        await budgets.admit(store, who)  # 7 < 10
        with pytest.raises(BudgetExceeded):
            await budgets.admit(store, who)  # 11
        now[0] += 3600  # a new UTC day (and month)
        assert await budgets.admit(store, Principal("k", daily_tokens=1, monthly_tokens=1))
    finally:
        await store.close()


async def test_slots_sum_over_live_gateways_only(tmp_path: Path) -> None:
    store = open_state(None, tmp_path / "state.db")
    now = [1000.0]
    a, b = Slots(lease_s=5, clock=lambda: now[0]), Slots(lease_s=5, clock=lambda: now[0])
    who = Principal("k", max_concurrent=1)
    try:
        assert await a.take(store, who)
        with pytest.raises(TooManyConcurrent, match="max_concurrent"):
            await b.take(store, who)
        now[0] += 6  # a stopped beating (its clock ran past the lease without a renewal): as if killed
        assert await b.take(store, who)
        await b.release(store, "k")
        assert await a.in_flight(store, "k") == 1  # a itself still counts its own slot
        await a.release(store, "k")
        assert await b.in_flight(store, "k") == 0 and not await b.take(store, Principal("free"))
    finally:
        await store.close()


def test_input_queries_per_family() -> None:
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a b"}]}], "system": "s"}
    assert tokenize_query(chat) == ({"messages": [{"role": "system", "content": "s"}, {"role": "user",
                                                                                      "content": "a b"}],
                                     "add_generation_prompt": True}, 0)
    assert tokenize_query({"prompt": ["x", "y"]}) == ({"prompt": "x\ny"}, 0)
    assert tokenize_query({"prompt": [1, 2, 3]}) == (None, 3)
    assert tokenize_query({"inputs": {"question": "q", "context": "c"}}) == ({"prompt": "q\nc"}, 0)
    assert tokenize_query({"input": [{"role": "user", "content": "r"}], "instructions": "i"})[0] == {
        "messages": [{"role": "system", "content": "i"}, {"role": "user", "content": "r"}],
        "add_generation_prompt": True}
    assert tokenize_query({"model": "m"}) == (None, 0)


async def test_admission_and_settling_are_one_state_call_each(tmp_path: Path) -> None:
    """Every limit of a key (rpm, tpm, both budgets, max_concurrent, usage) in one ``counters`` call at admission,
    one more only when refused, one at the end: counted on the real SQLite store."""
    from starlette.requests import Request

    from server.errors import RateLimited
    from server.ops import context
    from server.ops.auth import KeyChecker
    from server.ops.context import RequestContext
    from server.ops.usage import usage_of
    from server.state.sqlite_store import SQLiteStore

    class Counting(SQLiteStore):
        calls: list[str] = []

        def __getattribute__(self, name: str) -> object:
            if name in ("counters", "incr", "get_int", "hincr", "hgetall", "zadd", "zrange", "get", "set"):
                type(self).calls.append(name)
            return super().__getattribute__(name)

    store = Counting(tmp_path / "state.db")
    checker = KeyChecker(frozenset({"0" * 64}))
    who = Principal("k", rpm=2, tpm=10**6, daily_tokens=10**6, monthly_tokens=10**6, max_concurrent=5)
    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []})
    try:
        contexts = []
        for n in range(3):
            ctx = RequestContext(f"r{n}", f"r{n}")
            token = context.begin(ctx)
            try:
                Counting.calls.clear()
                if n < 2:
                    await checker.admit(request, store, who)
                    assert Counting.calls == ["counters"]
                    contexts.append(ctx)
                else:
                    with pytest.raises(RateLimited):
                        await checker.admit(request, store, who)
                    assert Counting.calls == ["counters", "counters"]  # counted, then all given back
            finally:
                context.end(token)
        for ctx in contexts:
            ctx.tokens_in, ctx.tokens_out = 3, 4
            Counting.calls.clear()
            await checker.settle(store, ctx)
            assert Counting.calls == ["counters"]
        assert await checker.slots.in_flight(store, "k") == 0
        [day] = await usage_of(store, "k")
        assert (day.requests, day.tokens_in, day.tokens_out) == (2, 6, 8)  # the refusal is not usage
    finally:
        await store.close()


async def test_a_request_cancelled_while_its_counts_run_holds_nothing_after(tmp_path: Path) -> None:
    """A client gone (or a time limit) while admission's counts are on their way to the state: they land anyway,
    and are given back once they do, so the key keeps no slot, budget or usage for a request that never ran."""
    import asyncio

    from starlette.requests import Request

    from server.ops import context
    from server.ops.auth import KeyChecker
    from server.ops.context import RequestContext
    from server.ops.usage import usage_of

    store = open_state(None, tmp_path / "state.db")
    checker = KeyChecker(frozenset({"0" * 64}))
    who = Principal("k", daily_tokens=5_000, max_concurrent=1)
    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []})

    async def admitted() -> RequestContext:
        ctx = RequestContext("r", "r")
        token = context.begin(ctx)
        try:
            await checker.admit(request, store, who)
        finally:
            context.end(token)
        return ctx

    try:
        for _ in range(3):
            task = asyncio.ensure_future(admitted())
            await asyncio.sleep(0)  # it sent its counts and waits for them
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        deadline = asyncio.get_running_loop().time() + 10
        while await checker.slots.in_flight(store, "k"):
            assert asyncio.get_running_loop().time() < deadline, "the cancelled admissions were not given back"
            await asyncio.sleep(0.01)
        assert await usage_of(store, "k") == []  # no request counted
        ctx = await admitted()  # max_concurrent 1: no slot is left taken; the daily budget has its whole room
        assert ctx.admission is not None
        await checker.settle(store, ctx)
        [day] = await usage_of(store, "k")
        assert day.requests == 1
    finally:
        await store.close()
