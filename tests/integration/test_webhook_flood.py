"""Webhook floods against a real ``hubserve daemon`` on loopback: they coalesce and obey the backoff.

At most one reconcile runs and one more is pending per model, however many webhooks arrive; the pending
one waits for ``[daemon] webhook_min_interval`` after the last webhook reconcile began, and for the
backoff after upstream failures.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_REPO, Upstream
from tests.fixtures.faulty import FaultyProxy
from tests.integration.test_daemon import (
    SECRET,
    SECRET_ENV,
    DaemonProcess,
    daemon_section,
    daemons,  # noqa: F401  (fixture)
    locked,
    revision,
    wait_until,
)
from tests.integration.test_sync import tiny_model, write_manifest

pytestmark = pytest.mark.integration


def _payload(repo: str = TINY_REPO) -> dict[str, object]:
    return {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "model", "name": repo, "headSha": "0" * 40},
        "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "a" * 40, "newSha": "b" * 40}],
        "webhook": {"id": "x", "version": 3},
    }


def _flood(url: str, n: int, spread_s: float) -> list[int]:
    """``n`` valid webhooks from 4 connections, spread over about ``spread_s`` seconds; their statuses."""

    start = time.monotonic()

    def send(i: int) -> int:
        time.sleep(max(0.0, start + spread_s * i / n - time.monotonic()))
        with httpx.Client(timeout=10) as http:
            return http.post(f"{url}/webhooks/hub", json=_payload(), headers={"X-Webhook-Secret": SECRET}).status_code

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(send, range(n)))


def _webhook_reconciles(d: DaemonProcess) -> int:
    return sum("reconcile (webhook)" in line for line in d.lines)


def _reconciles(d: DaemonProcess, start: int) -> list[str]:
    return [line for line in d.lines[start:] if "reconcile (" in line]


def test_a_flood_of_webhooks_coalesces(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]  # noqa: F811
) -> None:
    a = upstream.publish(tiny_llama, TINY_REPO)
    cfg = write_manifest(tmp_path, upstream.url, [tiny_model(follow=True)])
    daemon_section(cfg, webhook_secret_env=SECRET_ENV, webhook_min_interval=2.0)
    d = daemons(cfg, "--interval", "300", env={SECRET_ENV: SECRET}).started()
    d.wait_for(r"tiny: promoted")
    b = upstream.publish(revision(tiny_llama, tmp_path / "b"), TINY_REPO)

    statuses = _flood(d.url, 100, spread_s=1.5)
    assert statuses == [202] * 100
    wait_until(lambda: locked(cfg) == b, 20, "the flood's re-resolve")  # coalesced, not lost
    time.sleep(2.5)  # past webhook_min_interval: the pending reconcile (if any) has run
    count = _webhook_reconciles(d)
    assert 1 <= count <= 2, d.log  # one running and at most one pending, never one per webhook
    with httpx.Client(timeout=10) as http:
        metrics = http.get(f"{d.url}/metrics").text
    assert re.search(rf'hubserve_daemon_reconciles_total{{trigger="webhook"}} {count}\.0', metrics), metrics
    assert a != b and d.terminate() == 0


def test_webhooks_wait_for_the_backoff(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]  # noqa: F811
) -> None:
    upstream.publish(tiny_llama, TINY_REPO)
    with FaultyProxy(upstream.url) as proxy:
        cfg = write_manifest(tmp_path, proxy.url, [tiny_model(follow=True)])
        cfg.write_text(cfg.read_text().replace("retries = 4", "retries = 0"))
        daemon_section(cfg, webhook_secret_env=SECRET_ENV, backoff_max=600.0, webhook_min_interval=0.1)
        proxy.faults.fail = [(503, {})] * 1000  # the upstream is down for the whole test
        d = daemons(cfg, "--interval", "300", env={SECRET_ENV: SECRET}).started()
        m = d.wait_for(r"reconcile failed .* retrying in ([\d.]+)s")
        delay = float(m.group(1))  # 1-2 s after the first failure (2 s, equal jitter)
        failed_at, seen = time.monotonic(), len(d.lines)
        statuses = _flood(d.url, 50, spread_s=0.3)
        assert statuses == [202] * 50
        time.sleep(max(0.0, delay - 0.4 - (time.monotonic() - failed_at)))
        assert not _reconciles(d, seen), d.log  # a webhook does not jump the backoff
        d.wait_for(r"reconcile \(", timeout=delay + 5, start=seen)  # the retry, once the backoff has passed
        time.sleep(0.5)
        assert len(_reconciles(d, seen)) == 1, d.log  # covering the webhooks; then the next backoff
        assert d.terminate() == 0
