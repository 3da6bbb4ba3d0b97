"""Air-gap bundles: ``hubserve export`` and ``hubserve import-bundle``.

A bundle is a tar stream (optionally zstd, optionally split into parts, see bundle_parts) whose first
entry is a JSON manifest: the revisions it carries with every file's path, size and hash, the
models.lock entries, and the blobs that follow, in order, as ``blobs/models--org--name/<etag>``. An
optional second entry holds an ed25519 signature over the manifest bytes. Since the manifest is read
(and its signature checked) before any blob, each blob is hashed while it streams into a staging
directory on the store's filesystem; only when every entry has been checked are the blobs moved into
place and the revisions promoted by the store's own code, the same path sync takes. A refused bundle
leaves the store exactly as it was.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync.bundle_parts import ZSTD_MAGIC, BundleError, PartReader, PartWriter
from sync.bundle_rules import Ruled, apply_rules, check_downgrade, merge_models
from sync.bundle_sign import check_signature, sign
from sync.bundle_tar import Readable, TarReader, TarWriter
from sync.diskio import check_free_space, disk_errors
from sync.errors import HubserveError
from sync.hashing import FileHasher
from sync.lock import Lock, LockedModel, read_lock, write_lock
from sync.paths import check_repo_id, is_commit
from sync.store import FileEntry, RevisionRecord, Store, now_iso, repo_folder_name

if TYPE_CHECKING:
    from sync.manifest import Manifest

FORMAT = "hubserve-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "hubserve-bundle.json"
SIGNATURE_NAME = "hubserve-bundle.sig"
# The manifest is read whole (it is what the signature covers) before anything is checked: ~200 bytes a file,
# so 16 MiB is some 80,000 files; and zstd may not ask for more than a 128 MiB window (zstd's own default cap).
MANIFEST_MAX = 16 << 20
SIGNATURE_MAX = 64 << 10
ZSTD_WINDOW_MAX = 1 << 27
Progress = Callable[[int], None]


def _no_progress(n: int) -> None:
    return None


def blob_name(repo: str, etag: str) -> str:
    return f"blobs/{repo_folder_name(repo)}/{etag}"


def hubserve_version() -> str:
    try:
        return importlib.metadata.version("hubserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- the manifest ---------------------------------------------------------------------------------
def lock_entry(m: LockedModel) -> dict[str, Any]:
    """A models.lock entry as the bundle carries it: the pin, and the commits pinned before it on the sending
    side (so the receiving side can tell an older bundle replayed from a newer one)."""
    return {
        "name": m.name, "repo": m.repo, "revision": m.revision, "commit": m.commit, "selection": m.selection,
        "history": list(m.history),
        **({"base": m.base} if m.base else {}),  # a LoRA adapter: the model it adapts
        "files": [f.to_dict() for f in sorted(m.files, key=lambda f: f.path)],
    }


def locked_model(d: dict[str, Any]) -> LockedModel:
    history = tuple(str(c) for c in d.get("history", []))
    for commit in history:
        if not is_commit(commit):
            raise ValueError(f"model {d.get('name')!r}: history commit {commit!r} is not 40-hex")
    return LockedModel(
        name=str(d["name"]), repo=str(d["repo"]), revision=str(d["revision"]), commit=str(d["commit"]),
        files=tuple(FileEntry(**f) for f in d.get("files", [])), selection=str(d.get("selection", "")),
        history=history, base=str(d["base"]) if isinstance(d.get("base"), str) else None,
    )


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle says it carries; parsed and checked before any blob is read."""

    bundle_id: str
    created_at: str
    hubserve_version: str
    models: tuple[LockedModel, ...]
    revisions: tuple[RevisionRecord, ...]
    blobs: tuple[tuple[str, FileEntry], ...]  # (repo, entry naming the blob), in stream order
    since: tuple[tuple[str, str], ...] = ()  # (repo, commit) the receiving side already had

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT, "version": FORMAT_VERSION, "bundle_id": self.bundle_id,
            "created_at": self.created_at, "hubserve_version": self.hubserve_version,
            "since": [{"repo": r, "commit": c} for r, c in self.since],
            "models": [lock_entry(m) for m in self.models],
            "revisions": [json.loads(r.to_json()) for r in self.revisions],
            "blobs": [{"repo": r, "etag": e.etag, "size": e.size} for r, e in self.blobs],
        }
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleManifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError("not a hubserve bundle manifest")
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {doc.get('version')!r}; this hubserve reads {FORMAT_VERSION}")
            revisions = tuple(RevisionRecord.from_json(json.dumps(r)) for r in doc["revisions"])
            by_blob = {(r.repo, f.etag): f for r in revisions for f in r.files}
            blobs = []
            for b in doc["blobs"]:
                entry = by_blob.get((b["repo"], b["etag"]))
                if entry is None or entry.size != b["size"]:
                    raise ValueError(f"blob {b['etag']} of {b['repo']} is not a file of any revision in it")
                blobs.append((str(b["repo"]), entry))
            models = tuple(locked_model(m) for m in doc["models"])
            for repo, commit in [(r.repo, r.commit) for r in revisions] + [(m.repo, m.commit) for m in models]:
                check_repo_id(repo)
                if not is_commit(commit):
                    raise ValueError(f"{repo}: commit {commit!r} is not 40-hex")
            return cls(
                bundle_id=str(doc["bundle_id"]), created_at=str(doc["created_at"]),
                hubserve_version=str(doc.get("hubserve_version", "")),
                models=models, revisions=revisions, blobs=tuple(blobs),
                since=tuple((str(s["repo"]), str(s["commit"])) for s in doc.get("since", [])),
            )
        except RecursionError:
            raise BundleError("bundle manifest is invalid: nested too deeply") from None
        except (ValueError, KeyError, TypeError, AttributeError, HubserveError) as e:
            raise BundleError(f"bundle manifest is invalid: {e}") from None


