"""Text classification: hubserve (vLLM backend, transformers backend with dynamic batching) vs a plain
transformers pipeline looping over the same inputs in one process.

The model is the MiniLM sentiment classifier of tests/fixtures/task_models.py (22M parameters, fp32). One text
per request (`InferenceClient.text_classification`'s body), at each concurrency; requests/s and latency
p50/p99. The pipeline row runs the texts one by one (batch 1), as a script calling ``pipe(text)`` would.

    .venv/bin/python bench/bench_tasks.py --concurrency 1,32 --requests 256
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serve import free_port, process, wait_ready  # noqa: E402
from sync.importer import import_folder  # noqa: E402
from sync.store import Store  # noqa: E402
from tests.fixtures.task_models import NEGATIVE, POSITIVE, sentiment_dir  # noqa: E402

REPO = "hubserve-bench/minilm-sentiment"
WORDS = ["the", "movie", "plot", "actors", "music", "ending", "story", "scenes", "camera"]


def texts(n: int) -> list[str]:
    base = POSITIVE + NEGATIVE
    return [f"{base[i % len(base)]} and the {WORDS[i % len(WORDS)]} {i}" for i in range(n)]


def stats(name: str, latencies: list[float], wall: float) -> dict[str, float | str]:
    lat = sorted(latencies)
    return {"name": name, "rps": len(lat) / wall, "p50": statistics.median(lat) * 1000,
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000}


async def drive(url: str, model: str, inputs: list[str], concurrency: int) -> dict[str, float | str]:
    queue = list(inputs)
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one_worker() -> None:
            while queue:
                text = queue.pop()
                started = time.perf_counter()
                r = await client.post(f"{url}/models/{model}", json={"inputs": text})
                r.raise_for_status()
                latencies.append(time.perf_counter() - started)

        for text in inputs[:8]:  # warm-up
            (await client.post(f"{url}/models/{model}", json={"inputs": text})).raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(one_worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return stats(f"hubserve {model}", latencies, wall)


def pipeline_loop(folder: Path, inputs: list[str]) -> dict[str, float | str]:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(folder), device="cpu")
    for text in inputs[:8]:
        pipe(text)
    latencies = []
    started = time.perf_counter()
    for text in inputs:
        t = time.perf_counter()
        pipe(text, top_k=None)
        latencies.append(time.perf_counter() - t)
    return stats("transformers pipeline loop", latencies, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--backends", default="vllm,transformers", help="hubserve engines to measure")
    args = parser.parse_args()
    folder = sentiment_dir()
    inputs = texts(args.requests)
    rows = [pipeline_loop(folder, inputs)]
    with tempfile.TemporaryDirectory(prefix="hubserve-bench-tasks-") as tmp:
        root = Path(tmp)
        commit = import_folder(Store(root / "store"), folder, REPO).record.commit
        config = root / "models.toml"
        backends = args.backends.split(",")
        engine = {"vllm": "", "transformers": f"[models.engine]\nbatch_wait_ms = {args.batch_wait_ms}\n"}
        config.write_text('[store]\npath = "store"\n\n' + "\n".join(
            f'[[models]]\nname = "{b}"\nrepo = "{REPO}"\nrevision = "{commit}"\nbackend = "{b}"\n{engine[b]}'
            for b in backends), encoding="utf-8")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port)]
        env = {"HUBSERVE_LOG_LEVEL": "warning"}
        with process(cmd, env, root / "serve.log"):
            wait_ready(url, "/ready", timeout=900)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for model in backends:
                    row = asyncio.run(drive(url, model, inputs, concurrency))
                    rows.append(row | {"name": f"{row['name']} c={concurrency}"})
    base = float(rows[0]["rps"])
    print("| contender | requests/s | vs pipeline | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {float(row['rps']):.1f} | {float(row['rps']) / base:.2f}x | "
              f"{float(row['p50']):.1f} | {float(row['p99']):.1f} |")


if __name__ == "__main__":
    main()
