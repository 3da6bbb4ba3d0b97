"""Air-gap bundles end to end: a store synced from a real mirror is exported by the real CLI, imported into an
empty store, and served again; damaged, partial, hostile and untrusted bundles are refused with their own
message while the receiving store stays byte-for-byte as it was."""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.desired import resolve_models
from sync.bundle import MANIFEST_NAME, export_bundle, import_bundle, plan_export
from sync.bundle_parts import BundleError, part_path
from sync.bundle_sign import load_public_key
from sync.hashing import FileHasher
from sync.importer import import_folder
from sync.lock import Lock, LockedModel, read_lock
from sync.manifest import load_config
from sync.mirror import make_mirror
from sync.store import FileEntry, RevisionRecord, Store, now_iso
from sync.syncer import Syncer
from tests.conftest import MINILM_REPO, TINY_REPO, hubserve

pytestmark = pytest.mark.integration


def write_manifest(dir_: Path, endpoint: str, models: list[tuple[str, str]]) -> Path:
    text = f'[store]\npath = "store"\n[upstream]\nendpoint = "{endpoint}"\n'
    for name, repo in models:
        text += f'[[models]]\nname = "{name}"\nrepo = "{repo}"\nrevision = "main"\n'
    (dir_ / "models.toml").write_text(text)
    return dir_ / "models.toml"


def write_keys(dir_: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = dir_ / f"{name}.pem", dir_ / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def store_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path of a store (bar its lock files) with size, mtime and link target: any change shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(".locks") or rel.startswith(".hubserve/tmp"):
            continue
        st = p.lstat()
        out[rel] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns, os.readlink(p) if p.is_symlink() else "")
    return out