# ---- export ---------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    paths: list[Path]
    manifest: BundleManifest
    bytes_written: int = 0


def plan_export(store: Store, lock: Lock, names: Iterable[str] | None, since: Lock | None) -> BundleManifest:
    """Which revisions and blobs to carry: the pinned ones named (default all), minus what ``since`` has."""
    wanted = list(names) if names else sorted(lock.models)
    models = []
    for name in wanted:
        m = lock.get(name)
        if m is None:
            known = ", ".join(sorted(lock.models)) or "none"
            raise BundleError(f"model {name!r} is not in models.lock (known: {known}); run `hubserve sync` first")
        models.append(m)
    have = {(m.repo, m.commit) for m in since.models.values()} if since else set()
    have_blobs = {(m.repo, f.etag) for m in since.models.values() for f in m.files} if since else set()
    revisions: dict[tuple[str, str], RevisionRecord] = {}
    for m in models:
        record = store.get_revision(m.repo, m.commit)
        if record is None:
            raise BundleError(f"{m.name}: {m.repo}@{m.commit[:12]} is not verified in {store.root}; "
                              "run `hubserve sync` first")
        if (m.repo, m.commit) not in have:
            revisions[(m.repo, m.commit)] = record
    blobs: dict[tuple[str, str], tuple[str, FileEntry]] = {}
    for (repo, _), record in sorted(revisions.items()):
        for f in sorted(record.files, key=lambda f: f.path):
            if (repo, f.etag) not in have_blobs:
                blobs.setdefault((repo, f.etag), (repo, f))
    return BundleManifest(
        bundle_id=uuid.uuid4().hex, created_at=now_iso(), hubserve_version=hubserve_version(),
        models=tuple(models), revisions=tuple(revisions.values()), blobs=tuple(blobs.values()),
        since=tuple(sorted(have)),
    )


