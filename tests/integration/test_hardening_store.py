"""Issue 16, data safety on the sync side, against real processes, real locks and real (full) filesystems:
gc beside a sync, gc beside a server, old bundles replayed, the receiving models.toml applied to bundles,
a full disk, and kill -9 during gc and import-bundle."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner, Result

from sync.bundle import ImportOptions, export_bundle, import_bundle, plan_export
from sync.bundle_parts import BundleError
from sync.errors import DiskFullError, HubserveError, UnsafePathError, UpstreamError
from sync.importer import import_folder
from sync.lock import Lock, LockedModel, read_lock, write_lock
from sync.manifest import load_config
from sync.store import FileEntry, Store
from sync.syncer import Syncer
from sync.upstream import Upstream as SyncUpstream
from tests.conftest import TINY_REPO, Upstream, copy_folder, hubserve
from tests.fixtures.faulty import FaultyProxy

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


# ---- 4. a full disk: one line, temp files removed, never retried -------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount real tmpfs filesystems of a given size (root only; skipped where mounting is not permitted)."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"disk{len(mounts)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> None:
    """Write a filler file until the filesystem is full."""
    try:
        with (disk / f"filler.{time.monotonic_ns()}").open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".part")) or p.name.startswith("bundle-")]


def test_full_disk_on_lock_write_is_one_line_and_keeps_the_old_lock(
    tmp_path: Path, small_disk: Callable[[str], Path], tiny_llama: Path
) -> None:
    disk = small_disk("4m")
    store = Store(disk / "store")
    a = import_folder(store, tiny_llama, TINY_REPO).record.commit
    (v2 := copy_folder(tiny_llama, tmp_path / "v2")).joinpath("extra.txt").write_text("b\n")
    b = import_folder(store, v2, TINY_REPO).record.commit
    pin(disk, store, a)
    pin(disk, store, b, old=a)
    cfg = write_config(disk, keep_revisions=2)
    lock_text = (disk / "models.lock").read_text()
    fill(disk)
    res = run_cli("rollback", "tiny", "--config", str(cfg))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "no space left" in res.output and len(res.output.strip().splitlines()) == 1
    assert (disk / "models.lock").read_text() == lock_text and temp_files(disk) == []


def test_full_disk_during_sync_is_not_retried_and_leaves_no_part(
    tmp_path: Path, small_disk: Callable[[str], Path], upstream: Upstream, tiny_llama: Path
) -> None:
    upstream.publish(tiny_llama, TINY_REPO)
    disk = small_disk("3m")
    with FaultyProxy(upstream.url) as proxy:
        proxy.faults.bytes_per_s = 512 * 1024  # the weights take ~3 s: time to fill the disk under them
        cfg = write_config(disk, extra=f'[upstream]\nendpoint = "{proxy.url}"\nretries = 3\n')
        store = Store(disk / "store")

        def downloading() -> bool:
            for part in store.tmp_dir.glob("*.part"):
                with contextlib.suppress(FileNotFoundError):  # a small file done between glob and stat
                    if part.stat().st_size > 64 * 1024:
                        return True
            return False

        def fill_once_downloading() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if downloading():
                    fill(disk)
                    return
                time.sleep(0.01)

        filler = threading.Thread(target=fill_once_downloading)
        filler.start()
        report = Syncer(load_config(cfg)).run()
        filler.join()
    error = report.models[0].error
    assert isinstance(error, DiskFullError), error
    weights = [p for m, p, _ in proxy.faults.log if m == "GET" and p.endswith("/model.safetensors")]
    assert len(weights) == 1, weights  # a full disk is not a transient upstream error
    assert list(store.tmp_dir.glob("*.part")) == [] and store.revisions() == []


def test_full_disk_on_import_bundle_refused_before_writing(
    tmp_path: Path, small_disk: Callable[[str], Path], tiny_llama: Path
) -> None:
    # A bundle of a few KB (zstd) that declares a 64 MiB file: refused up front, not written until the disk fills.
    out_store = Store(tmp_path / "outside")
    folder = copy_folder(tiny_llama, tmp_path / "zeros")
    with (folder / "zeros.safetensors").open("wb") as f:
        f.truncate(64 << 20)
    commit = import_folder(out_store, folder, TINY_REPO).record.commit
    bundle = tmp_path / "b.tar.zst"
    export_bundle(out_store, plan_export(out_store, sender_lock(out_store, commit), None, None), bundle, zstd=True)
    assert bundle.stat().st_size < 2 << 20
    disk = small_disk("8m")
    res = run_cli("import-bundle", str(bundle), "--store", str(disk / "store"))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "needs" in res.output and "free" in res.output and len(res.output.strip().splitlines()) == 1
    assert temp_files(disk) == [] and Store(disk / "store").revisions() == []
    assert shutil.disk_usage(disk).used < 1 << 20  # nothing was staged


# ---- 5./6. upstream trees that are no tree; bodies longer than declared --------------------------------------
def test_upstream_tree_with_a_and_a_slash_b_is_refused_before_any_blob(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path
) -> None:
    upstream.publish(tiny_llama, TINY_REPO)
    with FaultyProxy(upstream.url) as proxy:
        proxy.faults.rewrite_tree = lambda items: [
            *items, {"type": "file", "path": "config.json/x", "oid": "1" * 40, "size": 3}]
        cfg = write_config(tmp_path, extra=f'[upstream]\nendpoint = "{proxy.url}"\nretries = 0\n')
        report = Syncer(load_config(cfg)).run()
    assert isinstance(report.models[0].error, UnsafePathError), report.models[0].error
    assert "both a file and the directory" in str(report.models[0].error)
    store = Store(tmp_path / "store")
    assert not (store.repo_dir(TINY_REPO) / "blobs").exists() and store.revisions() == []


def test_upstream_body_longer_than_declared_is_cut_at_the_declared_size(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path
) -> None:
    commit = upstream.publish(tiny_llama, TINY_REPO)
    part = tmp_path / "x.part"
    written: list[int] = []
    liar = FileEntry("model.safetensors", 10, sha256="0" * 64)  # the tree says 10 bytes; the body is 1.7 MB
    with SyncUpstream(upstream.url, retries=3) as up, pytest.raises(UpstreamError, match="longer than the 10 bytes"):
        up.download(TINY_REPO, commit, liar, part, written.append)
    assert sum(written) <= 10 and not part.exists()


# ---- 6. mutated bundles: never a traceback, never a partial store ------------------------------------------
def small_model(dir_: Path, seed: int, files: int = 6, size: int = 4096) -> Path:
    rng = random.Random(seed)
    dir_.mkdir(parents=True)
    (dir_ / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (dir_ / "sub" / "deeper").mkdir(parents=True)
    for i in range(files):
        name = f"weights-{i}.safetensors" if i % 2 else f"sub/deeper/part-{i}.txt"
        (dir_ / name).write_bytes(rng.randbytes(size))
    return dir_


def store_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every path of a store bar its lock and temp area, with size and link target: any change shows."""
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_size if not p.is_dir() else 0,
                                         os.readlink(p) if p.is_symlink() else "")
        for p in sorted(root.rglob("*"))
        if not p.relative_to(root).as_posix().startswith((".locks", ".hubserve/tmp"))
    }


