"""Issue 16, data safety on the sync side, against real processes, real locks and real (full) filesystems:
gc beside a sync, gc beside a server, old bundles replayed, the receiving models.toml applied to bundles,
a full disk, and kill -9 during gc and import-bundle."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync.importer import import_folder
from sync.lock import Lock, LockedModel, read_lock, write_lock
from sync.store import Store
from tests.conftest import TINY_REPO, copy_folder, hubserve

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def waits_for_lock(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Wait until ``proc`` sleeps in the store lock's poll loop (filelock retries every 50 ms with
    time.sleep; nothing a CLI command does before taking the lock sleeps): everything it did before
    taking the lock is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "nanosleep" in Path(f"/proc/{proc.pid}/wchan").read_text():
                return
        except OSError:
            break
        time.sleep(0.002)
    raise AssertionError(f"{proc.args} never waited for the store lock (exit {proc.poll()})")


def write_config(dir_: Path, keep_revisions: int = 1, extra: str = "", model: str = "") -> Path:
    path = dir_ / "models.toml"
    path.write_text(f'[store]\npath = "store"\nkeep_revisions = {keep_revisions}\n{extra}\n'
                    f'[[models]]\nname = "tiny"\nrepo = "{TINY_REPO}"\nrevision = "main"\n{model}\n')
    return path


def pin(dir_: Path, store: Store, commit: str, old: str | None = None) -> None:
    """Write models.lock as `hubserve sync` leaves it: tiny pinned to ``commit`` (moved from ``old``)."""
    lock = read_lock(dir_ / "models.lock") if old else Lock()
    record = store.get_revision(TINY_REPO, commit)
    assert record is not None
    lock.put(LockedModel("tiny", TINY_REPO, "main", commit, record.files, "include=*;exclude=;allow_pickle=false"))
    write_lock(dir_ / "models.lock", lock)


@pytest.fixture
def two_revisions(tmp_path: Path, tiny_llama: Path) -> Iterator[tuple[Store, str, str]]:
    """A store holding two revisions of tiny, A pinned in models.lock, B newer."""
    store = Store(tmp_path / "store")
    a = import_folder(store, tiny_llama, TINY_REPO).record.commit
    v2 = copy_folder(tiny_llama, tmp_path / "v2")
    (v2 / "extra.txt").write_text("revision b\n")
    b = import_folder(store, v2, TINY_REPO).record.commit
    pin(tmp_path, store, a)
    yield store, a, b


# ---- 1. gc decides under the store lock, and never removes what a server serves -------------------------
def test_gc_waiting_for_a_sync_keeps_what_the_sync_pinned(
    tmp_path: Path, two_revisions: tuple[Store, str, str]
) -> None:
    store, a, b = two_revisions
    cfg = write_config(tmp_path)
    with store.locked():  # a `sync --update` holds the lock...
        gc = cli("gc", "--config", str(cfg), "--yes")
        waits_for_lock(gc)  # ...gc has started and waits for it
        pin(tmp_path, store, b, old=a)  # ...and the sync moves the pin to B before letting go
    out, errs = gc.communicate(timeout=60)
    assert gc.returncode == 0, errs
    rec = store.get_revision(TINY_REPO, b)
    assert rec is not None and store.verify(rec) == [], out  # what the sync pinned survived
    assert store.get_revision(TINY_REPO, a) is None  # and gc did its job on what no pin keeps
    status = hubserve("status", "--config", str(cfg))
    assert "verified" in status.stdout and "missing" not in status.stdout


def test_gc_keeps_what_a_running_server_serves_and_refuses_when_it_cannot_ask(
    tmp_path: Path, two_revisions: tuple[Store, str, str]
) -> None:
    from tests.integration.test_daemon import _served_app

    store, a, b = two_revisions
    pin(tmp_path, store, b, old=a)  # the pin moved to B, keep_revisions = 1: only the server still needs A
    cfg = write_config(tmp_path)
    url, stop = _served_app(tmp_path, a)
    try:
        res = hubserve("gc", "--config", str(cfg), "--server", url, "--yes")
        assert res.returncode == 0, res.stderr
    finally:
        stop()
    assert store.get_revision(TINY_REPO, a) is not None and store.get_revision(TINY_REPO, b) is not None

    # [daemon] server configured but down: gc refuses (one line, nothing removed) unless --force.
    cfg = write_config(tmp_path, extra='[daemon]\nserver = "http://127.0.0.1:9"\n')
    res = hubserve("gc", "--config", str(cfg), "--yes")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "http://127.0.0.1:9" in res.stderr and "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert store.get_revision(TINY_REPO, a) is not None
    res = hubserve("gc", "--config", str(cfg), "--yes", "--force")
    assert res.returncode == 0, res.stderr
    assert store.get_revision(TINY_REPO, a) is None and store.get_revision(TINY_REPO, b) is not None