def export_bundle(
    store: Store, manifest: BundleManifest, out: Path, *, split: int | None = None, zstd: bool = False,
    key: Ed25519PrivateKey | None = None, verify: bool = False, progress: Progress = _no_progress,
) -> ExportResult:
    """Stream the manifest's blobs from the store into ``out`` (or its parts); constant memory.

    The blobs were hashed when they were promoted and import hashes every byte again, so by default they
    are copied in the kernel; ``verify`` re-hashes each as it is read, so a blob that rotted on disk is
    refused here rather than on the other side of the gap.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = PartWriter(out, manifest.bundle_id, split)
    try:
        sink: Any = writer
        compressor = None
        if zstd:
            import zstandard

            zc = zstandard.ZstdCompressor(level=3, threads=-1)
            compressor = zc.stream_writer(cast(IO[bytes], writer), closefd=False)
            sink = compressor
        tar = TarWriter(sink, int(time.time()))
        body = manifest.to_bytes()
        tar.add_bytes(MANIFEST_NAME, body)
        if key is not None:
            tar.add_bytes(SIGNATURE_NAME, sign(body, key))
        for repo, entry in manifest.blobs:
            _export_blob(store, tar, repo, entry, verify, progress)
        tar.close()
        if compressor is not None:
            compressor.flush(zstandard.FLUSH_FRAME)
            compressor.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return ExportResult(writer.paths, manifest, writer.written)


def _export_blob(store: Store, tar: TarWriter, repo: str, entry: FileEntry, verify: bool, progress: Progress) -> None:
    path = store.blob_path(repo, entry.etag)
    if not store.has_blob(repo, entry):
        raise BundleError(f"{repo}: blob of {entry.path} is missing or has the wrong size; run `hubserve verify`")
    if not verify:
        tar.add_file(blob_name(repo, entry.etag), path, entry.size, None)
        progress(entry.size)
        return
    hasher = FileHasher(entry.lfs, entry.size)

    def seen(chunk: memoryview) -> None:
        hasher.update(chunk)
        progress(len(chunk))

    tar.add_file(blob_name(repo, entry.etag), path, entry.size, seen)
    if hasher.hexdigest() != entry.etag:
        raise BundleError(f"{repo}: {entry.path}: blob in the store does not match its {entry.algo} "
                          f"{entry.etag}; run `hubserve verify`; no bundle written")


# ---- import ---------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    manifest: BundleManifest
    signer: str | None
    signer_trusted: bool = False  # the signer is one of the trusted keys
    promoted: list[RevisionRecord] = field(default_factory=list)
    already: list[RevisionRecord] = field(default_factory=list)
    skipped: tuple[str, ...] = ()  # files the receiving rules kept out
    blobs_added: int = 0
    bytes_read: int = 0


@dataclass(frozen=True)
class ImportOptions:
    """What the receiving side lets in beyond its rules (each an explicit CLI flag)."""

    allow_downgrade: bool = False  # move a pin back to a commit it was pinned to before
    allow_unsigned: bool = False  # with trusted keys: accept an unsigned bundle or one by another key
    allow_pickle: bool = False  # pickle files of models the receiving models.toml does not name


def open_stream(reader: PartReader) -> Readable:
    """The tar stream inside the parts: decompressed when it starts with zstd's magic number."""
    if reader.peek_magic() == ZSTD_MAGIC:
        import zstandard

        zd = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW_MAX)
        return cast(Readable, zd.stream_reader(cast(IO[bytes], reader), read_size=1 << 20, read_across_frames=True))
    return reader


def import_bundle(
    store: Store, paths: list[Path], trusted: list[Ed25519PublicKey] | None = None,
    lock_path: Path | None = None, progress: Callable[[BundleManifest], Progress] | None = None,
    receiving: Manifest | None = None, options: ImportOptions = ImportOptions(),
) -> ImportResult:
    """Verify a bundle while streaming it, then promote its revisions and merge its models.lock entries.

    ``receiving`` (the receiving models.toml) supplies the file rules every imported file must pass, and
    the models.lock at ``lock_path`` is read under the store lock to refuse moving a pin back. ``progress``,
    once the manifest is read and its signature checked, gets the manifest and returns the callback that
    is told of every chunk verified.
    """
    store.ensure()
    with store.locked(), PartReader(paths) as reader:
        staging = store.tmp_dir / f"bundle-{uuid.uuid4().hex}"
        with disk_errors(staging):
            staging.mkdir(parents=True)
        try:
            tar = TarReader(open_stream(reader), lambda: str(reader.current))
            manifest, signer, member = _read_head(tar, trusted or [], options.allow_unsigned)
            ruled = apply_rules(manifest.revisions, manifest.models, receiving, options.allow_pickle)
            lock = read_lock(lock_path) if lock_path is not None else None
            if lock is not None and not options.allow_downgrade:
                check_downgrade(lock, ruled.models)
            needed = ruled.needed()
            check_free_space(staging, sum(e.size for r, e in manifest.blobs if (r, e.etag) in needed),
                             f"importing {paths[0].name}")
            advance = progress(manifest) if progress else _no_progress
            staged = _stage_blobs(store, tar, member, manifest, staging, advance, needed)
            _check_base(store, ruled, staged)
            result = ImportResult(manifest, signer, signer is not None and bool(trusted) and _signed_by(
                signer, trusted or []), skipped=ruled.skipped, bytes_read=sum(e.size for _, e in manifest.blobs))
            _commit(store, manifest, ruled, staged, result)
            if lock is not None and lock_path is not None:
                merge_models(lock, ruled.models)
                write_lock(lock_path, lock)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _signed_by(signer: str, trusted: list[Ed25519PublicKey]) -> bool:
    from sync.bundle_sign import fingerprint

    return signer in {fingerprint(k) for k in trusted}


