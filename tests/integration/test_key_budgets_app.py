"""Key budgets, caps, expiry and scopes through the real gateway on loopback (a synthetic engine process), with the
stock `openai` and `anthropic` clients: each limit answered in the family's shape with a message naming it;
budgets across an app restart and across two gateways on one state file; a killed gateway's slots coming back;
`hubserve keys add|update|list|usage` as real subprocesses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from server.ops.budgets import Slots
from server.ops.keys import KeyRecord, new_key, update_keys
from server.state import open_state
from tests.fixtures.key_gateway import LEASE_S, gateway

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
HI: Any = [{"role": "user", "content": "hi"}]  # the SDKs' message types, as plain JSON


def add_key(root: Path, name: str, **limits: Any) -> str:
    key, record = new_key(name, **limits)

    def add(records: dict[str, KeyRecord]) -> dict[str, KeyRecord]:
        return {**records, record.id: record}

    update_keys(root / "keys.toml", add)
    return key


def oai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def claude(url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=30)


def stream_chat(url: str, key: str, tokens: int, **extra: Any) -> int:
    """A streamed chat completion of ``tokens`` tokens out (the synthetic engine sends one per chunk)."""
    chunks = oai(url, key).chat.completions.create(model="gen", messages=HI, max_tokens=tokens, stream=True,
                                                   extra_body=extra)
    return sum(1 for _ in chunks)


def hubserve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_daily_budget_in_each_family_and_across_a_restart(tmp_path: Path) -> None:
    key = add_key(tmp_path, "daily", daily_tokens=10)
    with gateway(tmp_path) as url:
        assert stream_chat(url, key, 6) == 6
        assert stream_chat(url, key, 6) == 6  # 6 used < 10: admitted; it crosses the budget and finishes
        with pytest.raises(openai.RateLimitError) as e:
            stream_chat(url, key, 1)
        assert "daily budget of 10 tokens (daily_tokens)" in e.value.message
        assert e.value.code == "daily_tokens_exceeded" and e.value.type == "insufficient_quota"
        headers = e.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 86400 and headers["x-should-retry"] == "false"
        with pytest.raises(anthropic.RateLimitError, match="daily budget of 10 tokens"):
            claude(url, key).messages.create(model="gen", max_tokens=1, messages=HI)
        tgi = httpx.post(f"{url}/generate", json={"inputs": "hi"}, headers={"Authorization": f"Bearer {key}"})
        assert tgi.status_code == 429 and tgi.json()["error_type"] == "overloaded" and "daily" in tgi.json()["error"]
        hub = httpx.post(f"{url}/models/gen", json={"inputs": "hi"}, headers={"Authorization": f"Bearer {key}"})
        assert hub.status_code == 429 and "daily budget" in hub.headers["x-error-message"]
    # a new app on the same state file: the day's tokens are still spent
    with gateway(tmp_path) as url, pytest.raises(openai.RateLimitError, match="daily budget"):
        stream_chat(url, key, 1)
    usage = hubserve("keys", "usage", "daily", "--json", "--keys-file", str(tmp_path / "keys.toml"))
    assert usage.returncode == 0, usage.stderr
    [report] = json.loads(usage.stdout)["keys"]
    assert [(d["requests"], d["tokens_out"]) for d in report["days"]] == [(2, 12)]  # refusals are not usage
    assert report["month"]["tokens"] == 12 and report["month"]["daily_tokens"] == 10


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_monthly_budget_rpm_and_tpm_hold_across_two_gateways(tmp_path: Path, backend: str,
                                                             request: pytest.FixtureRequest) -> None:
    """Two gateways on one state: the state file both open, or the session's real redis-server (a prefix of its own)."""
    shared = {"state_url": request.getfixturevalue("redis_server").url_for("budgets")} if backend == "redis" else {}
    monthly = add_key(tmp_path, "monthly", monthly_tokens=5)
    rpm = add_key(tmp_path, "rpm", rpm=2)
    with gateway(tmp_path, **shared) as a, gateway(tmp_path, **shared) as b:
        assert stream_chat(a, monthly, 6) == 6
        with pytest.raises(openai.RateLimitError, match=r"monthly budget of 5 tokens \(monthly_tokens\)") as e:
            stream_chat(b, monthly, 1)
        assert e.value.code == "monthly_tokens_exceeded"
        assert oai(a, rpm).models.list().data and oai(b, rpm).models.list().data
        with pytest.raises(openai.RateLimitError, match="2 requests per minute"):
            oai(a, rpm).models.list()


