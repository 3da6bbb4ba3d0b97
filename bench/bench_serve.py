"""Serving overhead: hubserve (gateway + vLLM engine process) vs a bare vLLM OpenAI server, same run.

Both serve SmolLM2-135M-Instruct (fp32, from the same store, same engine flags) on this machine, one
after the other. For each concurrency and for streaming and non-streaming /v1/completions with
`ignore_eos` (every request generates exactly --max-tokens), it reports output tokens/s and time to
first token (streaming) or latency (non-streaming), p50/p99. `--two-models` also compares two models in
one hubserve against two bare vLLM servers, the load split evenly.

    .venv/bin/python bench/bench_serve.py --concurrency 1,16,64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sync.importer import import_folder  # noqa: E402
from sync.store import Store  # noqa: E402
from tests.fixtures.smollm2 import REPO_ID, build_smollm2  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
KV_GIB = "2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=out, start_new_session=True)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bare_vllm(commit: str, name: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", REPO_ID, "--revision", commit,
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS,
    ]


def vllm_env(store: Store) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(store.root), "VLLM_CPU_KVCACHE_SPACE": KV_GIB}


@dataclass
class Result:
    tokens_per_s: float
    first_p50_ms: float
    first_p99_ms: float


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, max_tokens: int, stream: bool
) -> tuple[float, int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    first = None
    tokens = 0
    if not stream:
        resp = await client.post(url + "/v1/completions", json=body)
        resp.raise_for_status()
        return (time.perf_counter() - start) * 1000, resp.json()["usage"]["completion_tokens"]
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if first is None and data.get("choices") and data["choices"][0].get("text"):
                first = (time.perf_counter() - start) * 1000
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return first or 0.0, tokens


async def load(targets: list[tuple[str, str]], concurrency: int, n: int, max_tokens: int, stream: bool) -> Result:
    """n requests, at most `concurrency` in flight, spread round-robin over (url, model) targets."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": "Bearer bench-key"}
    async with httpx.AsyncClient(timeout=600, headers=headers, limits=httpx.Limits(max_connections=256)) as client:
        async def run(i: int) -> tuple[float, int]:
            url, model = targets[i % len(targets)]
            async with sem:
                return await one_request(client, url, model, max_tokens, stream)

        await asyncio.gather(*(run(i) for i in range(len(targets) * 2)))  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n)))
        wall = time.perf_counter() - start
    firsts = sorted(r[0] for r in results)
    p99 = firsts[min(len(firsts) - 1, round(0.99 * (len(firsts) - 1)))]
    return Result(sum(r[1] for r in results) / wall, statistics.median(firsts), p99)


def measure(name: str, targets: list[tuple[str, str]], args: argparse.Namespace, table: dict[str, Result]) -> None:
    for conc in args.concurrency:
        for stream in (False, True):
            n = max(args.min_requests, conc * args.waves)
            res = asyncio.run(load(targets, conc, n, args.max_tokens, stream))
            key = f"{name}|{conc}|{'stream' if stream else 'plain'}"
            table[key] = res
            print(f"{key}: {res.tokens_per_s:.1f} tok/s, first/latency p50 {res.first_p50_ms:.0f} ms "
                  f"p99 {res.first_p99_ms:.0f} ms", file=sys.stderr, flush=True)


def write_manifest(path: Path, store: Path, commit: str, names: list[str]) -> None:
    models = "".join(
        f'[[models]]\nname = "{n}"\nrepo = "{REPO_ID}"\nrevision = "{commit}"\ntask = "text-generation"\n'
        f"{'default = true' if i == 0 else ''}\n[models.engine]\ndtype = \"float32\"\nenforce_eager = true\n"
        "max_model_len = 2048\n"
        for i, n in enumerate(names)
    )
    path.write_text(f'[store]\npath = "{store}"\n{models}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--waves", type=int, default=2, help="requests per run = concurrency x waves")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--two-models", action="store_true")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-serve")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = Store(args.workdir / "store")
    commit = import_folder(store, build_smollm2(), REPO_ID).record.commit
    table: dict[str, Result] = {}
    names = ["smollm2", "smollm2-b"] if args.two_models else ["smollm2"]

    ports = [free_port() for _ in names]
    with contextmanager_all([
        process(bare_vllm(commit, n, p), vllm_env(store), args.workdir / f"vllm-{n}.log")
        for n, p in zip(names, ports, strict=True)
    ]):
        for p in ports:
            wait_ready(f"http://127.0.0.1:{p}", "/health")
        measure("bare vLLM", [(f"http://127.0.0.1:{p}", n) for n, p in zip(names, ports, strict=True)], args, table)

    cfg = args.workdir / "models.toml"
    write_manifest(cfg, store.root, commit, names)
    port = free_port()
    env = {
        "HUBSERVE_API_KEYS": "bench-key",
        "HUBSERVE_CPU_KVCACHE_GIB": KV_GIB,
        "HUBSERVE_MAX_CONCURRENT_REQUESTS": "512",
    }
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(cfg), "--port", str(port)]
    with process(cmd, env, args.workdir / "hubserve.log"):
        wait_ready(f"http://127.0.0.1:{port}", "/ready")
        measure("hubserve", [(f"http://127.0.0.1:{port}", n) for n in names], args, table)

    print(f"\nSmolLM2-135M-Instruct fp32, {len(names)} model(s), {args.max_tokens} output tokens/request, "
          f"ignore_eos, /v1/completions\n")
    print("| concurrency | mode | bare vLLM tok/s | hubserve tok/s | ratio | bare p50 / p99 ms | hubserve p50 / p99 ms "
          "| Δ p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for conc in args.concurrency:
        for mode in ("plain", "stream"):
            b, h = table[f"bare vLLM|{conc}|{mode}"], table[f"hubserve|{conc}|{mode}"]
            label = "stream (TTFT)" if mode == "stream" else "non-stream (latency)"
            print(f"| {conc} | {label} | {b.tokens_per_s:.1f} | {h.tokens_per_s:.1f} | "
                  f"{h.tokens_per_s / b.tokens_per_s:.3f} | {b.first_p50_ms:.0f} / {b.first_p99_ms:.0f} | "
                  f"{h.first_p50_ms:.0f} / {h.first_p99_ms:.0f} | {h.first_p50_ms - b.first_p50_ms:+.1f} |")


@contextmanager
def contextmanager_all(cms: list[object]) -> Iterator[None]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        for cm in cms:
            stack.enter_context(cm)  # type: ignore[arg-type]
        yield


if __name__ == "__main__":
    main()
