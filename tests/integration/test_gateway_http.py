"""The gateway on a real loopback port (uvicorn) over scripted engines: a client that leaves cancels the
engine call, overload answers only 200/429 while /health answers and memory stays put, hostile headers and
paths get clean 4xx, and the request log holds no key and no prompt unless HUBSERVE_LOG_PROMPTS is on."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server.ops.logs import JsonFormatter
from tests.fixtures.gateway_app import CANARY, FLAT_KEY, EngineScript, build_app, make_keys, served

pytestmark = pytest.mark.integration


def _wait(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_engine_call(tmp_path: Path, stream: bool) -> None:
    script = EngineScript()
    app, registry = build_app(tmp_path, script)
    body = {"model": "gen", "prompt": "slow", "stream": stream}
    with served(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {FLAT_KEY}"}, timeout=1)
        assert _wait(lambda: script.cancelled == 1), "the engine call went on after the client left"
        assert _wait(lambda: registry.get("gen").in_flight == 0)
    assert script.finished == 0


async def _stream(client: httpx.AsyncClient, url: str) -> int:
    body = {"model": "gen", "prompt": "hi", "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for _ in r.aiter_bytes():
            pass
        return r.status_code


def test_overload_answers_200_or_429_and_stays_up(tmp_path: Path) -> None:
    in_flight, queued = 2, 2
    script = EngineScript(chunks=5, pause_s=0.05)
    app, registry = build_app(
        tmp_path, script, max_concurrent_requests=in_flight, max_queued_requests=queued, queue_timeout_s=0.2
    )
    rss: list[int] = []
    me = psutil.Process()

    async def wave(client: httpx.AsyncClient, url: str) -> list[int | str]:
        n = 4 * (in_flight + queued)  # 4x more concurrent streams than the server holds
        tasks = [asyncio.create_task(_stream(client, url)) for _ in range(n)]
        health = await client.get(f"{url}/health")  # answered while the streams run
        out: list[int | str] = [*await asyncio.gather(*tasks, return_exceptions=True)]  # type: ignore[list-item]
        out.append(f"health {health.status_code}")
        return out

    async def run(url: str) -> list[int | str]:
        limits = httpx.Limits(max_connections=100)
        headers = {"Authorization": f"Bearer {FLAT_KEY}"}
        statuses: list[int | str] = []
        async with httpx.AsyncClient(limits=limits, headers=headers, timeout=30) as client:
            for _ in range(5):
                statuses += await wave(client, url)
                rss.append(me.memory_info().rss)
        return statuses

    with served(app) as url:
        statuses = asyncio.run(run(url))
    codes = [s for s in statuses if isinstance(s, int)]
    assert statuses.count("health 200") == 5 and len(codes) + 5 == len(statuses), statuses
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, statuses
    assert registry.get("gen").in_flight == 0
    assert rss[-1] - rss[1] < 64 * 1024**2, rss  # no growth with the number of requests served


def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_hostile_headers_and_paths_get_clean_4xx(tmp_path: Path) -> None:
    app, _ = build_app(tmp_path, EngineScript())
    auth = f"Authorization: Bearer {FLAT_KEY}\r\n".encode()
    with served(app) as url:
        # a bare CR inside X-Request-Id (header splitting attempt): refused by the HTTP parser, nothing injected
        answer = _raw(
            url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Request-Id: a\rSet-Cookie: x=1\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400") and b"set-cookie" not in answer.lower(), answer[:300]
        # CRLF makes it a second header line: the id stays "a", and the extra header is not echoed
        answer = _raw(url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Request-Id: a\r\nX-Evil: 1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and b"x-request-id: a\r\n" in answer.lower()
        assert b"x-evil" not in answer.lower()
        huge = b"X-Big: " + b"a" * 200_000 + b"\r\n"
        answer = _raw(url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + huge + b"\r\n")
        assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 431"), answer[:100]
        headers = {"Authorization": f"Bearer {FLAT_KEY}"}
        with httpx.Client(base_url=url, headers=headers) as client:
            for path in (
                "/models/../../etc/passwd/info",
                "/models/..%2F..%2Fetc%2Fpasswd/info",
                "/models/%2e%2e/%2e%2e/etc/passwd",
                "/models/org%0d%0aSet-Cookie:%20x=1/info",
                "/models/%08%1b%F0%B4%B8%8C/info",  # control bytes in a repo id quoted in X-Error-Message
                "/v1/models/..%2f..%2fetc%2fpasswd",
            ):
                r = client.request("POST" if path.endswith("passwd") else "GET", path)
                assert 400 <= r.status_code < 500, (path, r.status_code)
                assert "set-cookie" not in r.headers and "\n" not in r.headers.get("x-error-message", ""), path
            r = client.get("/v1/models", headers={"X-Request-Id": "x" * 10_000})
            assert r.status_code == 400


def _capture() -> tuple[logging.Handler, list[str]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    return handler, lines


@pytest.mark.parametrize("log_prompts", [False, True])
def test_request_log_lines(tmp_path: Path, log_prompts: bool) -> None:
    keys = make_keys(tmp_path / "keys.toml")
    app, _ = build_app(tmp_path, EngineScript(), log_prompts=log_prompts)
    handler, lines = _capture()
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with served(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            for key, path, body in (
                (keys.all, "/v1/completions", {"model": "gen", "prompt": CANARY, "max_tokens": 2}),
                (keys.gen_only, "/generate", {"inputs": CANARY, "parameters": {"max_new_tokens": 2}}),
                (FLAT_KEY, "/models/org/emb", {"inputs": [CANARY]}),
                (
                    keys.emb_only,
                    "/v1/chat/completions",
                    {"model": "gen", "messages": [{"role": "user", "content": CANARY}]},
                ),
                ("hs_wrong", "/v1/completions", {"model": "gen", "prompt": CANARY}),
            ):
                client.post(
                    path, json=body, headers={"Authorization": f"Bearer {key}", "X-Request-Id": f"rid-{len(path)}"}
                )
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = "\n".join(lines)
    for secret in (keys.all, keys.gen_only, keys.emb_only, FLAT_KEY, "hs_wrong", keys.all.split("_", 2)[2]):
        assert secret not in text
    assert (CANARY in text) is log_prompts
    access = [json.loads(line) for line in lines if '"hubserve.access"' in line]
    by_route = {a["route"]: a for a in access}
    assert len(access) == 5, access
    gen = by_route["/generate"]
    assert gen["key"] == "gen-only" and gen["model"] == "gen" and gen["commit"] == "c" * 40
    assert gen["status"] == 200 and gen["request_id"] == "rid-9" and gen["tokens_out"] == 4
    assert {"queue_s", "ttft_s", "latency_s", "tokens_in"} <= set(gen)
    assert by_route["/models/{repo_id}"]["model"] == "emb" and by_route["/models/{repo_id}"]["tokens_in"] == 2
    assert by_route["/models/{repo_id}"]["key"].startswith("key-")
    chat = by_route["/v1/chat/completions"]
    assert chat["status"] == 404 and chat["key"] == "emb-only"  # a model it may not use reads as unknown
    assert [a["status"] for a in access if a["route"] == "/v1/completions"] == [200, 401]
