"""Bundle throughput: `hubserve export` / `import-bundle` vs plain GNU tar of the same blobs, same run.

A synthetic repo of --size-gib GiB (random bytes in --files safetensors files plus a config) is imported
into a seed store. Each contender runs --repeats times as its own process (start-up included); the table
reports the median time and throughput over the blob bytes.

- export: `hubserve export` (blobs copied with os.sendfile, the bundle fsynced) vs `tar cf` of the repo's
  blobs/ followed by `sync` of the archive (the same durability).
- import: `hubserve import-bundle` (hashes every byte, stages, fsyncs and promotes) vs `tar xf` into an
  empty folder followed by `sync` of the extracted files, and the same with `sha256sum` of every file
  in between (the guarantee import gives, in C tools).

    .venv/bin/python bench/bench_bundle.py --size-gib 1 --files 4 --repeats 3
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_sync import synthetic_repo  # noqa: E402
from sync.importer import import_folder  # noqa: E402
from sync.lock import Lock, LockedModel, write_lock  # noqa: E402
from sync.store import Store, repo_folder_name  # noqa: E402

REPO = "bench/synthetic-bundle"
CLI = [sys.executable, "-m", "server.cli"]


def run(cmd: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd or ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_of(repeats: int, fn: Callable[[], float], reset: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        reset()
        times.append(fn())
    return statistics.median(times)


def main() -> None:
    args, work, src = synthetic_repo(__doc__, "hubserve-bench-bundle-")
    outside = work / "outside"
    seed = Store(outside / "store")
    record = import_folder(seed, src, REPO).record
    (outside / "models.toml").write_text(f'[[models]]\nname = "bench"\nrepo = "{REPO}"\nrevision = "main"\n')
    write_lock(outside / "models.lock", Lock({"bench": LockedModel("bench", REPO, "main", record.commit,
                                                                    record.files)}))
    blob_bytes = record.size
    bundle, tarball = work / "bundle.tar", work / "plain.tar"
    inside, untar = work / "inside", work / "untar"

    def clear(*paths: Path) -> Callable[[], None]:
        def reset() -> None:
            for p in paths:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        return reset

    blobs = f"{repo_folder_name(REPO)}/blobs"
    results = {
        "hubserve export": median_of(args.repeats, lambda: run(
            [*CLI, "export", "--config", str(outside / "models.toml"), "--out", str(bundle)]), clear(bundle)),
        "tar cf + sync": median_of(args.repeats, lambda: run(["tar", "-C", str(seed.root), "-cf", str(tarball), blobs])
                                   + run(["sync", str(tarball)]), clear(tarball)),
        "hubserve import-bundle": median_of(args.repeats, lambda: run(
            [*CLI, "import-bundle", str(bundle), "--store", str(inside)], cwd=work), clear(inside)),
        "tar xf + sync": median_of(args.repeats, lambda: _untar(tarball, untar), clear(untar)),
        "tar xf + sha256sum + sync": median_of(args.repeats, lambda: _untar(tarball, untar, hashed=True),
                                               clear(untar)),
    }
    print(f"\n{blob_bytes / 2**30:.2f} GiB in {args.files} files + config, median of {args.repeats}\n")
    print("| contender | seconds | GiB/s |")
    print("|---|---|---|")
    for name, secs in results.items():
        print(f"| {name} | {secs:.2f} | {blob_bytes / 2**30 / secs:.2f} |")
    imp = results["hubserve import-bundle"]
    print(f"\nexport vs tar: {results['tar cf + sync'] / results['hubserve export']:.2f}x; "
          f"import vs tar: {results['tar xf + sync'] / imp:.2f}x; "
          f"import vs tar + sha256sum: {results['tar xf + sha256sum + sync'] / imp:.2f}x")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _untar(tarball: Path, dest: Path, hashed: bool = False) -> float:
    """tar xf, then (``hashed``: what import guarantees, in C tools) sha256sum of every file, then sync."""
    dest.mkdir(parents=True)
    took = run(["tar", "-C", str(dest), "-xf", str(tarball)])
    files = [str(p) for p in dest.rglob("*") if p.is_file()]
    if hashed:
        took += run(["sha256sum", *files])
    return took + run(["sync", *files])


if __name__ == "__main__":
    main()