def test_expired_key_and_missing_scope(tmp_path: Path) -> None:
    expired = add_key(tmp_path, "old", expires="2020-01-01T00:00:00+00:00")
    batch_only = add_key(tmp_path, "batcher", scopes=("batch",))
    admin = add_key(tmp_path, "ops", scopes=("admin",))
    with gateway(tmp_path) as url:
        with pytest.raises(openai.AuthenticationError, match="key `old` expired at 2020-01-01T00:00:00"):
            oai(url, expired).models.list()
        with pytest.raises(anthropic.AuthenticationError, match="expired at"):
            claude(url, expired).messages.create(model="gen", max_tokens=1, messages=HI)
        with pytest.raises(openai.PermissionDeniedError, match="lacks the `inference` scope") as e:
            stream_chat(url, batch_only, 1)
        assert e.value.code == "scope_not_allowed"
        with pytest.raises(anthropic.PermissionDeniedError, match="lacks the `inference` scope"):
            claude(url, batch_only).messages.create(model="gen", max_tokens=1, messages=HI)
        reload = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {admin}"})
        assert reload.status_code == 404 and "does not follow its manifest" in reload.text  # past auth: watch off
        denied = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {batch_only}"})
        assert denied.status_code == 403 and "lacks the `admin` scope" in denied.text
        assert httpx.post(f"{url}/admin/reload").status_code == 401
        with pytest.raises(openai.PermissionDeniedError, match="`inference` scope"):
            oai(url, admin).models.list()


def test_no_admin_key_and_no_token_keeps_admin_routes_404(tmp_path: Path) -> None:
    key = add_key(tmp_path, "tenant")  # default scopes: inference, batch
    with gateway(tmp_path) as url:
        assert httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {key}"}).status_code == 404


def test_max_input_tokens_is_refused_before_running(tmp_path: Path) -> None:
    key = add_key(tmp_path, "short", max_input_tokens=5)
    with gateway(tmp_path) as url:
        assert stream_chat(url, key, 2) == 2  # "hi": 1 token
        long: Any = [{"role": "user", "content": "one two three four five six"}]
        with pytest.raises(openai.BadRequestError, match=r"6 tokens, over the limit of 5 \(max_input_tokens\)") as e:
            oai(url, key).chat.completions.create(model="gen", messages=long, max_tokens=1)
        assert e.value.code == "max_input_tokens_exceeded"
        with pytest.raises(anthropic.BadRequestError, match="max_input_tokens"):
            claude(url, key).messages.create(model="gen", max_tokens=1, messages=long, system="be brief")
        with pytest.raises(openai.BadRequestError, match="max_input_tokens"):
            oai(url, key).completions.create(model="gen", prompt="a b c d e f g", max_tokens=1)


def test_max_concurrent_in_flight_and_freed_at_the_end(tmp_path: Path) -> None:
    key = add_key(tmp_path, "one-at-a-time", max_concurrent=1)
    with gateway(tmp_path) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(stream_chat, url, key, 2, delay=1.5)
        _wait_held(tmp_path, "one-at-a-time", slow)
        with pytest.raises(openai.RateLimitError, match=r"1 requests in flight, its limit \(max_concurrent\)") as e:
            stream_chat(url, key, 1)
        assert e.value.code == "max_concurrent_exceeded"
        with pytest.raises(anthropic.RateLimitError, match="max_concurrent"):
            claude(url, key).messages.create(model="gen", max_tokens=1, messages=HI)
        assert slow.result(timeout=30) == 2
        assert stream_chat(url, key, 1) == 1  # the slot came back when the stream ended


