"""hubserve daemon as a real process against a real upstream (a mirror on loopback, throttled where a
download must be caught in flight): following, webhooks, invalid edits, SIGTERM and SIGKILL."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sync.lock import read_lock
from sync.manifest import load_config
from sync.store import Store
from sync.syncer import Syncer
from tests.conftest import TINY_REPO, Upstream, copy_folder, hubserve
from tests.fixtures.faulty import FaultyProxy
from tests.integration.test_sync import tiny_model, write_manifest

pytestmark = pytest.mark.integration

SECRET_ENV = "HUBSERVE_TEST_WEBHOOK_SECRET"
SECRET = "correct horse battery staple"
OTHER_REPO = "hubserve-test/tiny-pinned"


class DaemonProcess:
    """``hubserve daemon`` in a subprocess; its log lines collected by a thread as they arrive."""

    def __init__(self, cfg: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "daemon", "--config", str(cfg), "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} within {timeout}s; log:\n{self.log}")

    def started(self) -> DaemonProcess:
        self.url = self.wait_for(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        return self

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons; every one still running at the end is killed."""
    started: list[DaemonProcess] = []

    def start(cfg: Path, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(cfg, *args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def locked(cfg: Path, name: str = "tiny") -> str | None:
    entry = read_lock(cfg.with_suffix(".lock")).get(name)
    return entry.commit if entry else None


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def all_verified(store: Store) -> None:
    for rec in store.revisions():
        assert store.verify(rec) == [], f"{rec.commit[:12]} corrupt"


def revision(base: Path, dest: Path, weights: int = 0, small_files: int = 0, seed: int = 0) -> Path:
    """A copy of ``base`` that differs from it: a marker file, optionally new random weights and small files."""
    folder = copy_folder(base, dest)
    rng = random.Random(seed)
    (folder / "revision.txt").write_text(f"{dest.name} {seed}\n")
    if weights:
        (folder / "model.safetensors").write_bytes(rng.randbytes(weights))
    for i in range(small_files):
        (folder / "extra" / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
        (folder / "extra" / f"{i:03d}.txt").write_text(f"{seed}-{i}-{rng.random()}\n")
    return folder


def daemon_section(cfg: Path, **keys: object) -> None:
    cfg.write_text(cfg.read_text() + "\n[daemon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))


def test_follow_moves_within_one_interval_and_unfollowed_pins_stay(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    a = upstream.publish(tiny_llama, TINY_REPO)
    pinned_a = upstream.publish(tiny_llama, OTHER_REPO)
    cfg = write_manifest(
        tmp_path, upstream.url, [tiny_model(follow=True), {"name": "pinned", "repo": OTHER_REPO, "revision": "main"}]
    )
    d = daemons(cfg, "--interval", "2").started()
    d.wait_for(r"tiny: promoted")
    wait_until(lambda: locked(cfg) == a and locked(cfg, "pinned") == pinned_a, 10, "the first sync's lock")

    b = upstream.publish(revision(tiny_llama, tmp_path / "b"), TINY_REPO)
    pinned_b = upstream.publish(revision(tiny_llama, tmp_path / "pb"), OTHER_REPO)
    moved_at = time.monotonic()
    wait_until(lambda: locked(cfg) == b, 2 + 15, "the followed branch to move")  # one interval, plus the sync
    picked_up = time.monotonic() - moved_at
    d.wait_for(rf"tiny: {a[:12]} -> {b[:12]}")
    d.wait_for(r"tiny: promoted " + b[:12])

    time.sleep(2.5)  # one more interval: the unfollowed branch pin must still not move
    assert locked(cfg, "pinned") == pinned_a != pinned_b
    assert read_lock(cfg.with_suffix(".lock")).models["tiny"].history == (a,)
    store = Store(load_config(cfg).store_path)
    assert store.get_revision(TINY_REPO, a) is not None  # keep_revisions = 2: the pin and the one before

    # a third commit pushes the first out of [store] keep_revisions: the daemon prunes it (no server to ask)
    c = upstream.publish(revision(tiny_llama, tmp_path / "c", weights=4096), TINY_REPO)
    wait_until(lambda: locked(cfg) == c, 2 + 15, "the followed branch to move again")
    d.wait_for(rf"pruned 1 revision\(s\) beyond \[store\] keep_revisions = 2: {a[:12]}")
    assert store.get_revision(TINY_REPO, a) is None and not store.snapshot_dir(TINY_REPO, a).exists()
    assert store.get_revision(TINY_REPO, b) is not None and store.get_revision(TINY_REPO, c) is not None
    assert store.get_revision(OTHER_REPO, pinned_a) is not None  # another repo: untouched
    assert d.terminate() == 0
    print(f"follow picked up in {picked_up:.1f}s (interval 2s)")
    res = hubserve("verify", "--config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr


def _served_app(tmp_path: Path, commit: str) -> tuple[str, Callable[[], None]]:
    """The real server app (engines not started) on loopback: its /health reports the served commit."""
    import uvicorn

    from server.app import create_app
    from server.engines.base import ModelInfo
    from server.engines.vllm import VLLMEngine
    from server.registry import Registry
    from server.settings import Settings

    settings = Settings.model_validate({"state_url": f"sqlite://{tmp_path / 'state.db'}"})
    info = ModelInfo(name="tiny", repo=TINY_REPO, commit=commit, task="text-generation", snapshot=str(tmp_path))
    app = create_app(settings, Registry([VLLMEngine(info, settings)]), start_engines=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, "the server app")

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def test_webhook_secret_refs_and_metrics(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    a = upstream.publish(tiny_llama, TINY_REPO)
    cfg = write_manifest(tmp_path, upstream.url, [tiny_model(follow=True)])
    daemon_section(cfg, webhook_secret_env=SECRET_ENV)
    server_url, stop_server = _served_app(tmp_path, a)
    try:
        d = daemons(cfg, "--interval", "300", "--server", server_url, env={SECRET_ENV: SECRET}).started()
        d.wait_for(r"tiny: promoted")
        b = upstream.publish(revision(tiny_llama, tmp_path / "b"), TINY_REPO)
        hook = f"{d.url}/webhooks/hub"
        payload = {
            "event": {"action": "update", "scope": "repo.content"},
            "repo": {"type": "model", "name": TINY_REPO, "headSha": "0" * 40},
            "updatedRefs": [{"ref": "refs/heads/main", "oldSha": a, "newSha": "f" * 40}],
            "webhook": {"id": "x", "version": 3},
        }
        with httpx.Client(timeout=10) as http:
            assert http.post(hook, json=payload).status_code == 401
            assert http.post(hook, json=payload, headers={"X-Webhook-Secret": "wrong"}).status_code == 403
            good = {"X-Webhook-Secret": SECRET}
            bad_json = http.post(hook, content=b"{not json", headers={**good, "Content-Type": "application/json"})
            assert bad_json.status_code == 400
            other = {**payload, "repo": {"type": "model", "name": "someone/else", "headSha": "1" * 40}}
            unknown = http.post(hook, json=other, headers=good)
            assert unknown.status_code == 202 and unknown.json()["models"] == []
            tag = {**payload, "updatedRefs": [{"ref": "refs/tags/v1", "oldSha": a, "newSha": b}]}
            assert http.post(hook, json=tag, headers=good).json()["models"] == []  # tiny follows main, not v1
            time.sleep(1.5)
            assert locked(cfg) == a and "reconcile (webhook)" not in d.log  # refused or unrelated: nothing moved

            sent = time.monotonic()
            accepted = http.post(hook, json=payload, headers=good)
            assert accepted.status_code == 202 and accepted.json()["models"] == ["tiny"]
            wait_until(lambda: locked(cfg) == b, 20, "the webhook's re-resolve")  # interval is 300 s
            print(f"webhook to new pin: {time.monotonic() - sent:.1f}s")
            d.wait_for(rf"tiny: {a[:12]} -> {b[:12]}")

            health = http.get(f"{d.url}/health").json()
            assert health["status"] == "ok" and health["models"]["tiny"]["commit"] == b
            metrics = http.get(f"{d.url}/metrics").text
        assert f'hubserve_daemon_locked_commit{{commit="{b}",model="tiny"}} 1.0' in metrics
        assert f'hubserve_daemon_served_commit{{commit="{a}",model="tiny"}} 1.0' in metrics
        downloaded = re.search(r"^hubserve_daemon_downloaded_bytes_total (\S+)$", metrics, re.M)
        assert downloaded and float(downloaded.group(1)) > (tiny_llama / "model.safetensors").stat().st_size
        last = re.search(r"^hubserve_daemon_last_success_timestamp_seconds (\S+)$", metrics, re.M)
        assert last and abs(float(last.group(1)) - time.time()) < 60
        assert 'hubserve_daemon_reconciles_total{trigger="webhook"} 1.0' in metrics
        assert SECRET not in d.log

        c = upstream.publish(revision(tiny_llama, tmp_path / "c"), TINY_REPO)
        d.proc.send_signal(signal.SIGHUP)  # reconcile now, following included
        wait_until(lambda: locked(cfg) == c, 20, "the SIGHUP reconcile")
        d.wait_for(r"reconcile \(sighup\)")
        # a is beyond keep_revisions now, but the server still serves it: the daemon does not prune it
        d.wait_for(rf"kept {a[:12]} beyond keep_revisions: {re.escape(server_url)} still serves it")
        assert Store(load_config(cfg).store_path).get_revision(TINY_REPO, a) is not None
        assert "pruned" not in d.log
        assert d.terminate() == 0
    finally:
        stop_server()


def test_invalid_edit_is_logged_once_and_recovers(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    a = upstream.publish(tiny_llama, TINY_REPO)
    other = upstream.publish(tiny_llama, OTHER_REPO)
    cfg = write_manifest(tmp_path, upstream.url, [tiny_model()])
    good = cfg.read_text()
    d = daemons(cfg, "--interval", "1").started()
    d.wait_for(r"tiny: promoted")

    cfg.write_text(good.replace('revision = "main"', 'revision = "main"\nfollow = "sometimes"'))
    err = d.wait_for(r"models\.toml not applied.*")
    assert "models[0] (tiny).follow" in err.group(0) and str(cfg) in err.group(0)
    time.sleep(3)  # three intervals and the watch: still one line
    assert sum("not applied" in line for line in d.lines) == 1, d.log
    assert d.proc.poll() is None
    with httpx.Client(timeout=10) as http:
        health = http.get(f"{d.url}/health").json()
    assert health["status"] == "degraded" and "follow" in health["config_error"]
    assert health["models"]["tiny"]["commit"] == a  # the last good configuration is in force

    # An editor's way: write elsewhere, rename over the file.
    fixed = tmp_path / ".models.toml.new"
    fixed.write_text(good + f'\n[[models]]\nname = "pinned"\nrepo = "{OTHER_REPO}"\nrevision = "main"\n')
    fixed.replace(cfg)
    d.wait_for(r"configuration reloaded")
    wait_until(lambda: locked(cfg, "pinned") == other, 20, "the model added by the fix")
    with httpx.Client(timeout=10) as http:
        assert http.get(f"{d.url}/health").json()["config_error"] is None
    assert locked(cfg) == a
    assert d.terminate() == 0


def test_upstream_failure_backs_off_and_keeps_the_store(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    a = upstream.publish(tiny_llama, TINY_REPO)
    with FaultyProxy(upstream.url) as proxy:
        cfg = write_manifest(tmp_path, proxy.url, [tiny_model(follow=True)])
        cfg.write_text(cfg.read_text().replace("retries = 4", "retries = 0"))
        daemon_section(cfg, backoff_max=1.0)
        Syncer(load_config(cfg)).run()
        proxy.faults.fail = [(503, {})] * 3
        d = daemons(cfg, "--interval", "300").started()
        d.wait_for(r"reconcile failed .* retrying in")
        d.wait_for(r"tiny: resolved to " + a[:12], timeout=20)  # backed off (1 s cap), then recovered
        assert sum("retrying in" in line for line in d.lines) == 3
    with httpx.Client(timeout=10) as http:
        metrics = http.get(f"{d.url}/metrics").text
    assert 'hubserve_daemon_failures_total{model="tiny"} 3.0' in metrics
    assert locked(cfg) == a and d.terminate() == 0


def test_sigterm_mid_download_exits_zero_and_store_verifies(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    a = upstream.publish(tiny_llama, TINY_REPO)
    store = Store(tmp_path / "store")
    with FaultyProxy(upstream.url) as proxy:
        cfg = write_manifest(tmp_path, proxy.url, [tiny_model(follow=True)])
        Syncer(load_config(cfg)).run()
        b = upstream.publish(revision(tiny_llama, tmp_path / "b", weights=12 << 20), TINY_REPO)
        proxy.faults.bytes_per_s = 2 << 20  # 6 s for the new weights
        d = daemons(cfg, "--interval", "300").started()
        wait_until(lambda: any(p.stat().st_size > 1 << 20 for p in store.tmp_dir.glob("*.part")), 30, "a download")
        signalled = time.monotonic()
        rc = d.terminate()
        took = time.monotonic() - signalled
    assert rc == 0, d.log
    print(f"SIGTERM mid-download: exit 0 after {took:.1f}s")
    assert took < 10
    d.wait_for(r"stopped mid-sync")
    assert store.get_revision(TINY_REPO, b) is None and locked(cfg) == a
    all_verified(store)
    res = hubserve("verify", "--config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr


KILLS = 12  # each costs a daemon start (~2 s on 2 cores); 12 still land before, during and after the download


def test_sigkill_at_random_moments_never_breaks_the_store(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    rng = random.Random(6)
    base = copy_folder(tiny_llama, tmp_path / "base")
    upstream.publish(base, TINY_REPO)
    store = Store(tmp_path / "store")
    landed = {"before download": 0, "mid-download": 0, "promoted, lock not yet moved": 0, "after the lock moved": 0}
    with FaultyProxy(upstream.url) as proxy:
        cfg = write_manifest(tmp_path, proxy.url, [tiny_model(follow=True)])
        Syncer(load_config(cfg)).run()
        proxy.faults.bytes_per_s = 1 << 20
        newest = ""
        for i in range(KILLS):
            before = locked(cfg)
            assert before is not None
            newest = upstream.publish(
                revision(base, tmp_path / f"r{i}", weights=768 << 10, small_files=24, seed=i), TINY_REPO
            )
            d = daemons(cfg, "--interval", "300")
            # Most kills from the first byte on (~1 s of download at 1 MiB/s, then promotion), some earlier.
            d.wait_for(r"reconcile \(start\)" if i % 4 == 0 else r": downloading \d+ file", timeout=60)
            time.sleep(rng.uniform(0.0, 1.5))
            d.proc.send_signal(signal.SIGKILL)
            d.kill()

            after = locked(cfg)
            if after == newest:
                landed["after the lock moved"] += 1
            elif store.get_revision(TINY_REPO, newest) is not None:
                landed["promoted, lock not yet moved"] += 1
            else:
                landed["mid-download" if "downloading" in d.log else "before download"] += 1
            assert after in (before, newest)
            prev = store.get_revision(TINY_REPO, before)
            assert prev is not None and store.verify(prev) == [], f"kill {i}: the verified revision broke"
            all_verified(store)
        print(f"{KILLS} SIGKILLs landed: {landed}")
        assert landed["mid-download"] >= 1, landed

        proxy.faults.bytes_per_s = None
        d = daemons(cfg, "--interval", "300").started()
        wait_until(lambda: locked(cfg) == newest, 30, "the next run to converge")
        assert d.terminate() == 0
    res = hubserve("verify", "--config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    assert store.get_revision(TINY_REPO, newest) is not None
    shutil.rmtree(tmp_path / "base")