@dataclass
class Outside:
    """The connected side: an upstream mirror, a store synced from it, its config and lock."""

    base: Path
    upstream: Store
    url: str
    config: Path
    commits: dict[str, str]
    key: Path
    pub: Path
    other_pub: Path

    @property
    def store(self) -> Store:
        return Store(self.base / "store")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, minilm: Path) -> Iterator[Outside]:
    base = tmp_path_factory.mktemp("outside")
    upstream = Store(base / "upstream")
    upstream.ensure()
    commits = {
        "tiny": import_folder(upstream, tiny_llama, TINY_REPO).record.commit,
        "minilm": import_folder(upstream, minilm, MINILM_REPO).record.commit,
    }
    server = make_mirror(upstream, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cfg = write_manifest(base, url, [("tiny", TINY_REPO), ("minilm", MINILM_REPO)])
    assert Syncer(load_config(cfg)).run().ok
    key, pub = write_keys(base, "site")
    _, other_pub = write_keys(base, "other")
    try:
        yield Outside(base, upstream, url, cfg, commits, key, pub, other_pub)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tiny_bundle(outside: Outside, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unsigned, uncompressed bundle of the tiny model (the base of the refusal tests)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny.tar"
    manifest = plan_export(outside.store, read_lock(outside.config.with_suffix(".lock")), ["tiny"], None)
    export_bundle(outside.store, manifest, out)
    return out


@pytest.fixture
def receiving(tmp_path: Path, minilm: Path) -> Store:
    """A store that already holds something, so that 'unchanged' means something."""
    store = Store(tmp_path / "inside-store")
    import_folder(store, minilm, "acme/already-here")
    return store


def test_round_trip_signed_then_served_byte_identical(outside: Outside, tmp_path: Path) -> None:
    out = tmp_path / "usb" / "models.tar.zst"
    res = hubserve("export", "--config", str(outside.config), "--out", str(out), "--sign", str(outside.key),
                   "--split", "10M")
    assert res.returncode == 0, res.stderr
    parts = [Path(line) for line in res.stdout.split()]
    assert parts == [part_path(out, i) for i in range(len(parts))] and len(parts) >= 2
    assert "signed by key" in res.stderr and re.search(r"export models\.tar\.zst: wrote [\d.]+ MiB in", res.stderr)

    inside = tmp_path / "inside"
    inside.mkdir()
    cfg = write_manifest(inside, "http://127.0.0.1:9", [("tiny", TINY_REPO), ("minilm", MINILM_REPO)])
    res = hubserve("import-bundle", *map(str, parts), "--config", str(cfg), "--trust", str(outside.pub))
    assert res.returncode == 0, res.stderr
    assert "trusted" in res.stderr and res.stdout.count("verified and promoted") == 2
    assert re.search(r"import models\.tar\.zst\.000: verifying \d+ file\(s\)", res.stderr), res.stderr

    assert read_lock(inside / "models.lock").models == read_lock(outside.config.with_suffix(".lock")).models
    res = hubserve("verify", "--store", str(inside / "store"))
    assert res.returncode == 0 and "2 revision(s) verified" in res.stdout, res.stdout + res.stderr
    # `hubserve serve` resolves the same models at the same commits from the imported store.
    served = {m.name: (m.repo, m.commit, m.task, m.weights_bytes) for m in resolve_models(load_config(cfg))}
    assert served == {m.name: (m.repo, m.commit, m.task, m.weights_bytes)
                      for m in resolve_models(load_config(outside.config))}
    # `hubserve sync` inside is a no-op: the imported store is exactly a synced one (the upstream is unreachable).
    res = hubserve("sync", "--config", str(cfg))
    assert res.returncode == 0 and res.stdout.count("up to date") == 2, res.stdout + res.stderr

    # The imported store serves through the mirror: the stock client downloads byte-identical files.
    server = make_mirror(Store(inside / "store"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        script = ("import sys; from huggingface_hub import snapshot_download as s; "
                  "print(s(sys.argv[1], cache_dir=sys.argv[2], endpoint=sys.argv[3]))")
        url = f"http://127.0.0.1:{server.server_address[1]}"
        for repo in (TINY_REPO, MINILM_REPO):
            got = subprocess.run([sys.executable, "-c", script, repo, str(tmp_path / "client"), url],
                                 capture_output=True, text=True, timeout=120)
            assert got.returncode == 0, got.stderr[-2000:]
            snap = Path(got.stdout.strip())
            src = outside.store.snapshot_dir(repo, outside.commits["tiny" if repo == TINY_REPO else "minilm"])
            names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
            assert names and sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == names
            _, mismatch, errors = filecmp.cmpfiles(src, snap, names, shallow=False)
            assert (mismatch, errors) == ([], [])
    finally:
        server.shutdown()
        server.server_close()


def test_incremental_since_carries_only_new_blobs(outside: Outside, tmp_path: Path, tiny_llama: Path) -> None:
    base = tmp_path / "outside"
    shutil.copytree(outside.base / "store", base / "store", symlinks=True)
    cfg = write_manifest(base, outside.url, [("tiny", TINY_REPO), ("minilm", MINILM_REPO)])
    shutil.copy(outside.config.with_suffix(".lock"), base / "models.lock")
    first_lock = tmp_path / "inside.lock"
    shutil.copy(base / "models.lock", first_lock)
    first = tmp_path / "first.tar"
    assert hubserve("export", "--config", str(cfg), "--out", str(first)).returncode == 0

    # A new revision upstream changes one file of tiny; sync --update picks it up.
    changed = tmp_path / "tiny-v2"
    shutil.copytree(tiny_llama, changed)
    (changed / "generation_config.json").write_text('{"max_new_tokens": 7}\n')
    new_commit = import_folder(outside.upstream, changed, TINY_REPO).record.commit
    assert Syncer(load_config(cfg)).run(update={"tiny"}).ok
    try:
        second = tmp_path / "second.tar"
        res = hubserve("export", "--config", str(cfg), "--out", str(second), "--since", str(first_lock))
        assert res.returncode == 0, res.stderr
        with tarfile.open(second) as tar:
            names = tar.getnames()
            manifest = json.loads(tar.extractfile(MANIFEST_NAME).read())  # type: ignore[union-attr]
        assert [r["commit"] for r in manifest["revisions"]] == [new_commit]
        assert [n for n in names if n.startswith("blobs/")] == [f"blobs/models--hubserve-test--tiny-llama/"
                                                                f"{manifest['blobs'][0]['etag']}"]
        assert len(manifest["blobs"]) == 1  # only the changed generation_config.json

        lonely = Store(tmp_path / "lonely")
        with pytest.raises(BundleError, match="incremental; import the earlier bundle"):
            import_bundle(lonely, [second])
        assert not lonely.revisions()

        inside = Store(tmp_path / "inside")
        import_bundle(inside, [first], lock_path=tmp_path / "models.lock")
        import_bundle(inside, [second], lock_path=tmp_path / "models.lock")
        assert read_lock(tmp_path / "models.lock").models == read_lock(base / "models.lock").models
        assert {(r.repo, r.commit) for r in inside.revisions()} == {
            (TINY_REPO, outside.commits["tiny"]), (TINY_REPO, new_commit), (MINILM_REPO, outside.commits["minilm"])}
        assert all(inside.verify(r) == [] for r in inside.revisions())
        assert inside.read_ref(TINY_REPO, "main") == new_commit
    finally:
        outside.upstream.write_ref(TINY_REPO, "main", outside.commits["tiny"])


# ---- refusals: each with its own message, the receiving store unchanged ---------------------------------
def _rewrite(src: Path, dst: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A copy of a bundle with hostile entries slipped in right after the manifest."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for i, member in enumerate(tin):
            tout.addfile(member, tin.extractfile(member))
            if i == 0:
                for info, data in extra:
                    tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def _blob_offset(bundle: Path) -> int:
    with tarfile.open(bundle) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)
        return biggest.offset_data + biggest.size // 2


def _tampered(b: Path, d: Path) -> list[Path]:
    data = bytearray(b.read_bytes())
    data[_blob_offset(b)] ^= 0x01
    (d / "t.tar").write_bytes(data)
    return [d / "t.tar"]


def _truncated(b: Path, d: Path) -> list[Path]:
    (d / "t.tar").write_bytes(b.read_bytes()[: _blob_offset(b)])
    return [d / "t.tar"]


def _parts(outside: Outside, d: Path) -> list[Path]:
    manifest = plan_export(outside.store, read_lock(outside.config.with_suffix(".lock")), ["tiny"], None)
    return export_bundle(outside.store, manifest, d / "p.tar", split=400_000).paths


def _traversal(b: Path, d: Path) -> list[Path]:
    info = tarfile.TarInfo("../../escaped.txt")
    info.size = 3
    return [_rewrite(b, d / "t.tar", [(info, b"pwn")])]


def _symlink(b: Path, d: Path) -> list[Path]:
    info = tarfile.TarInfo("blobs/models--hubserve-test--tiny-llama/evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [_rewrite(b, d / "t.tar", [(info, None)])]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tampered", r"failed verification: expected sha256 [0-9a-f]{64}, got"),
        ("truncated", r"truncated"),
        ("missing part", r"part\(s\) 2 missing"),
        ("parts out of order", r"parts out of order: part 1 .* given in position 0"),
        ("traversal entry", r"path-traversal entry '../../escaped.txt'"),
        ("symlink entry", r"symlink entry .* -> '/etc/passwd'"),
        ("wrong signature", r"signed by key [0-9a-f]{16}, which is not among the --trust keys"),
        ("unsigned", r"bundle is unsigned, but --trust keys are configured"),
        ("altered manifest", r"signature does not match its manifest"),
    ],
)
def test_bad_bundles_are_refused_and_change_nothing(
    case: str, message: str, outside: Outside, tiny_bundle: Path, receiving: Store, tmp_path: Path,
) -> None:
    trust = [load_public_key(outside.pub)] if case in ("wrong signature", "unsigned", "altered manifest") else []
    if case == "tampered":
        files = _tampered(tiny_bundle, tmp_path)
    elif case == "truncated":
        files = _truncated(tiny_bundle, tmp_path)
    elif case in ("missing part", "parts out of order"):
        parts = _parts(outside, tmp_path)
        assert len(parts) >= 4
        files = [p for p in parts if p != parts[2]] if case == "missing part" else [parts[1], parts[0], *parts[2:]]
    elif case == "traversal entry":
        files = _traversal(tiny_bundle, tmp_path)
    elif case == "symlink entry":
        files = _symlink(tiny_bundle, tmp_path)
    elif case == "unsigned":
        files = [tiny_bundle]
    else:
        manifest = plan_export(outside.store, read_lock(outside.config.with_suffix(".lock")), ["tiny"], None)
        key = Ed25519PrivateKey.generate() if case == "wrong signature" else _load_key(outside.key)
        files = export_bundle(outside.store, manifest, tmp_path / "s.tar", key=key).paths
        if case == "altered manifest":
            data = files[0].read_bytes()
            files[0].write_bytes(data.replace(b'"revision": "main"', b'"revision": "evil"', 1))
    before = store_state(receiving.root)
    with pytest.raises(BundleError, match=message):
        import_bundle(receiving, files, trust, lock_path=tmp_path / "models.lock")
    assert store_state(receiving.root) == before
    assert not (tmp_path / "models.lock").exists()
    assert not list(receiving.tmp_dir.iterdir())  # the staging area is gone too


def _load_key(path: Path) -> Ed25519PrivateKey:
    from sync.bundle_sign import load_private_key

    return load_private_key(path)


def test_rotten_blob_is_refused_by_export_verify_and_by_import(outside: Outside, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    shutil.copytree(outside.store.root, store.root, symlinks=True)
    record = store.get_revision(TINY_REPO, outside.commits["tiny"])
    assert record is not None
    weights = next(f for f in record.files if f.path == "model.safetensors")
    blob = store.blob_path(TINY_REPO, weights.etag)
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x40  # same size: only a re-hash sees it
    blob.write_bytes(data)
    manifest = plan_export(store, read_lock(outside.config.with_suffix(".lock")), ["tiny"], None)
    with pytest.raises(BundleError, match="blob in the store does not match its sha256"):
        export_bundle(store, manifest, tmp_path / "v.tar", verify=True)
    assert not (tmp_path / "v.tar").exists()
    shipped = export_bundle(store, manifest, tmp_path / "fast.tar").paths  # kernel copy, no re-hash
    with pytest.raises(BundleError, match=r"model\.safetensors failed verification"):
        import_bundle(Store(tmp_path / "inside"), shipped)


def test_cli_refusal_is_one_line_exit_1(outside: Outside, tiny_bundle: Path, tmp_path: Path) -> None:
    bad = _tampered(tiny_bundle, tmp_path)[0]
    res = hubserve("import-bundle", str(bad), "--store", str(tmp_path / "store"))
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    # the progress line that started the import, then the error: one line, no traceback
    assert len(lines) == 2 and re.fullmatch(rf"import {re.escape(bad.name)}: verifying \d+ file\(s\), [\d.]+ MiB",
                                            lines[0]), res.stderr
    assert lines[-1].startswith("error: ") and "failed verification" in lines[-1], res.stderr


def test_plain_bundle_is_a_tar_that_tar_lists(tiny_bundle: Path) -> None:
    res = subprocess.run(["tar", "tf", str(tiny_bundle)], capture_output=True, text=True, check=True)
    names = res.stdout.split()
    assert names[0] == MANIFEST_NAME
    assert all(n.startswith("blobs/models--hubserve-test--tiny-llama/") for n in names[1:])


# ---- memory: a >= 1 GiB bundle imports in constant memory --------------------------------------------
def _big_store(root: Path, size: int) -> tuple[Store, Lock]:
    """A store with one revision of ``size`` random bytes, written straight into blobs/ by the store's code."""
    store = Store(root)
    store.ensure()
    tmp, chunk = store.new_tmp_file("big"), os.urandom(8 << 20)
    hasher = FileHasher(True, size)
    with tmp.open("wb") as f:
        for i in range(0, size, len(chunk)):
            block = (i.to_bytes(8, "little") + chunk[8:])[: size - i]  # no two blocks alike: nothing dedups
            hasher.update(block)
            f.write(block)
    big = FileEntry("model.safetensors", size, sha256=hasher.hexdigest())
    store.add_blob("acme/big", big, tmp)
    record = RevisionRecord("acme/big", "b" * 40, (big,), now_iso(), refs=("main",))
    store.promote(record, refs=("main",))
    return store, Lock({"big": LockedModel("big", "acme/big", "main", record.commit, record.files)})


def _peak_rss_mib(proc: subprocess.Popen[bytes]) -> float:
    """The peak RSS of ``proc``'s own address space (VmHWM), polled until it exits. Not ``ru_maxrss``: the
    kernel folds into it the RSS of the image the child was forked from, i.e. this whole pytest process."""
    peak_kib = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError):
            found = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{proc.pid}/status").read_text(), re.M)
            peak_kib = max(peak_kib, int(found.group(1))) if found else peak_kib
        time.sleep(0.02)
    assert peak_kib, "the import ended before its memory could be read"
    return peak_kib / 1024


def test_importing_a_1gib_bundle_stays_under_200mib_rss(tmp_path: Path) -> None:
    size = (1 << 30) + 12345
    store, lock = _big_store(tmp_path / "outside", size)
    parts = export_bundle(store, plan_export(store, lock, None, None), tmp_path / "big.tar", split=300 << 20).paths
    shutil.rmtree(store.root)  # only the bundle and the import's own copy stay on disk
    assert sum(p.stat().st_size for p in parts) > size
    log = tmp_path / "import.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "import-bundle", *map(str, parts),
                                 "--store", str(tmp_path / "inside")], stdout=out, stderr=subprocess.STDOUT)
        peak_mib = _peak_rss_mib(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")[-2000:]
    assert peak_mib < 200, f"import peaked at {peak_mib:.0f} MiB RSS"
    inside = Store(tmp_path / "inside")
    record = inside.get_revision("acme/big", "b" * 40)
    assert record is not None and inside.blob_path("acme/big", record.files[0].etag).stat().st_size == size
    print(f"import of a {size / 2**30:.2f} GiB bundle: peak RSS {peak_mib:.0f} MiB")