def test_a_killed_gateways_slots_come_back(tmp_path: Path) -> None:
    key = add_key(tmp_path, "pinned", max_concurrent=1)
    holder = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests/fixtures/key_gateway.py"), str(tmp_path)],
                              cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout is not None
        body = {"model": "gen", "messages": HI, "max_tokens": 1, "stream": True, "delay": 60}
        with gateway(tmp_path) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:  # both start meanwhile
            other = holder.stdout.readline().strip()
            held = pool.submit(httpx.post, f"{other}/v1/chat/completions", json=body, timeout=90,
                               headers={"Authorization": f"Bearer {key}"})
            _wait_held(tmp_path, "pinned", held)  # the other gateway holds the key's one slot (its heartbeat is alive)
            assert not held.done(), held.result()
            time.sleep(2 * LEASE_S)
            with pytest.raises(openai.RateLimitError, match="max_concurrent"):
                stream_chat(url, key, 1)  # still held: the heartbeat outlives many leases
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)
            killed = time.monotonic()
            while True:
                try:
                    assert stream_chat(url, key, 1) == 1
                    break
                except openai.RateLimitError:
                    assert time.monotonic() - killed < 10 * LEASE_S + 5, "the killed gateway's slot never came back"
                    time.sleep(LEASE_S / 3)
            with pytest.raises(httpx.TransportError):
                held.result(timeout=10)  # its gateway died under it
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)


def _wait_held(root: Path, name: str, held: concurrent.futures.Future[Any]) -> None:
    """Until ``held`` (a request of key ``name``) is in flight, as the shared state says (polling the gateway with
    that key would take its one slot itself, and could make ``held`` the one refused)."""
    deadline = time.monotonic() + 20
    while asyncio.run(_in_flight(root, name)) < 1:
        if held.done() or time.monotonic() > deadline:
            raise AssertionError(f"the slow request never took its slot: {held.done() and held.result()}")
        time.sleep(0.05)


async def _in_flight(root: Path, name: str) -> int:
    store = open_state(None, root / "state.db")
    try:
        return await Slots(LEASE_S).in_flight(store, name)
    finally:
        await store.close()


def test_keys_cli_add_update_list_usage(tmp_path: Path) -> None:
    keys_file = str(tmp_path / "keys.toml")
    added = hubserve("keys", "add", "team", "--daily-tokens", "100", "--monthly-tokens", "1000", "--max-concurrent",
                     "2", "--max-input-tokens", "50", "--expires", "30d", "--scopes", "inference,batch,mirror",
                     "--keys-file", keys_file)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    listed = hubserve("keys", "list", "--keys-file", keys_file).stdout
    assert "inference,batch,mirror" in listed and "100" in listed and "1000" in listed
    updated = hubserve("keys", "update", "team", "--daily-tokens", "7", "--clear", "max_input_tokens", "--no-expiry",
                       "--keys-file", keys_file)
    assert updated.returncode == 0, updated.stderr
    text = Path(keys_file).read_text()
    assert "daily_tokens = 7" in text and "max_input_tokens" not in text and "expires" not in text
    bad = hubserve("keys", "update", "team", "--scopes", "everything", "--keys-file", keys_file)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--scopes 'everything'" in bad.stderr
    missing = hubserve("keys", "update", "nobody", "--rpm", "1", "--keys-file", keys_file)
    assert missing.returncode == 2 and "no key named 'nobody'" in missing.stderr
    with gateway(tmp_path) as url:
        assert stream_chat(url, key, 3) == 3  # the updated key still works, under its new limits
        with pytest.raises(openai.RateLimitError, match="daily budget of 7"):
            stream_chat(url, key, 5) and stream_chat(url, key, 1)
    usage = hubserve("keys", "usage", "--keys-file", keys_file)
    assert usage.returncode == 0, usage.stderr
    assert "team" in usage.stdout and "of 1000" in usage.stdout
