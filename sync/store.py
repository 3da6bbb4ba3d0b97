"""The on-disk store: a huggingface_hub cache plus hubserve's verified-revision records.

Layout (``root`` is ``$HUBSERVE_STORE``)::

    CACHEDIR.TAG
    models--{org}--{name}/blobs/<etag>                  content-addressed, shared by revisions
    models--{org}--{name}/snapshots/<commit>/<path>     relative symlinks into blobs/
    models--{org}--{name}/refs/<ref>                    commit, no newline
    .hubserve/revisions/models--{org}--{name}/<commit>.json   the verified record, written last
    .hubserve/tmp/                                      partial downloads (same filesystem)

A revision exists for readers (server, mirror) only once its record exists. Every write is atomic
(temp file, fsync, ``os.replace``) so a crash leaves the last good revision intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock

from sync.diskio import atomic_write, disk_errors, fsync_dir
from sync.errors import HubserveError, StoreError, UnsafePathError
from sync.hashing import hash_file
from sync.paths import check_ref, check_repo_id, is_commit, safe_relpath

__all__ = ["FileEntry", "RevisionRecord", "Store", "atomic_write"]  # atomic_write: for callers that import it here

RECORD_VERSION = 1
CACHEDIR_TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# This is a huggingface_hub cache, kept by hubserve.\n"


def repo_folder_name(repo_id: str) -> str:
    return "models--" + check_repo_id(repo_id).replace("/", "--")


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file the Hub keeps in git for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a revision, with the hash the Hub publishes for it."""

    path: str
    size: int
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # regular files (git blob sha1 of the content)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise StoreError(f"file path {self.path!r} is not a string")
        safe_relpath(self.path)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise StoreError(f"{self.path}: size {self.size!r} is not a non-negative integer")
        for digest, length in ((self.sha256, 64), (self.git_sha1, 40)):
            if digest is not None and not (isinstance(digest, str) and len(digest) == length and _is_hex(digest)):
                raise StoreError(f"{self.path}: {digest!r} is not a {length}-hex digest")
        if (self.sha256 is None) == (self.git_sha1 is None):
            raise StoreError(f"{self.path}: exactly one of sha256 (LFS) or git_sha1 must be set")

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        """The blob's name in the cache: sha256 for LFS files, git blob sha1 otherwise."""
        return self.sha256 or self.git_sha1 or ""

    @property
    def algo(self) -> str:
        return "sha256" if self.lfs else "git-sha1"

    @property
    def oid(self) -> str:
        """The git object id the Hub shows in trees (for LFS files: the pointer's blob sha1)."""
        if self.sha256 is not None:
            return git_blob_sha1(lfs_pointer(self.sha256, self.size))
        return self.git_sha1 or ""

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size)) if self.sha256 else 0

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def check_file_tree(files: tuple[FileEntry, ...] | list[FileEntry], where: str) -> None:
    """Refuse a file list that cannot be one directory tree: a path twice, or ``a`` beside ``a/b``.

    Checked on the whole list before any blob is fetched or staged, so such a revision fails up front.
    """
    seen: set[str] = set()
    for f in files:
        if f.path in seen:
            raise UnsafePathError(f"{where}: file {f.path!r} is listed twice")
        seen.add(f.path)
    for path in seen:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise UnsafePathError(f"{where}: {parent!r} is both a file and the directory of {path!r}")


