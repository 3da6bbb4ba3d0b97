"""Loading on demand and LoRA adapters on a real server with vLLM engines: time to first token of a model that is
not loaded (cold start; on a GPU with sleep mode, a wake-up) vs one that is, and the time an adapter takes to move
to a new commit (no restart) vs the time a base model's revision swap takes (an engine start).

Two on-demand tiny Llamas with room for one (HUBSERVE_MAX_LOADED_MODELS=1), so each request for the other one is
a cold start; one LoRA adapter on the first, at two commits. Pins move with ``hubserve sync`` and take effect
with ``POST /admin/reload``, whose answer comes once the server applied them: its round trip is the switch time.

    .venv/bin/python bench/bench_ondemand.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serve import free_port, process, wait_ready  # noqa: E402
from sync.importer import import_folder  # noqa: E402
from sync.mirror import make_mirror  # noqa: E402
from sync.store import Store  # noqa: E402
from tests.fixtures.lora import ADAPTER_REPO, BASE_REPO, OTHER_REPO, lora_dir, on_demand_manifest  # noqa: E402
from tests.fixtures.tiny import tiny_llama_dir  # noqa: E402

KEY = "bench-ondemand-key-0123456789"
ADMIN = "bench-ondemand-admin-0123456789"


def ttft(url: str, model: str) -> float:
    """Seconds to the first streamed token of a completion."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=900,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        r.raise_for_status()
        first = None
        for line in r.iter_lines():
            if first is None and line.startswith("data:") and '"text"' in line:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("no token came")
    return first


def cli(config: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "server.cli", *args, "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr)


def reload_s(url: str) -> float:
    started = time.perf_counter()
    r = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=900)
    r.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="cold starts / adapter moves measured")
    parser.add_argument("--warm", type=int, default=10, help="requests to a loaded model")
    ns = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ondemand-"))
    seed = Store(root / "seed")
    base = import_folder(seed, tiny_llama_dir(), BASE_REPO).record.commit
    base2_dir = shutil.copytree(tiny_llama_dir(), root / "base2")
    (base2_dir / "REVISION").write_text("2\n")
    base2 = import_folder(seed, base2_dir, BASE_REPO, refs=()).record.commit
    other_dir = shutil.copytree(tiny_llama_dir(), root / "other")
    (other_dir / "REVISION").write_text("b\n")
    other = import_folder(seed, other_dir, OTHER_REPO).record.commit
    adapters = [import_folder(seed, lora_dir(seed_n), ADAPTER_REPO, refs=()).record.commit for seed_n in (1, 2)]
    mirror = make_mirror(seed, "127.0.0.1", 0)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    upstream = f"http://127.0.0.1:{mirror.server_address[1]}"
    config = root / "models.toml"

    def write(base_commit: str, adapter_commit: str) -> None:
        config.write_text(on_demand_manifest(upstream, base_commit, adapter_commit, other))
        cli(config, "sync")

    write(base, adapters[0])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"HUBSERVE_API_KEYS": KEY, "HUBSERVE_ADMIN_TOKEN": ADMIN, "HUBSERVE_MAX_LOADED_MODELS": "1",
           "HUBSERVE_WATCH": "true", "HUBSERVE_RELOAD_POLL_S": "3600", "HUBSERVE_ROLLOUT": "blue-green"}
    results: dict[str, object] = {}
    with process([sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port)], env,
                 root / "serve.log"):
        wait_ready(url, "/ready")
        cold = []
        for _ in range(ns.rounds):  # each request for the model not loaded evicts the other and starts it
            cold += [ttft(url, "tiny-a"), ttft(url, "tiny-b")]
        ttft(url, "tiny-a")
        warm = [ttft(url, "tiny-a") for _ in range(ns.warm)]
        adapter_first = ttft(url, "tiny-poet")  # the base is loaded; the adapter was loaded with it
        moves = []
        for i in range(ns.rounds):
            write(base, adapters[(i + 1) % 2])
            moves.append(reload_s(url))
            ttft(url, "tiny-poet")
        write(base2, adapters[ns.rounds % 2])
        swap = reload_s(url)  # a new base revision: a new engine starts beside the old one (blue/green)
        results = {
            "cold_start_ttft_s": {"median": statistics.median(cold), "all": [round(x, 2) for x in cold]},
            "loaded_ttft_s": {"median": statistics.median(warm), "max": max(warm)},
            "adapter_ttft_s": adapter_first,
            "adapter_move_s": {"median": statistics.median(moves), "all": [round(x, 3) for x in moves]},
            "base_revision_swap_s": swap,
        }
    mirror.shutdown()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
