"""Webhook floods against a real ``hubserve daemon`` on loopback: they coalesce and obey the backoff.

At most one reconcile runs and one more is pending per model, however many webhooks arrive; the pending
one waits for ``[daemon] webhook_min_interval`` after the last webhook reconcile began, and for the
backoff after upstream failures.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
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


def _stamp(line: str) -> float:
    """The time of a daemon log line (``2026-12-01 14:58:37,671 INFO ...``), in seconds."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _reconciles(d: DaemonProcess, start: int = 0, trigger: str = "") -> list[str]:
    return [line for line in d.lines[start:] if f"reconcile ({trigger}" in line]


def test_a_flood_of_webhooks_coalesces(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]  # noqa: F811
) -> None:
    a = upstream.publish(tiny_llama, TINY_REPO)
    cfg = write_manifest(tmp_path, upstream.url, [tiny_model(follow=True)])
    daemon_section(cfg, webhook_secret_env=SECRET_ENV, webhook_min_interval=3.0)
    d = daemons(cfg, "--interval", "300", env={SECRET_ENV: SECRET}).started()
    d.wait_for(r"tiny: promoted")
    b = upstream.publish(revision(tiny_llama, tmp_path / "b"), TINY_REPO)

    sent = time.monotonic()
    statuses = _flood(d.url, 100, spread_s=1.5)
    flood_s = time.monotonic() - sent
    assert statuses == [202] * 100
    wait_until(lambda: locked(cfg) == b, 20, "the flood's re-resolve")  # coalesced, not lost
    time.sleep(3.5)  # past webhook_min_interval: the pending reconcile (if any) has run
    runs = [_stamp(line) for line in _reconciles(d, trigger="webhook")]
    # One running and at most one pending, one per webhook_min_interval: 2 when the flood takes 1.5 s as sent
    # (a loaded machine stretches it, and the bound with it), never one per webhook.
    assert 1 <= len(runs) <= 2 + int(flood_s / 3.0), (flood_s, d.log)
    assert all(b - a >= 3.0 - 0.05 for a, b in itertools.pairwise(runs)), d.log
    with httpx.Client(timeout=10) as http:
        metrics = http.get(f"{d.url}/metrics").text
    assert re.search(rf'hubserve_daemon_reconciles_total{{trigger="webhook"}} {len(runs)}\.0', metrics), metrics
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
        d.wait_for(r"reconcile failed .* retrying in")
        statuses = _flood(d.url, 50, spread_s=0.5)
        assert statuses == [202] * 50
        time.sleep(1.0)
        assert d.terminate() == 0
    # Every reconcile after a failure began only once that failure's backoff had passed, webhooks or not.
    events = [line for line in d.lines if "retrying in" in line or "reconcile (" in line]
    pairs = 0
    for failed, nxt in itertools.pairwise(events):
        if (m := re.search(r"retrying in ([\d.]+)s", failed)) and "reconcile (" in nxt:
            pairs += 1
            assert _stamp(nxt) >= _stamp(failed) + float(m.group(1)) - 0.15, d.log
    assert pairs >= 1 and len(_reconciles(d)) <= 1 + pairs, d.log
    assert any("webhook for" in line for line in d.lines)
