"""Bit rot in a real store: one verify pass of the daemon's schedule marks a flipped byte, the metric and
/health show it, the revision is re-fetched from a loopback upstream and verifies again."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sync.integrity import corrupt_marks, is_corrupt
from sync.manifest import load_config
from sync.scrub import Scrubber, ScrubCollector
from sync.store import RevisionRecord, Store
from sync.syncer import Syncer
from tests.conftest import TINY_REPO, Upstream
from tests.fixtures.faulty import FaultyProxy
from tests.integration.test_daemon import DaemonProcess, daemon_section, daemons  # noqa: F401  (fixture)
from tests.integration.test_sync import tiny_model, write_manifest

pytestmark = pytest.mark.integration


def flip_byte(store: Store, record: RevisionRecord, path: str = "model.safetensors") -> Path:
    """Flip one byte in the middle of a blob, in place (size unchanged: only a re-hash can tell)."""
    blob = store.file_path(record, path)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    return blob


def _synced(tmp_path: Path, endpoint: str, upstream: Upstream, tiny_llama: Path) -> tuple[Path, Store, RevisionRecord]:
    commit = upstream.publish(tiny_llama, TINY_REPO)
    cfg = write_manifest(tmp_path, endpoint, [tiny_model()])
    cfg.write_text(cfg.read_text().replace("retries = 4", "retries = 0"))
    Syncer(load_config(cfg)).run()
    store = Store(load_config(cfg).store_path)
    record = store.get_revision(TINY_REPO, commit)
    assert record is not None and store.verify(record) == []
    return cfg, store, record


def test_one_verify_pass_marks_reports_and_refetches(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    with FaultyProxy(upstream.url) as proxy:
        cfg, store, record = _synced(tmp_path, proxy.url, upstream, tiny_llama)
        flip_byte(store, record)
        scrubber = Scrubber(lambda: load_config(cfg))
        assert scrubber.step() is None  # a fresh store: the first pass is a week away
        registry = CollectorRegistry()
        registry.register(ScrubCollector(scrubber))

        proxy.faults.forbid_paths = {"/resolve/": (503, "")}  # the upstream cannot serve files now
        report = scrubber.step(force=True)
        assert report is not None and report.corrupt == [f"{TINY_REPO}@{record.commit}"] and not report.repaired
        assert is_corrupt(store, TINY_REPO, record.commit)  # durable: the server starts no engine on it
        [mark] = corrupt_marks(store)
        assert mark.files == ("model.safetensors",) and "expected sha256" in mark.problems[0]
        metrics = generate_latest(registry).decode()
        assert "hubserve_daemon_corrupt_revisions 1.0" in metrics
        assert f'hubserve_daemon_corrupt_revision{{commit="{record.commit}",repo="{TINY_REPO}"}} 1.0' in metrics
        assert 'hubserve_daemon_repairs_total{result="failed"} 1.0' in metrics
        assert store.get_revision(TINY_REPO, record.commit) is not None  # gc, status and rollback still see it
        assert scrubber.step() is None  # the pass was recorded: not due again until verify_interval

        proxy.faults.forbid_paths = {}
        report = scrubber.step(force=True)
        assert report is not None and report.repaired == [f"{TINY_REPO}@{record.commit}"]
        assert not is_corrupt(store, TINY_REPO, record.commit) and store.verify(record) == []
        assert any("/resolve/" in path and "model.safetensors" in path for _m, path, _s in proxy.faults.log)
        metrics = generate_latest(registry).decode()
        assert "hubserve_daemon_corrupt_revisions 0.0" in metrics
        assert 'hubserve_daemon_repairs_total{result="ok"} 1.0' in metrics


def test_verify_pass_is_paced_by_verify_bandwidth(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    cfg, _store, record = _synced(tmp_path, upstream.url, upstream, tiny_llama)
    daemon_section(cfg, verify_bandwidth=4.0)  # MB/s; the tiny model is ~1.7 MB
    report = Scrubber(lambda: load_config(cfg)).step(force=True)
    assert report is not None and report.bytes >= record.size and not report.corrupt
    assert report.seconds >= report.bytes / 4e6 * 0.9, report


def test_daemon_reports_corruption_on_metrics_and_health_then_repairs(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]  # noqa: F811
) -> None:
    with FaultyProxy(upstream.url) as proxy:
        cfg, store, record = _synced(tmp_path, proxy.url, upstream, tiny_llama)
        daemon_section(cfg, verify_interval="2s")
        flip_byte(store, record)
        proxy.faults.forbid_paths = {"/resolve/": (503, "")}
        d = daemons(cfg, "--interval", "300").started()
        d.wait_for(r"stays marked corrupt", timeout=20)
        with httpx.Client(timeout=10) as http:
            metrics = http.get(f"{d.url}/metrics").text
            health = http.get(f"{d.url}/health").json()
        assert "hubserve_daemon_corrupt_revisions 1.0" in metrics
        assert health["status"] == "degraded"
        assert health["integrity"]["corrupt"] == [
            {"repo": TINY_REPO, "commit": record.commit, "files": ["model.safetensors"]}
        ]
        proxy.faults.forbid_paths = {}
        d.wait_for(r"re-fetched from .* and verified again", timeout=20)
        with httpx.Client(timeout=10) as http:
            assert "hubserve_daemon_corrupt_revisions 0.0" in http.get(f"{d.url}/metrics").text
            assert http.get(f"{d.url}/health").json()["status"] == "ok"
        assert store.verify(record) == [] and not is_corrupt(store, TINY_REPO, record.commit)
        started = time.monotonic()
        assert d.terminate() == 0 and time.monotonic() - started < 10


def test_the_server_starts_no_engine_on_a_revision_marked_corrupt(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path
) -> None:
    from server.desired import desired_models
    from sync.integrity import clear_corrupt, mark_corrupt

    cfg, store, record = _synced(tmp_path, upstream.url, upstream, tiny_llama)
    config = load_config(cfg)
    name = config.manifest.models[0].name
    serving = desired_models(config).models
    assert [m.commit for m in serving] == [record.commit]
    mark_corrupt(store, record.repo, record.commit, ["model.safetensors"])
    desired = desired_models(config)
    assert desired.models == [] and "marked corrupt" in desired.waiting[name]  # never started on it
    running = desired_models(config, keep={name: serving[0]})  # an engine that loaded it before serves on
    assert running.models == serving and "marked corrupt" in running.pending[name]
    clear_corrupt(store, record.repo, record.commit)
    assert [m.commit for m in desired_models(config).models] == [record.commit]
