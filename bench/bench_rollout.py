"""Rollout benchmark: from a pin change to the new revision serving, and what clients feel meanwhile.

A real ``hubserve serve`` (vLLM CPU build) serves a tiny Llama; 16 clients call it without pause (streaming
and non-streaming OpenAI completions, TGI generate and generate_stream). After a steady-state window the pin
in models.toml moves to a new revision and ``hubserve sync`` verifies it; the server swaps (blue/green, or
in place with ``--in-place``). Reported: time split into sync, engine start and switch (the switch is the
time between the new engine being ready and new requests going to it), and client latency p50/p99 in the
steady state vs during the swap, with the count of failed requests (must be 0).

    python bench/bench_rollout.py [--concurrency 16] [--steady-s 20] [--in-place] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.rollout_support import NAME, CommitPoller, Outcome, Traffic, make_site, serve


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def window(outcomes: list[Outcome], start: float, end: float) -> dict[str, float]:
    """Latency of the requests that started in [start, end)."""
    picked = [o for o in outcomes if start <= o.started < end]
    lat = [o.latency * 1000 for o in picked if o.ok]
    return {
        "requests": len(picked),
        "failed": sum(1 for o in picked if not o.ok),
        "p50_ms": round(percentile(lat, 0.5), 1),
        "p99_ms": round(percentile(lat, 0.99), 1),
        "mean_ms": round(statistics.fmean(lat), 1) if lat else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=20.0, help="steady-state window before the change")
    parser.add_argument("--in-place", action="store_true", help="force the in-place path (budget for one engine)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--timeout-s", type=float, default=1800, help="longest wait for the new revision to serve")
    parser.add_argument("--logs", type=Path, help="copy the server's log here (kept on failure too)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        site = make_site(Path(tmp))
        settings = {"rollout": "in-place" if args.in_place else "blue-green", "reload_poll_s": "1"}
        try:
            with serve(site, **settings) as server, CommitPoller(server) as poller:
                rev = site.revisions
                with Traffic(server, concurrency=args.concurrency, pause_s=0) as traffic:
                    time.sleep(args.steady_s)
                    changed = time.monotonic()
                    site.pin(rev.v2)
                    synced = site.cli("sync")
                    assert synced.returncode == 0, synced.stderr
                    sync_s = time.monotonic() - changed
                    server.wait_for("the new revision", lambda: server.served_commit() == rev.v2,
                                    timeout=args.timeout_s)
                    serving = time.monotonic()
                    time.sleep(5)
                    ended = time.monotonic()
                rollout = server.health()["models"][NAME]["rollout"]  # type: ignore[index]
                results = {
                    "mode": rollout["mode"],
                    "concurrency": args.concurrency,
                    "pin_change_to_serving_s": round(serving - changed, 2),
                    "sync_s": round(sync_s, 2),
                    "engine_start_s": rollout.get("start_s"),
                    "drain_s": rollout.get("drain_s"),  # in place: the old engine finishing its requests
                    "switch_s": rollout.get("switch_s"),
                    "commits_seen": [c[:12] for c in poller.seen],
                    "steady": window(traffic.outcomes, changed - args.steady_s, changed),
                    "during_swap": window(traffic.outcomes, changed, ended),
                    "failed_total": len(traffic.failures),
                }
        finally:
            if args.logs:
                args.logs.write_bytes(b"".join(p.read_bytes() for p in sorted(site.root.glob("serve-*.log"))))
            site.close()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
