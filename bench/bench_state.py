"""What the shared state adds to a request: the lookups the gateway makes per request, on the embedded SQLite file
and on a real local redis-server, side by side; then a fresh answer through the real gateway vs the raw cost of
serving one from the response cache.

Per request: the real admission (server/ops/auth.py ``KeyChecker.admit``) of a key with every limit kept in the
state (requests and tokens per minute, daily and monthly budgets, requests in flight, plus its usage count): one
``counters`` call; then ``cache_get`` of the request's key (a miss and, in a second run, a hit of a 2 KiB answer).
Its settling (one more call, after the answer's last byte) is timed apart. Timed one request at a time (the latency
one request sees) and with ``--concurrency`` requests at a time (a loaded gateway), p50/p95/p99 over ``--requests``,
and the CPU time a request costs (this process, i.e. the gateway's side, plus redis-server's): on shared cores the
wall time includes waiting for a core, the CPU time does not.

The gateway part: the real app (create_app, auth on, uvicorn on loopback) over the synthetic engine process,
whose answer takes ``--tokens`` x ``--token-ms`` (the time a model would spend generating them); the same request
repeated. With the response cache merged and ``cache = true`` on the model, the repeats are cache hits.

    .venv/bin/python bench/bench_state.py --requests 1000 --concurrency 16 --skip-gateway
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.state import StateStore, open_state  # noqa: E402
from tests.fixtures.gateway_app import serve_with_loop  # noqa: E402
from tests.fixtures.redis_server import RedisServer  # noqa: E402
from tests.fixtures.two_gateways import KEY, synthetic_registry, wait_ready  # noqa: E402

REQUEST: Any = None  # a Starlette Request (admission reads it only for an input-token cap, not set here)
ANSWER = json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [
    {"index": 0, "text": " token" * 300, "finish_reason": "length"}]}).encode()[:2048]


CHECKER = None


def _checker() -> Any:
    global CHECKER
    if CHECKER is None:
        from server.ops.auth import KeyChecker

        CHECKER = KeyChecker(frozenset({"0" * 64}))  # auth on; the principal below is what a named key gives
    return CHECKER


def _principal(n: int) -> Any:
    """A named key with every limit the gateway keeps in the state (all far from reached): requests and tokens
    per minute, daily and monthly token budgets, requests in flight."""
    from server.ops.context import Principal

    big = 10**12
    return Principal(f"k{n % 50}", None, rpm=big, tpm=big, daily_tokens=big, monthly_tokens=big, max_concurrent=big)


async def lookups(state: StateStore, n: int, hit: bool) -> None:
    """What the state adds before request ``n`` reaches its engine: the key's admission (the real code:
    server/ops/auth.py KeyChecker.admit) and a response-cache lookup. Its settling runs after the answer's last
    byte (not on the latency path) and is timed apart (``settle``)."""
    from server.ops import context
    from server.ops.context import RequestContext

    ctx = RequestContext(f"r{n}", f"r{n}")
    token = context.begin(ctx)
    try:
        await _checker().admit(REQUEST, state, _principal(n))
        await state.cache_get("hit" if hit else f"miss:{n}")
    finally:
        context.end(token)
    SETTLE.append(ctx)


SETTLE: list[Any] = []


async def settle_all(state: StateStore) -> list[float]:
    samples = []
    while SETTLE:
        ctx = SETTLE.pop()
        ctx.tokens_in, ctx.tokens_out = 5, 7
        started = time.perf_counter()
        await _checker().settle(state, ctx)
        samples.append(time.perf_counter() - started)
    return samples


def percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return f"p50 {q[49] * 1e3:.3f} ms, p95 {q[94] * 1e3:.3f} ms, p99 {q[98] * 1e3:.3f} ms"


async def timed(fn: Callable[[int], Awaitable[None]], requests: int, concurrency: int) -> list[float]:
    samples: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with gate:
            started = time.perf_counter()
            await fn(n)
            samples.append(time.perf_counter() - started)

    await asyncio.gather(*(one(n) for n in range(requests)))
    return samples


def _cpu(server: psutil.Process | None) -> float:
    """CPU seconds of this process (the gateway's side: the client, SQLite's thread) and of redis-server."""
    total = time.process_time()
    if server is not None:
        times = server.cpu_times()
        total += times.user + times.system
    return total


async def bench_backend(
    label: str, state: StateStore, requests: int, concurrency: int, server: psutil.Process | None
) -> None:
    global REQUEST
    from starlette.requests import Request

    REQUEST = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []})
    await state.cache_put("hit", ANSWER, ttl_s=3600, max_bytes=64 * 1024**2)
    for n in range(200):  # warm: connections, scripts, the SQLite pages
        await lookups(state, n, hit=False)
    await settle_all(state)
    for hit in (False, True):
        for c in (1, concurrency):
            cpu = _cpu(server)
            samples = await timed(lambda n, hit=hit: lookups(state, n, hit), requests, c)  # type: ignore[misc]
            used = (_cpu(server) - cpu) / requests * 1e6
            print(f"| {label} | {'hit' if hit else 'miss'} | {c} | {percentiles(samples)} | {used:.0f} µs |")
            settled = await settle_all(state)
            print(f"| {label} | settle, after the answer | 1 | {percentiles(settled)} | |")
    put = await timed(lambda n: state.cache_put(f"p{n}", ANSWER, ttl_s=3600, max_bytes=64 * 1024**2), requests, 1)
    get = await timed(lambda n: _discard(state.cache_get(f"p{n}")), requests, 1)
    print(f"| {label} | cache_put 2 KiB alone | 1 | {percentiles(put)} | |")
    print(f"| {label} | cache_get 2 KiB alone | 1 | {percentiles(get)} | |")


async def _discard(value: Awaitable[object]) -> None:
    await value


def bench_gateway(folder: Path, state_url: str | None, tokens: int, token_ms: float, repeats: int,
                  cache: bool) -> None:
    """A fresh answer through the real gateway, then the same request ``repeats`` times (with ``cache``: the
    model has ``cache = true``, so the repeats are response-cache hits)."""
    from server.app import create_app
    from server.settings import Settings

    (folder / "models.toml").touch()
    settings = Settings.model_validate({"api_keys": KEY, "config": folder / "models.toml", "watch": False,
                                        "state_url": state_url, "engine_start_attempts": 1})
    app = create_app(settings, synthetic_registry(folder, settings, ("a",), cache=cache))
    body = {"model": "a", "prompt": "The capital of France is", "max_tokens": tokens, "temperature": 0,
            "delay": tokens * token_ms / 1000}  # the synthetic engine's stand-in for generating the tokens
    with serve_with_loop(app) as (url, _), httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as http:
        wait_ready(url)
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            http.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()
            times.append(time.perf_counter() - started)
        bare = [_timed_get(http, f"{url}/health") for _ in range(50)]
    label = ("sqlite" if state_url is None else "redis") + (", cache = true" if cache else ", no cache")
    print(f"| {label} | fresh answer ({tokens} tokens x {token_ms:g} ms) | {times[0] * 1e3:.1f} ms |")
    again = "cache hits" if cache else "fresh answers again"
    print(f"| {label} | same request again ({again}), median of {repeats} | "
          f"{statistics.median(times[1:]) * 1e3:.1f} ms |")
    print(f"| {label} | GET /health round trip (the HTTP floor), median | {statistics.median(bare) * 1e3:.2f} ms |")


def _timed_get(http: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    http.get(url, timeout=10)
    return time.perf_counter() - started


async def run_lookups(folder: Path, redis: RedisServer, requests: int, concurrency: int) -> None:
    print("| backend | cache | concurrent requests | state lookups per request (wall) | CPU per request |")
    print("|---|---|---|---|---|")
    assert redis.process is not None
    for label, url in (("sqlite", None), ("redis", redis.url_for("bench"))):
        state = open_state(url, folder / "state.db")
        try:
            await bench_backend(label, state, requests, concurrency, psutil.Process(redis.process.pid) if url else None)
        finally:
            await state.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-gateway", action="store_true")
    parser.add_argument("--skip-lookups", action="store_true", help="Only the through-the-gateway part.")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-state-"))
    redis = RedisServer.start(folder / "redis")
    try:
        if not args.skip_lookups:
            asyncio.run(run_lookups(folder, redis, args.requests, args.concurrency))
        if not args.skip_gateway:
            print("\n| backend | request | latency |\n|---|---|---|")
            for url in (None, redis.url_for("bench-gw")):
                for cache in (False, True):
                    sub = folder / f"gw-{'sqlite' if url is None else 'redis'}-{'cache' if cache else 'plain'}"
                    sub.mkdir()
                    bench_gateway(sub, url, args.tokens, args.token_ms, args.repeats, cache)
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
