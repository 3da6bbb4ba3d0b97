"""Pure pieces of keys, limits and logs: key records and the keys file, the key ring's reloads, the rate
windows, the max-tokens cap, the loopback rule of serve and mirror, the JSON log format."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from server.errors import InvalidRequest, RateLimited
from server.ops.context import Principal, StreamUsage
from server.ops.keys import KeyRing, new_key, read_keys, write_keys
from server.ops.limits import cap_max_tokens
from server.ops.logs import JsonFormatter
from server.ops.ratelimit import RateLimiter
from server.state import open_state
from sync.cli import is_loopback
from sync.errors import ConfigError

pytestmark = pytest.mark.unit


def test_key_record_verifies_only_its_key() -> None:
    key, record = new_key("team", ("a", "b"), rpm=5)
    _, key_id, secret = key.split("_", 2)
    assert record.id == key_id and record.matches(secret) and not record.matches(secret[:-1] + "x")
    assert secret not in json.dumps(record.to_toml()) and record.hash != secret
    _, other = new_key("team")
    assert other.salt != record.salt and not other.matches(secret)
    with pytest.raises(ConfigError, match="key name"):
        new_key("bad name\n")


def test_keys_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    _, a = new_key("a", ("m",), rpm=1, tpm=2)
    _, b = new_key("b")
    write_keys(path, {a.id: a, b.id: b})
    assert read_keys(path) == {a.id: a, b.id: b}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    path.write_text('[[keys]]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"keys.toml: \[\[keys\]\] entry 1 is malformed"):
        read_keys(path)
    path.write_text('[[keys]]\nname = "x"\nid = "1"\nsalt = "00"\nhash = "0"\nrpm = 0\n')
    with pytest.raises(ConfigError, match="positive integer"):
        read_keys(path)


def test_key_ring_follows_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.toml"
    ring = KeyRing(path)
    assert not ring.seen and ring.find("anything") is None
    key, record = new_key("a")
    write_keys(path, {record.id: record})
    assert ring.find(key) == record and ring.seen
    assert ring.find(key[:-1] + ("x" if key[-1] != "x" else "y")) is None
    assert ring.find("hs_" + record.id) is None
    good = path.read_text()
    path.write_text(good + "\nnot toml [")
    os.utime(path, ns=(1, 1))
    with caplog.at_level(logging.ERROR):
        assert ring.find(key) == record  # a broken edit keeps the last good keys
    assert "previous keys stay in force" in caplog.text
    path.unlink()
    assert ring.find(key) is None and ring.seen  # gone: nothing passes, auth stays on


async def test_rate_limiter_windows(tmp_path: Path) -> None:
    """rpm and tpm over the sliding-window estimate of two minute counters in the real SQLite state."""
    store = open_state(None, tmp_path / "state.db")
    now = [100.0]  # 40 s into minute 1
    limiter = RateLimiter(clock=lambda: now[0], reserve=4)
    who = Principal("k", rpm=2, tpm=10)
    try:
        first = await limiter.admit(store, who)
        await limiter.admit(store, who)
        with pytest.raises(RateLimited, match="2 requests per minute") as e:
            await limiter.admit(store, who)
        assert e.value.retry_after == 50  # at 150 s the estimate is 2 * (1 - 30/60) = 1: room for one
        assert first is not None and first.reserved == 4
        await limiter.settle(store, who, first, 10)  # used 10 (reserved 4): minute 1 holds 10 + 4 reserved
        now[0] += 30  # 10 s into minute 2: minute 1 weighs 5/6: requests 2 * 5/6 + 1 > 2
        with pytest.raises(RateLimited, match="2 requests per minute"):
            await limiter.admit(store, who)
        now[0] += 20  # 30 s into minute 2: 2 * 1/2 + 1 <= 2 requests, but tokens 14 * 1/2 = 7 < 10: admitted
        assert await limiter.admit(store, who) is not None
        limiter_b = RateLimiter(clock=lambda: now[0], reserve=4)  # another gateway on the same store
        with pytest.raises(RateLimited, match="2 requests per minute"):
            await limiter_b.admit(store, who)
        await limiter.admit(store, Principal("free"))  # no limits: never refused
    finally:
        await store.close()


def test_cap_max_tokens() -> None:
    fields = ("max_tokens", "max_completion_tokens")
    assert cap_max_tokens({"max_tokens": 5}, None, fields) is None
    assert cap_max_tokens({"max_tokens": 5}, 8, fields) is None
    assert cap_max_tokens({"prompt": "x"}, 8, fields) == {"prompt": "x", "max_tokens": 8}
    with pytest.raises(InvalidRequest, match="`max_completion_tokens` must be <= 8"):
        cap_max_tokens({"max_completion_tokens": 9}, 8, fields)


def test_stream_usage_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.ops import context

    ctx = context.RequestContext("r", "r")
    token = context.begin(ctx)
    try:
        usage = StreamUsage()
        usage.feed(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\ndata: {"choices":[{"delta":{"con')
        usage.feed(b'tent":"a"}}]}\n\ndata: {"choices":[{"text":"b"}]}\n\ndata: [DONE]\n\n')
        usage.close()
        assert (ctx.tokens_in, ctx.tokens_out) == (None, 2)
        usage = StreamUsage()
        usage.feed(b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":6}}\n\n')
        usage.close()
        assert (ctx.tokens_in, ctx.tokens_out) == (4, 8)
    finally:
        context.end(token)


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_json_log_lines() -> None:
    record = logging.LogRecord("hubserve.access", logging.INFO, __file__, 1, "POST %s", ("/generate",), None)
    record.request = {"request_id": "r1", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "POST /generate" and line["request_id"] == "r1" and line["level"] == "info"