@dataclass(frozen=True)
class RevisionRecord:
    """A verified revision: every listed file was hashed and matched before this was written."""

    repo: str
    commit: str
    files: tuple[FileEntry, ...]
    verified_at: str
    source: str = ""
    pipeline_tag: str | None = None
    refs: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_file_tree(self.files, f"{self.repo}@{str(self.commit)[:12]}")

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        for f in self.files:
            if f.path == path:
                return f
        return None

    def to_json(self) -> str:
        data = {
            "version": RECORD_VERSION,
            "repo": self.repo,
            "commit": self.commit,
            "verified_at": self.verified_at,
            "source": self.source,
            "pipeline_tag": self.pipeline_tag,
            "refs": list(self.refs),
            "files": [f.to_dict() for f in sorted(self.files, key=lambda f: f.path)],
        }
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RevisionRecord:
        data = json.loads(text)
        if not is_commit(str(data["commit"])):
            raise ValueError(f"commit {data['commit']!r} is not 40-hex")
        return cls(
            repo=check_repo_id(str(data["repo"])),  # a record may come from a bundle: its names are checked too
            commit=data["commit"],
            files=tuple(FileEntry(**f) for f in data["files"]),
            verified_at=data["verified_at"],
            source=data.get("source", ""),
            pipeline_tag=data.get("pipeline_tag"),
            refs=tuple(check_ref(str(r)) for r in data.get("refs", ())),
        )


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Store:
    """Read and write API over one store directory. Readers only ever see verified revisions."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    # ---- layout -------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_folder_name(repo_id)

    def blob_path(self, repo_id: str, etag: str) -> Path:
        if not all(c in "0123456789abcdef" for c in etag) or len(etag) not in (40, 64):
            raise UnsafePathError(f"invalid blob name {etag!r}")
        return self.repo_dir(repo_id) / "blobs" / etag

    def snapshot_dir(self, repo_id: str, commit: str) -> Path:
        if not is_commit(commit):
            raise StoreError(f"{commit!r} is not a 40-hex commit")
        return self.repo_dir(repo_id) / "snapshots" / commit

    def record_path(self, repo_id: str, commit: str) -> Path:
        if not is_commit(commit):
            raise StoreError(f"{commit!r} is not a 40-hex commit")
        return self.root / ".hubserve" / "revisions" / repo_folder_name(repo_id) / f"{commit}.json"

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".hubserve" / "tmp"

    def ensure(self) -> None:
        """Create the store skeleton (idempotent)."""
        with disk_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".locks").mkdir(exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            atomic_write(tag, CACHEDIR_TAG.encode())

    @contextmanager
    def locked(self, timeout: float = -1) -> Iterator[None]:
        """Exclusive writer lock over the whole store (one sync, import or gc at a time)."""
        self.ensure()
        with FileLock(str(self.root / ".locks" / "hubserve-store.lock"), timeout=timeout):
            yield

    # ---- reading ------------------------------------------------------------------------
    def get_revision(self, repo_id: str, commit: str) -> RevisionRecord | None:
        """The verified record of ``repo_id`` at ``commit``, or None if it is not (yet) verified."""
        try:
            path = self.record_path(repo_id, commit)
        except StoreError:
            return None
        try:
            return RevisionRecord.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def revisions(self, repo_id: str | None = None) -> list[RevisionRecord]:
        base = self.root / ".hubserve" / "revisions"
        folders = [base / repo_folder_name(repo_id)] if repo_id else sorted(base.glob("models--*"))
        out = []
        for folder in folders:
            for rec_path in sorted(folder.glob("*.json")):
                try:
                    out.append(RevisionRecord.from_json(rec_path.read_text(encoding="utf-8")))
                except (OSError, ValueError, KeyError, TypeError, HubserveError):
                    continue  # unreadable or refused (a name written before names were checked): not visible
        return out

    def repos(self) -> list[str]:
        return sorted({r.repo for r in self.revisions()})

    def read_ref(self, repo_id: str, ref: str) -> str | None:
        try:
            ref = safe_relpath(ref)
            commit = (self.repo_dir(repo_id) / "refs" / ref).read_text().strip()
        except (OSError, UnsafePathError):
            return None
        return commit if is_commit(commit) else None

    def resolve(self, repo_id: str, revision: str) -> RevisionRecord | None:
        """A verified revision by 40-hex commit, ref name (``main``, ``v1``, ``refs/pr/1``), or None."""
        if is_commit(revision):
            return self.get_revision(repo_id, revision)
        commit = self.read_ref(repo_id, revision)
        return self.get_revision(repo_id, commit) if commit else None

    def file_path(self, record: RevisionRecord, path: str) -> Path:
        """Path of a verified file's blob; never outside the repo's blobs/."""
        entry = record.file(path)
        if entry is None:
            raise StoreError(f"{record.repo}@{record.commit[:12]}: no file {path!r}")
        return self.blob_path(record.repo, entry.etag)

    def has_blob(self, repo_id: str, entry: FileEntry) -> bool:
        try:
            return self.blob_path(repo_id, entry.etag).stat().st_size == entry.size
        except OSError:
            return False

    # ---- writing ------------------------------------------------------------------------
    def new_tmp_file(self, label: str) -> Path:
        with disk_errors(self.tmp_dir):
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{label}.", suffix=".part")
        os.close(fd)
        return Path(name)

    def add_blob(self, repo_id: str, entry: FileEntry, verified_tmp: Path) -> Path:
        """Move a verified temp file into blobs/ under its content name (atomic, fsynced)."""
        dest = self.blob_path(repo_id, entry.etag)
        with disk_errors(dest, verified_tmp):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with verified_tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.chmod(verified_tmp, 0o644)
            os.replace(verified_tmp, dest)
        fsync_dir(dest.parent)
        return dest

    def promote(self, record: RevisionRecord, refs: tuple[str, ...] = ()) -> None:
        """Make a revision visible: link its snapshot, then write its record last, then move refs.

        Every blob must already be in place with the expected size (blobs are hashed as they land).
        """
        for entry in record.files:
            if not self.has_blob(record.repo, entry):
                raise StoreError(f"{record.repo}: blob for {entry.path} missing or wrong size; not promoted")
        snap = self.snapshot_dir(record.repo, record.commit)
        wanted = {f.path for f in record.files}
        with disk_errors(snap):
            for entry in record.files:
                self._link(snap, entry)
            atomic_write(self.record_path(record.repo, record.commit), record.to_json().encode())
            self._prune_snapshot(snap, wanted)  # after the record: readers of the old record never miss a file
            for ref in refs:
                self.write_ref(record.repo, ref, record.commit)

    def write_ref(self, repo_id: str, ref: str, commit: str) -> None:
        ref = safe_relpath(ref)
        atomic_write(self.repo_dir(repo_id) / "refs" / ref, commit.encode())

    def _link(self, snap: Path, entry: FileEntry) -> None:
        link = snap / entry.path
        link.parent.mkdir(parents=True, exist_ok=True)
        blobs = self.repo_dir_of_snapshot(snap) / "blobs" / entry.etag
        target = os.path.relpath(blobs, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            return
        tmp = link.parent / f".{link.name}.{os.getpid()}.tmplink"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)

    @staticmethod
    def repo_dir_of_snapshot(snap: Path) -> Path:
        return snap.parent.parent

    @staticmethod
    def _prune_snapshot(snap: Path, wanted: set[str]) -> None:
        for p in sorted(snap.rglob("*"), reverse=True):
            rel = p.relative_to(snap).as_posix()
            if p.is_symlink() or p.is_file():
                if rel not in wanted:
                    p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()

    # ---- checking and cleaning ----------------------------------------------------------
    def verify(self, record: RevisionRecord) -> list[str]:
        """Re-hash every file of a verified revision; return one line per problem."""
        problems = []
        snap = self.snapshot_dir(record.repo, record.commit)
        for entry in record.files:
            blob = self.blob_path(record.repo, entry.etag)
            if not blob.is_file():
                problems.append(f"{record.repo}@{record.commit[:12]}: {entry.path}: blob missing")
                continue
            link = snap / entry.path
            if not link.is_symlink() or link.resolve() != blob.resolve():
                problems.append(f"{record.repo}@{record.commit[:12]}: {entry.path}: snapshot link broken")
            if blob.stat().st_size != entry.size:
                problems.append(
                    f"{record.repo}@{record.commit[:12]}: {entry.path}: size {blob.stat().st_size}, "
                    f"expected {entry.size}"
                )
                continue
            actual = hash_file(blob, entry.lfs)
            if actual != entry.etag:
                problems.append(
                    f"{record.repo}@{record.commit[:12]}: {entry.path}: expected {entry.algo} {entry.etag}, "
                    f"got {actual}"
                )
        return problems

    def gc_plan(self, keep: set[tuple[str, str]]) -> list[Path]:
        """Paths that no kept (repo, commit) needs: records, snapshots, blobs, stale temp files."""
        doomed: list[Path] = []
        kept_commits: dict[str, set[str]] = {}  # by repo folder name
        kept_blobs: dict[str, set[str]] = {}
        for repo, commit in keep:
            kept_commits.setdefault(repo_folder_name(repo), set()).add(commit)
        for rec in self.revisions():
            if (rec.repo, rec.commit) in keep:
                kept_blobs.setdefault(repo_folder_name(rec.repo), set()).update(f.etag for f in rec.files)
        for repo_dir in sorted(self.root.glob("models--*")):
            commits = kept_commits.get(repo_dir.name, set())
            blobs_keep = kept_blobs.get(repo_dir.name, set())
            doomed += [s for s in sorted((repo_dir / "snapshots").glob("*")) if s.name not in commits]
            doomed += [b for b in sorted((repo_dir / "blobs").glob("*")) if b.name not in blobs_keep]
            refs_dir = repo_dir / "refs"
            doomed += [
                r for r in sorted(refs_dir.rglob("*")) if r.is_file() and r.read_text().strip() not in commits
            ]
            rec_dir = self.root / ".hubserve" / "revisions" / repo_dir.name
            doomed += [r for r in sorted(rec_dir.glob("*.json")) if r.stem not in commits]
        doomed += sorted(self.tmp_dir.glob("*")) if self.tmp_dir.is_dir() else []
        return doomed

    @staticmethod
    def remove(paths: list[Path]) -> int:
        """Delete paths (records first so a revision never looks verified with missing files)."""
        freed = 0
        ordered = sorted(paths, key=lambda p: (0 if p.suffix == ".json" else 1, str(p)))
        for p in ordered:
            try:
                if p.is_dir() and not p.is_symlink():
                    freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
                    shutil.rmtree(p)
                else:
                    freed += p.lstat().st_size if not p.is_symlink() else 0
                    p.unlink()
            except FileNotFoundError:
                continue
        return freed
