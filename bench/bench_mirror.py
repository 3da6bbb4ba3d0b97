"""Mirror throughput: `hubserve mirror` vs nginx (sendfile) serving the same files, 64 concurrent clients, same run.

A synthetic repo (--files safetensors files of --file-mib MiB of random bytes, plus small JSON files) is
imported into a store and served by a real `hubserve mirror` process. nginx (Debian's package) serves the very
same blobs at the same `/{repo}/resolve/{commit}/{path}` URLs from a tree of symlinks, with sendfile, keep-alive
and no access log. wrk (Debian's package) drives --connections keep-alive clients for --seconds per run,
cycling through the files; runs alternate between the two servers and the table reports the median.

    .venv/bin/python bench/bench_mirror.py --files 8 --file-mib 64 --connections 64 --seconds 10 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_sync import free_port, make_repo, wait_ready  # noqa: E402
from sync.importer import import_folder  # noqa: E402
from sync.store import Store  # noqa: E402

REPO = "bench/mirror-files"
NGINX_CONF = """
daemon off;
master_process on;
worker_processes auto;
user {user};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""
WRK_SCRIPT = """
local paths = {{{paths}}}
local i = 0
request = function()
    i = i % #paths + 1
    return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
    io.write(string.format("RESULT %d %d %d %d\\n", summary.bytes, summary.requests, summary.duration,
        summary.errors.status + summary.errors.read + summary.errors.connect + summary.errors.timeout))
end
"""


def nginx_tree(store: Store, commit: str, www: Path) -> None:
    """The mirror's URL layout on disk: /{repo}/resolve/{commit}/{path} -> the store's blob."""
    record = store.get_revision(REPO, commit)
    assert record is not None
    for f in record.files:
        link = www / REPO / "resolve" / commit / f.path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(store.blob_path(REPO, f.etag))


def wrk(url: str, paths: list[str], script: Path, connections: int, seconds: int) -> tuple[float, float]:
    """(bytes/s, requests/s) of one wrk run."""
    script.write_text(WRK_SCRIPT.format(paths=", ".join(f'"{p}"' for p in paths)))
    threads = min(connections, max(2, os.cpu_count() or 2))
    res = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "60s",
                          "-s", str(script), url], capture_output=True, text=True, check=True)
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))
    nbytes, reqs, micros, errors = map(int, line.split()[1:])
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors against {url}:\n{res.stdout}")
    return nbytes / (micros / 1e6), reqs / (micros / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--file-mib", type=int, default=64)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="mirror processes (nginx: one per CPU)")
    args = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} not found: apt-get install {tool} (scripts/system-deps.sh)")
    work = Path(tempfile.mkdtemp(prefix="hubserve-bench-mirror-"))
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        src = work / "repo"
        make_repo(src, args.files * (args.file_mib << 20), args.files)
        small = src / "small"
        small.mkdir()
        for i in range(16):
            (small / f"config-{i}.json").write_text('{"model_type": "synthetic", "pad": "%s"}\n' % ("x" * 4000))
        store = Store(work / "store")
        commit = import_folder(store, src, REPO).record.commit
        nginx_tree(store, commit, work / "www")
        for p in work.rglob("*"):
            if not p.is_symlink():
                os.chmod(p, 0o755 if p.is_dir() else 0o644)

        m_port, n_port = free_port(), free_port()
        mirror_cmd = [sys.executable, "-m", "server.cli", "mirror", "--store", str(store.root), "--port", str(m_port),
                      "--workers", str(args.workers)]
        procs.append(subprocess.Popen(mirror_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        (work / "nginx-tmp").mkdir()
        conf = work / "nginx.conf"
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        conf.write_text(NGINX_CONF.format(user=user, work=work, port=n_port, root=work / "www"))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.append(subprocess.Popen([nginx, "-c", str(conf), "-e", str(work / "nginx-error.log")]))
        mirror_url, nginx_url = f"http://127.0.0.1:{m_port}", f"http://127.0.0.1:{n_port}"
        wait_ready(mirror_url)
        rec = store.get_revision(REPO, commit)
        assert rec is not None
        big = [f"/{REPO}/resolve/{commit}/{f.path}" for f in rec.files if f.path.endswith(".safetensors")]
        little = [f"/{REPO}/resolve/{commit}/{f.path}" for f in rec.files if f.path.startswith("small/")]
        for _ in range(50):
            try:
                urllib.request.urlopen(nginx_url + big[0], timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

        rows = []
        for label, paths in ((f"{args.file_mib} MiB files", big), ("4 KiB files", little)):
            got: dict[str, list[tuple[float, float]]] = {"mirror": [], "nginx": []}
            for _ in range(args.repeats):
                got["mirror"].append(wrk(mirror_url, paths, work / "m.lua", args.connections, args.seconds))
                got["nginx"].append(wrk(nginx_url, paths, work / "n.lua", args.connections, args.seconds))
            med = {k: (statistics.median(b for b, _ in v), statistics.median(r for _, r in v)) for k, v in got.items()}
            rows.append((label, med))
        print(f"\n{args.connections} keep-alive clients (wrk), {args.seconds}s per run, median of {args.repeats}, "
              f"{os.cpu_count()} CPUs, mirror --workers {args.workers}, nginx worker_processes auto\n")
        print("| files | hubserve mirror | nginx (sendfile) | mirror / nginx |")
        print("|---|---|---|---|")
        for label, med in rows:
            (mb, mr), (nb, nr) = med["mirror"], med["nginx"]
            big_files = "MiB" in label
            fmt = (lambda b, r: f"{b / 2**30:.2f} GiB/s") if big_files else (lambda b, r: f"{r:,.0f} req/s")
            ratio = mb / nb if big_files else mr / nr
            print(f"| {label} | {fmt(mb, mr)} | {fmt(nb, nr)} | {ratio:.2f}x |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