def all_verified(store: Store) -> None:
    for rec in store.revisions():
        assert store.verify(rec) == [], rec.commit


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "zstd"])
def test_mutated_bundles_are_one_error_and_change_nothing(tmp_path: Path, compressed: bool) -> None:
    out_store = Store(tmp_path / "outside")
    commit = import_folder(out_store, small_model(tmp_path / "m", 1), TINY_REPO).record.commit
    bundle = tmp_path / ("b.tar.zst" if compressed else "b.tar")
    export_bundle(out_store, plan_export(out_store, sender_lock(out_store, commit), None, None), bundle,
                  zstd=compressed, key=Ed25519PrivateKey.generate())
    data = bundle.read_bytes()
    inside = Store(tmp_path / "inside")
    import_folder(inside, small_model(tmp_path / "already", 2), TINY_REPO)
    lock_path = tmp_path / "inside.lock"
    rng = random.Random(16)
    outcomes: dict[str, int] = {}
    for i in range(120):
        buf = bytearray(data)
        kind = ("flip", "truncate", "insert", "block")[i % 4]
        pos = rng.randrange(len(buf))
        if kind == "flip":
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 600))
        else:
            buf[pos:pos + 512] = rng.randbytes(512)
        mutated = tmp_path / f"mutated{bundle.suffix}"
        mutated.write_bytes(bytes(buf))
        before, lock_before = store_state(inside.root), lock_path.read_bytes() if lock_path.exists() else None
        try:
            import_bundle(inside, [mutated], lock_path=lock_path)
        except HubserveError:
            assert store_state(inside.root) == before, (kind, pos)
            assert (lock_path.read_bytes() if lock_path.exists() else None) == lock_before, (kind, pos)
            outcomes[f"{kind}: refused"] = outcomes.get(f"{kind}: refused", 0) + 1
        else:  # a byte of padding: the bundle is still whole
            all_verified(inside)
            outcomes[f"{kind}: imported"] = outcomes.get(f"{kind}: imported", 0) + 1
        assert temp_files(inside.root) == []
    print(f"120 mutated bundles ({bundle.suffix}): {outcomes}")
    assert sum(v for k, v in outcomes.items() if k.endswith("refused")) > 60


