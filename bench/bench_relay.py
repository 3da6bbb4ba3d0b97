"""The gateway's cost per relayed SSE chunk: a synthetic engine streamed directly vs through hubserve's gateway.

No model: a synthetic OpenAI-compatible engine on a Unix socket answers every streaming
``/v1/chat/completions`` with ``--chunks`` chat-completion chunks (+ ``data: [DONE]``) as fast as it can, in
decode "steps" like a batching engine (each step writes one chunk to every open stream, then yields). The
gateway is hubserve's own app (``create_app``, auth on, uvicorn as ``hubserve serve`` runs it) with one engine
bound to that socket, in its own process. One driver process opens ``concurrency`` streams at a time, first
directly on the engine's socket, then through the gateway, and reports: chunks/s for both and their ratio,
added time to first chunk (p50/p99), and the gateway process's CPU time (user+system, psutil) per relayed
chunk.

    .venv/bin/python bench/bench_relay.py --concurrency 1,64,256 --chunks 256 --waves 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.sse_engine import MODEL, STREAMS, SocketEngine  # noqa: E402

API_KEY = "bench-relay-key"
MARK = b"data: "


def serve_gateway(path: str, port: int, fast_path: bool) -> None:
    """hubserve's app with one READY engine on the synthetic engine's socket, run as `hubserve serve` runs it."""
    import uvicorn

    from server.app import create_app
    from server.registry import Registry
    from server.settings import Settings

    settings = Settings(api_keys=API_KEY, max_concurrent_requests=4096, log_level="warning", watch=False)  # type: ignore[arg-type]
    app = create_app(settings, Registry([SocketEngine(Path(path), 4096, fast_path)]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, log_level="warning", backlog=2048)


# ---- the driver --------------------------------------------------------------------------------------------
@dataclass
class Result:
    chunks: int
    seconds: float
    ttft_ms: list[float]

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds


APIS = {  # --api name -> route, body of one streamed request
    "chat": ("/v1/chat/completions", lambda n: {"max_tokens": n, "messages": [{"role": "user", "content": "hi"}]}),
    "responses": ("/v1/responses", lambda n: {"max_output_tokens": n, "input": "hi"}),
    "messages": ("/v1/messages", lambda n: {"max_tokens": n, "messages": [{"role": "user", "content": "hi"}]}),
}


def _request(chunks: int, auth: bool, api: str = "chat") -> bytes:
    path, make = APIS[api]
    body = json.dumps({"model": MODEL, "stream": True, **make(chunks)}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"accept: text/event-stream\r\ncontent-length: {len(body)}\r\n"
        + (f"authorization: Bearer {API_KEY}\r\n" if auth else "")
        + "\r\n"
    )
    return head.encode() + body


async def _one_stream(target: tuple[str, object], request: bytes, expect: int, end: bytes) -> tuple[int, float]:
    kind, where = target
    t0 = time.perf_counter()
    if kind == "unix":
        reader, writer = await asyncio.open_unix_connection(str(where), limit=1 << 20)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(str(where)), limit=1 << 20)
    writer.write(request)
    ttft = 0.0
    seen = 0
    tail = b""
    recent = b""  # the closing event and the chunked terminator may come in separate reads
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            window = tail + data
            seen += window.count(MARK) - tail.count(MARK)
            if not ttft and seen:
                ttft = time.perf_counter() - t0
            tail = window[-16:]
            recent = (recent + data)[-512:]
            if recent.endswith(b"0\r\n\r\n") and end in recent:
                break
    finally:
        writer.close()
    if seen != expect + 1:
        raise RuntimeError(f"expected {expect} chunks + the closing event, got {seen}")
    return expect, ttft


async def drive(target: tuple[str, object], concurrency: int, requests: int, chunks: int, api: str = "chat") -> Result:
    request = _request(chunks, auth=target[0] == "tcp", api=api)
    end = STREAMS[APIS[api][0]][2]
    queue = list(range(requests))
    ttfts: list[float] = []
    total = 0

    async def worker() -> None:
        nonlocal total
        while queue:
            queue.pop()
            n, ttft = await _one_stream(target, request, chunks, end)
            total += n
            ttfts.append(ttft * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(total, time.perf_counter() - t0, ttfts)


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up")


def _tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,64,256")
    parser.add_argument("--chunks", type=int, default=256, help="chunks per streamed answer")
    parser.add_argument("--waves", type=int, default=4, help="requests per run = concurrency x waves (>= 16)")
    parser.add_argument("--httpx", action="store_true", help="relay through the generic httpx path (the old one)")
    parser.add_argument("--api", default="chat", help="comma-separated: chat, responses (OpenAI Responses events), "
                        "messages (Anthropic Messages events); each is measured in the same run")
    parser.add_argument("--role", choices=["driver", "gateway"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--uds", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.role == "gateway":
        serve_gateway(ns.uds, ns.port, fast_path=not ns.httpx)
        return

    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        uds, port = os.path.join(tmp, "engine.sock"), _free_port()
        with (
            _process("-m", "tests.fixtures.sse_engine", "--uds", uds, "--chunks", str(ns.chunks)),
            _process(
                __file__, "--role", "gateway", "--uds", uds, "--port", str(port), *(["--httpx"] * ns.httpx)
            ) as gateway,
        ):
            _wait_for(lambda: os.path.exists(uds), "the synthetic engine")
            _wait_for(lambda: _tcp_open(port), "the gateway")
            gw = psutil.Process(gateway.pid)
            apis = ns.api.split(",")
            for api in apis:
                asyncio.run(drive(("tcp", port), 4, 8, ns.chunks, api))  # warm-up: imports, connection pools
            print("| api | concurrency | direct chunks/s | gateway chunks/s | ratio | TTFT p50 / p99 direct ms "
                  "| TTFT p50 / p99 gateway ms | added p50 / p99 ms | gateway CPU µs/chunk |")  # fmt: skip
            print("|---|---|---|---|---|---|---|---|---|")
            for c in (int(x) for x in ns.concurrency.split(",")):
                for api in apis:
                    _report(api, c, uds, port, gw, ns)


def _report(api: str, c: int, uds: str, port: int, gw: psutil.Process, ns: argparse.Namespace) -> None:
    requests = max(16, c * ns.waves)
    direct = asyncio.run(drive(("unix", uds), c, requests, ns.chunks, api))
    cpu0 = sum(gw.cpu_times()[:2])
    via = asyncio.run(drive(("tcp", port), c, requests, ns.chunks, api))
    cpu_us = (sum(gw.cpu_times()[:2]) - cpu0) / via.chunks * 1e6
    d50, d99 = _pct(direct.ttft_ms, 50), _pct(direct.ttft_ms, 99)
    g50, g99 = _pct(via.ttft_ms, 50), _pct(via.ttft_ms, 99)
    print(
        f"| {api} | {c} | {direct.rate:,.0f} | {via.rate:,.0f} | {via.rate / direct.rate:.2f}x "
        f"| {d50:.2f} / {d99:.2f} | {g50:.2f} / {g99:.2f} | {g50 - d50:+.2f} / {g99 - d99:+.2f} "
        f"| {cpu_us:.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
