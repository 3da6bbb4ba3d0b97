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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner, Result

from sync.bundle import ImportOptions, export_bundle, import_bundle, plan_export
from sync.bundle_parts import BundleError
from sync.importer import import_folder
from sync.lock import Lock, LockedModel, read_lock, write_lock
from sync.manifest import load_config
from sync.store import Store
from sync.syncer import Syncer
from tests.conftest import TINY_REPO, copy_folder, hubserve

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_cli(*args: str) -> Result:
    """The real CLI in this process (no interpreter start-up): for checks that need no second process."""
    from server.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


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
    res = run_cli("gc", "--config", str(cfg), "--yes")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # a clean exit, no traceback
    assert "http://127.0.0.1:9" in res.output and "--force" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert store.get_revision(TINY_REPO, a) is not None
    res = run_cli("gc", "--config", str(cfg), "--yes", "--force")
    assert res.exit_code == 0, res.output
    assert store.get_revision(TINY_REPO, a) is None and store.get_revision(TINY_REPO, b) is not None


# ---- 2./3. bundles: no replay of older pins; the receiving models.toml applies; unsigned is said ---------
def sender_lock(store: Store, *commits: str) -> Lock:
    """The sending side's models.lock after pinning tiny to each commit in turn."""
    lock = Lock()
    for commit in commits:
        rec = store.get_revision(TINY_REPO, commit)
        assert rec is not None
        lock.put(LockedModel("tiny", TINY_REPO, "main", commit, rec.files, "include=*;exclude=;allow_pickle=true"))
    return lock


def bundle_of(store: Store, lock: Lock, out: Path, key: Ed25519PrivateKey | None = None) -> Path:
    export_bundle(store, plan_export(store, lock, None, None), out, key=key)
    return out


def receiving_side(dir_: Path, model: str = "", endpoint: str = "http://127.0.0.1:9") -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    return write_config(dir_, keep_revisions=2, extra=f'[upstream]\nendpoint = "{endpoint}"\nretries = 0\n',
                        model=model)


def test_replaying_an_older_bundle_is_refused_unless_allowed(
    tmp_path: Path, two_revisions: tuple[Store, str, str]
) -> None:
    store, a, b = two_revisions
    old = bundle_of(store, sender_lock(store, a), tmp_path / "old.tar")
    new = bundle_of(store, sender_lock(store, a, b), tmp_path / "new.tar")
    for name, first in (("both", [old, new]), ("only-new", [new])):  # the inside got the old one, or never did
        cfg = receiving_side(tmp_path / name)
        inside, lock_path = Store(cfg.parent / "store"), cfg.parent / "models.lock"
        for bundle in first:
            import_bundle(inside, [bundle], lock_path=lock_path)
        lock_text = lock_path.read_text()
        if name == "both":  # the CLI: one line naming the model and both commits
            res = hubserve("import-bundle", str(old), "--config", str(cfg))
            assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
            assert all(w in res.stderr for w in ("tiny", a[:12], b[:12], "--allow-downgrade"))
        else:
            with pytest.raises(BundleError, match=f"older than the current pin {b[:12]}"):
                import_bundle(inside, [old], lock_path=lock_path)
        assert lock_path.read_text() == lock_text  # the pin did not move back
        import_bundle(inside, [old], lock_path=lock_path, options=ImportOptions(allow_downgrade=True))
        assert read_lock(lock_path).models["tiny"].commit == a


def test_receiving_rules_apply_to_bundles_and_unsigned_is_said(tmp_path: Path, tiny_llama: Path) -> None:
    out_store = Store(tmp_path / "outside")
    folder = copy_folder(tiny_llama, tmp_path / "with-pickle")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled code runs on load")
    (folder / "notes.md").write_text("excluded on the inside\n")
    commit = import_folder(out_store, folder, TINY_REPO, allow_pickle=True).record.commit
    bundle = bundle_of(out_store, sender_lock(out_store, commit), tmp_path / "b.tar")
    key = Ed25519PrivateKey.generate()

    cfg = receiving_side(tmp_path / "inside", model='exclude = ["*.md"]\n')  # allow_pickle: false (default)
    inside, lock_path = Store(cfg.parent / "store"), cfg.parent / "models.lock"
    with pytest.raises(BundleError, match=r"unsigned.*--allow-unsigned"):
        import_bundle(inside, [bundle], [key.public_key()], lock_path, receiving=load_config(cfg).manifest)
    assert inside.revisions() == []
    res = hubserve("import-bundle", str(bundle), "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "UNSIGNED" in res.stderr
    assert "pytorch_model.bin" in res.stderr and "notes.md" in res.stderr  # said, with the rule
    rec = inside.get_revision(TINY_REPO, commit)
    assert rec is not None and inside.verify(rec) == []
    paths = {f.path for f in rec.files}
    assert "pytorch_model.bin" not in paths and "notes.md" not in paths and "model.safetensors" in paths
    blobs = {p.name for p in (inside.repo_dir(TINY_REPO) / "blobs").iterdir()}
    assert blobs == {f.etag for f in rec.files}  # the refused files' bytes never landed either
    assert {f.path for f in read_lock(lock_path).models["tiny"].files} == paths
    report = Syncer(load_config(cfg)).run()  # the inside's own rules: up to date, with no upstream reachable
    assert report.ok and report.models[0].up_to_date, report.models[0].error

    signed = bundle_of(out_store, sender_lock(out_store, commit), tmp_path / "signed.tar", key=key)
    stranger = Ed25519PrivateKey.generate().public_key()
    other = Store(tmp_path / "other")
    with pytest.raises(BundleError, match="not among the --trust keys"):
        import_bundle(other, [signed], [stranger])
    result = import_bundle(other, [signed], [stranger], options=ImportOptions(allow_unsigned=True))
    assert result.signer is not None and not result.signer_trusted
    sent = out_store.get_revision(TINY_REPO, commit)
    assert sent is not None  # no models.toml here: the defaults, every file but the pickle one
    assert {f.path for f in result.promoted[0].files} == {f.path for f in sent.files} - {"pytorch_model.bin"}
