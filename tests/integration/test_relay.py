"""The relay (server/proxy.py) over a real engine process on a Unix socket (tests/fixtures/sse_engine.py) and a
real gateway on loopback: streams byte for byte, JSON and error statuses as sent, an engine dying mid-stream,
a client leaving mid-stream. Both paths: the socket fast path and the generic httpx client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.registry import Registry
from server.settings import Settings
from tests.fixtures.sse_engine import CHUNK, DONE, SocketEngine

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY = "relay-key"


@pytest.fixture(scope="module")
def engine_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("engine")
    uds, aborted = tmp / "engine.sock", tmp / "aborted.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.sse_engine", "--uds", str(uds), "--chunks", "32",
         "--aborted", str(aborted)],
        cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not uds.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "synthetic engine did not start"
        time.sleep(0.05)
    yield uds, aborted
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module", params=[True, False], ids=["socket-path", "httpx-path"])
def gateway(request: pytest.FixtureRequest, engine_proc: tuple[Path, Path]) -> Iterator[str]:
    uds, _ = engine_proc
    engines = [SocketEngine(uds, fast_path=request.param), SocketEngine(uds.with_name("gone.sock"), name="gone")]
    settings = Settings(api_keys=KEY, watch=False, state_url=f"sqlite://{uds.parent / 'state.db'}")  # type: ignore[arg-type]
    app = create_app(settings, Registry(engines))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _post(url: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "synthetic", **body},
                      headers={"authorization": f"Bearer {KEY}"}, timeout=30)  # fmt: skip


def _in_flight(url: str) -> int:
    return int(httpx.get(f"{url}/health").json()["models"]["synthetic"]["in_flight"])


def test_stream_is_relayed_byte_for_byte(gateway: str) -> None:
    r = _post(gateway, stream=True, max_tokens=50)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-engine"] == "synthetic"
    assert r.content == CHUNK * 50 + DONE
    assert _in_flight(gateway) == 0


def test_json_answers_and_engine_statuses_pass_through(gateway: str) -> None:
    ok = _post(gateway, stream=False)
    assert (ok.status_code, ok.json()) == (200, {"ok": True})
    refused = _post(gateway, stream=False, status=400)
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "refused"
    assert _in_flight(gateway) == 0


def test_engine_dying_mid_stream_ends_it_with_one_error_event(gateway: str) -> None:
    r = _post(gateway, stream=True, max_tokens=50, fail_after=5)
    assert r.status_code == 200
    assert r.content.startswith(CHUNK * 5)
    events = [e for e in r.content[len(CHUNK) * 5 :].split(b"\n\n") if e]
    assert len(events) == 1 and b"[DONE]" not in r.content
    error = json.loads(events[0].removeprefix(b"data: "))["error"]
    assert error["code"] == "engine_unavailable"
    assert _in_flight(gateway) == 0


def test_client_leaving_mid_stream_aborts_the_engine_request(gateway: str, engine_proc: tuple[Path, Path]) -> None:
    aborted = engine_proc[1]
    before = aborted.read_text().count("\n") if aborted.exists() else 0
    body = {"model": "synthetic", "stream": True, "max_tokens": 10_000_000}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{gateway}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {KEY}"}) as r,  # fmt: skip
    ):
        assert next(r.iter_raw()).startswith(b"data: ")
    deadline = time.monotonic() + 20
    while (aborted.read_text().count("\n") if aborted.exists() else 0) == before or _in_flight(gateway):
        assert time.monotonic() < deadline, "the engine kept streaming to a client that left"
        time.sleep(0.1)


def test_engine_not_listening_is_503_in_the_family_shape(gateway: str) -> None:
    r = httpx.post(f"{gateway}/v1/completions", json={"model": "gone", "prompt": "x", "stream": True},
                   headers={"authorization": f"Bearer {KEY}"}, timeout=30)  # fmt: skip
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["type"]