def _read_head(
    tar: TarReader, trusted: list[Ed25519PublicKey], allow_unsigned: bool,
) -> tuple[BundleManifest, str | None, tarfile.TarInfo | None]:
    """The manifest and its signature, checked; and the entry after them (the first blob)."""
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME:
        raise BundleError(f"not a hubserve bundle: first entry is {first.name if first else 'missing'!r}, "
                          f"expected {MANIFEST_NAME}")
    body = tar.read_small(first, MANIFEST_MAX)
    tar_next = tar.next()
    signature = None
    if tar_next is not None and tar_next.name == SIGNATURE_NAME:
        signature = tar.read_small(tar_next, SIGNATURE_MAX)
        tar_next = tar.next()
    signer = check_signature(body, signature, trusted, allow_untrusted=allow_unsigned)
    return BundleManifest.from_bytes(body), signer, tar_next


def _stage_blobs(
    store: Store, tar: TarReader, member: tarfile.TarInfo | None, manifest: BundleManifest, staging: Path,
    progress: Progress, needed: set[tuple[str, str]],
) -> dict[tuple[str, str], Path]:
    """Stream every blob, hashing it, into ``staging`` (those ``needed``; the others are only checked);
    refuse anything out of place. Nothing beyond an entry's declared size is ever read or written."""
    staged: dict[tuple[str, str], Path] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="bundle-hash") as hash_pool:
        for repo, entry in manifest.blobs:
            name = blob_name(repo, entry.etag)
            if member is None:
                raise BundleError(f"bundle ends before {name} ({repo}: {entry.path}): truncated, or a part is missing")
            if member.name != name:
                raise BundleError(f"unexpected entry {member.name!r} where {name} was due: altered or reordered")
            if member.size != entry.size:
                raise BundleError(
                    f"{name} ({repo}: {entry.path}) is {member.size} bytes, the manifest says {entry.size}")
            dest = staging / f"{len(staged):06d}.blob"
            keep = (repo, entry.etag) in needed
            hasher = FileHasher(entry.lfs, entry.size)
            with disk_errors(dest, dest), (dest.open("wb") if keep else contextlib.nullcontext()) as f:
                for chunk in tar.chunks(member):
                    # hashlib and write() both release the GIL: hash on the side while the chunk is written,
                    # and wait for both before the reader reuses the buffer.
                    hashed = hash_pool.submit(hasher.update, chunk)
                    if f is not None:
                        f.write(chunk)
                    hashed.result()
                    progress(len(chunk))
            if hasher.hexdigest() != entry.etag:
                raise BundleError(f"{repo}: {entry.path} failed verification: expected {entry.algo} {entry.etag}, "
                                  f"got {hasher.hexdigest()}; the bundle was altered or damaged")
            if keep:
                staged[(repo, entry.etag)] = dest
            member = tar.next()
    if member is not None:
        raise BundleError(f"bundle carries an entry the manifest does not list: {member.name!r}")
    return staged


def _check_base(store: Store, ruled: Ruled, staged: dict[tuple[str, str], Path]) -> None:
    """An incremental bundle needs the blobs and revisions the earlier one brought."""
    for record in ruled.revisions:
        for f in record.files:
            if (record.repo, f.etag) not in staged and not store.has_blob(record.repo, f):
                raise BundleError(
                    f"{record.repo}: {f.path} is not in this bundle nor in the store: the bundle is incremental; "
                    "import the earlier bundle(s) first"
                )
    carried = {(r.repo, r.commit) for r in ruled.revisions}
    for m in ruled.models:
        if (m.repo, m.commit) not in carried and store.get_revision(m.repo, m.commit) is None:
            raise BundleError(f"{m.name}: {m.repo}@{m.commit[:12]} is neither in this bundle nor verified in the "
                              "store; import the earlier bundle(s) first")


def _commit(
    store: Store, manifest: BundleManifest, ruled: Ruled, staged: dict[tuple[str, str], Path], result: ImportResult,
) -> None:
    entries = {(repo, e.etag): e for repo, e in manifest.blobs}
    for key, tmp in staged.items():
        repo, entry = key[0], entries[key]
        if store.has_blob(repo, entry):
            tmp.unlink()
        else:
            store.add_blob(repo, entry, tmp)
            result.blobs_added += 1
    for record in ruled.revisions:
        if store.get_revision(record.repo, record.commit) is not None:
            result.already.append(record)
            for ref in record.refs:
                store.write_ref(record.repo, ref, record.commit)
            continue
        source = f"bundle:{manifest.bundle_id}" + (f" (from {record.source})" if record.source else "")
        fresh = RevisionRecord(record.repo, record.commit, record.files, now_iso(), source, record.pipeline_tag,
                               record.refs)
        store.promote(fresh, refs=record.refs)
        result.promoted.append(fresh)


def load_since(path: Path) -> Lock:
    if not path.is_file():
        raise BundleError(f"--since {path}: no such lock file (copy models.lock from the receiving side)")
    return read_lock(path)
