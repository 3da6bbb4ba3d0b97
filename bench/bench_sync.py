"""Sync throughput: hubserve sync vs huggingface_hub.snapshot_download vs raw curl, same mirror, same run.

A synthetic repo of --size-gib GiB (random bytes in --files safetensors files plus a config) is imported
into a seed store and served by a real `hubserve mirror` process on loopback. Each contender downloads
every byte into a fresh directory, --repeats times; the table reports the median throughput.

    .venv/bin/python bench/bench_sync.py --size-gib 1 --files 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sync.importer import import_folder  # noqa: E402
from sync.store import Store  # noqa: E402

REPO = "bench/synthetic-1g"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_repo(folder: Path, size: int, files: int) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    per_file = size // files
    chunk = 8 << 20
    for i in range(files):
        with (folder / f"model-{i:05d}-of-{files:05d}.safetensors").open("wb") as f:
            left = per_file
            while left:
                n = min(chunk, left)
                f.write(os.urandom(n))
                left -= n


def wait_ready(url: str) -> None:
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/api/agent-harnesses", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("mirror did not start")


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_curl(url: str, commit: str, paths: list[str], out: Path) -> float:
    out.mkdir(parents=True)
    cmd = ["curl", "-sSf", "--parallel", "--parallel-max", "8"]
    for p in paths:
        cmd += ["-o", str(out / p.replace("/", "_")), f"{url}/{REPO}/resolve/{commit}/{p}"]
    return timed(cmd)


def run_curl_verified(url: str, commit: str, paths: list[str], out: Path) -> float:
    """curl, then sha256sum of every file on 2 processes and a sync: what "download + verify" costs in C."""
    took = run_curl(url, commit, paths, out)
    files = [str(p) for p in sorted(out.iterdir())]
    start = time.perf_counter()
    subprocess.run(["xargs", "-P", "2", "-n", "1", "sha256sum"], input="\n".join(files).encode(), check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    return took + time.perf_counter() - start


def run_snapshot_download(url: str, commit: str, out: Path) -> float:
    code = (
        "from huggingface_hub import snapshot_download\n"
        f"snapshot_download({REPO!r}, revision={commit!r}, cache_dir={str(out)!r}, max_workers=8)\n"
    )
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return timed([sys.executable, "-c", code], env)


def write_manifest(url: str, commit: str, out: Path) -> Path:
    out.mkdir(parents=True)
    cfg = out / "models.toml"
    cfg.write_text(
        f'[store]\npath = "store"\n[upstream]\nendpoint = "{url}"\n'
        f'[[models]]\nname = "bench"\nrepo = "{REPO}"\nrevision = "{commit}"\n'
    )
    return cfg


def run_hubserve(url: str, commit: str, out: Path) -> float:
    cfg = write_manifest(url, commit, out)
    return timed([sys.executable, "-m", "server.cli", "sync", "--config", str(cfg)])


def run_hubserve_warm(url: str, commit: str, out: Path) -> float:
    """The same sync in-process, timed after the imports: what the CLI's ~0.5 s start-up hides."""
    cfg = write_manifest(url, commit, out)
    code = (
        "import time, sys\nfrom pathlib import Path\nfrom rich.console import Console\n"
        "from sync.manifest import load_config\nfrom sync.syncer import Syncer\n"
        f"cfg = load_config(Path({str(cfg)!r}))\nt = time.perf_counter()\n"
        "ok = Syncer(cfg, Console(stderr=True, quiet=True)).run().ok\n"
        "print(time.perf_counter() - t)\nsys.exit(0 if ok else 1)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return float(res.stdout.strip().splitlines()[-1])


def synthetic_repo(description: str | None, prefix: str) -> tuple[argparse.Namespace, Path, Path]:
    """Parse --size-gib/--files/--repeats/--workdir; make (or reuse) the synthetic repo: (args, workdir, repo)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    src = work / "repo"
    if not src.exists():
        make_repo(src, int(args.size_gib * (1 << 30)), args.files)
    return args, work, src


def main() -> None:
    args, work, src = synthetic_repo(__doc__, "hubserve-bench-")
    seed = Store(work / "seed")
    t0 = time.perf_counter()
    rec = import_folder(seed, src, REPO).record
    print(f"import (hash + copy) of {rec.size / 2**30:.2f} GiB: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mirror = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "mirror", "--store", str(seed.root), "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(url)
        paths = [f.path for f in rec.files]
        contenders = {
            "curl --parallel (raw bytes)": lambda out: run_curl(url, rec.commit, paths, out),
            "curl --parallel, then sha256sum + sync": lambda out: run_curl_verified(url, rec.commit, paths, out),
            "huggingface_hub.snapshot_download": lambda out: run_snapshot_download(url, rec.commit, out),
            "hubserve sync (download + verify + promote)": lambda out: run_hubserve(url, rec.commit, out),
            "hubserve sync, timed after imports": lambda out: run_hubserve_warm(url, rec.commit, out),
        }
        results: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(args.repeats):
            for name, fn in contenders.items():
                out = work / f"out-{i}-{abs(hash(name))}"
                results[name].append(fn(out))
                shutil.rmtree(out, ignore_errors=True)
        print(f"\n{rec.size / 2**30:.2f} GiB in {len(paths)} files, loopback, median of {args.repeats}\n")
        print("| contender | median s | MiB/s | vs snapshot_download | vs curl |")
        print("|---|---|---|---|---|")
        med = {k: statistics.median(v) for k, v in results.items()}
        hub, curl = med["huggingface_hub.snapshot_download"], med["curl --parallel (raw bytes)"]
        for name, secs in med.items():
            mibs = rec.size / secs / 2**20
            print(f"| {name} | {secs:.2f} | {mibs:.0f} | {hub / secs:.2f}x | {curl / secs:.2f}x |")
    finally:
        mirror.terminate()
        mirror.wait()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