# ---- 7. kill -9 during import-bundle and gc: nothing half-written -------------------------------------------
def consistent(store: Store, lock_path: Path, pins: set[str]) -> str:
    """The store's records all verify and models.lock pins one of ``pins``, verified; return that pin."""
    all_verified(store)
    pinned = read_lock(lock_path).models["tiny"].commit
    assert pinned in pins and store.get_revision(TINY_REPO, pinned) is not None
    return pinned


def kill_after_lock(args: list[str], store: Store, delay: float) -> bool:
    """Run ``hubserve args`` and SIGKILL it ``delay`` s after it gets the store lock; whether it was still running."""
    with store.locked():
        proc = cli(*args)
        waits_for_lock(proc)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    return proc.returncode == -9


def lock_holder(store: Store, procs: list[subprocess.Popen[str]], timeout: float = 30) -> subprocess.Popen[str] | None:
    """The process among ``procs`` holding the store lock (from /proc/locks), once one does; None when all ended."""
    ino = (store.root / ".locks" / "hubserve-store.lock").stat().st_ino
    by_pid = {p.pid: p for p in procs}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[5].endswith(f":{ino}") and int(fields[4]) in by_pid:
                return by_pid[int(fields[4])]
        time.sleep(0.002)
    return None


def test_kill_9_during_import_bundle_and_gc_leaves_the_last_good_state(tmp_path: Path) -> None:
    out_store = Store(tmp_path / "outside")
    a = import_folder(out_store, small_model(tmp_path / "a", 3), TINY_REPO).record.commit
    b = import_folder(out_store, small_model(tmp_path / "b", 4, files=160, size=32 << 10), TINY_REPO).record.commit
    old = bundle_of(out_store, sender_lock(out_store, a), tmp_path / "old.tar")
    new = bundle_of(out_store, sender_lock(out_store, a, b), tmp_path / "new.tar")
    cfg = receiving_side(tmp_path / "inside")
    inside, lock_path = Store(cfg.parent / "store"), cfg.parent / "models.lock"
    import_bundle(inside, [old], lock_path=lock_path)

    # Four imports start together behind the lock (start-up overlapped); each in turn gets it and is killed
    # at a later point of its work. Readers need no lock, so the store is checked while the next one runs.
    with inside.locked():
        procs = [cli("import-bundle", str(new), "--config", str(cfg)) for _ in range(4)]
        for proc in procs:
            waits_for_lock(proc)
    landed = 0
    for delay in (0.0, 0.05, 0.15, 0.4):
        holder = lock_holder(inside, procs)
        if holder is None:
            break
        time.sleep(delay)
        holder.kill()
        holder.communicate()
        landed += holder.returncode == -9
        consistent(inside, lock_path, {a, b})
    for proc in procs:
        proc.kill()
        proc.communicate()
    import_bundle(inside, [new], lock_path=lock_path)
    assert consistent(inside, lock_path, {b}) == b

    write_config(cfg.parent, keep_revisions=1)  # gc now removes A and everything only A needs
    for delay in (0.0, 0.05):
        landed += kill_after_lock(["gc", "--config", str(cfg), "--yes"], inside, delay)
        assert consistent(inside, lock_path, {b}) == b
    assert run_cli("verify", "--config", str(cfg)).exit_code == 0
    print(f"{landed} of 6 SIGKILLs landed while the command ran")
    assert landed >= 3
