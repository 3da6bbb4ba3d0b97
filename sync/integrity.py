"""Bit rot: re-hash verified revisions at a bounded read rate, and keep a durable "corrupt" marker.

A revision whose blobs no longer hash to what its record says gets a marker beside its record
(``.hubserve/corrupt/models--{org}--{name}/<commit>.json``, written atomically). The record stays, so gc,
status and rollback still see the revision, but ``is_corrupt`` is true: the server must not start an
engine on it, and it counts as usable again only once every file verified again and the marker was
removed (``repair`` re-fetches the bad files, ``check`` clears the marker after a clean re-hash).

Scans read without the store lock (a pass over a large store takes hours and must not hold up sync);
a problem is confirmed under the lock before it is marked, so a revision that gc removed, or a blob
that sync replaced, mid-scan is not reported.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sync.errors import HubserveError
from sync.hashing import CHUNK, FileHasher
from sync.store import FileEntry, RevisionRecord, Store, atomic_write, now_iso, repo_folder_name


class Stopped(Exception):
    """The scan was asked to stop (the daemon is shutting down)."""


@dataclass(frozen=True)
class Problem:
    """One file of a revision that did not verify."""

    path: str
    message: str
    blob_bad: bool  # the blob is missing, or its size or hash is wrong: it must be fetched again

    def line(self, record: RevisionRecord) -> str:
        return f"{record.repo}@{record.commit[:12]}: {self.path}: {self.message}"


@dataclass(frozen=True)
class CorruptMark:
    repo: str
    commit: str
    files: tuple[str, ...]
    problems: tuple[str, ...]
    marked_at: str


# ---- the marker -------------------------------------------------------------------------------
def _root(store: Store | Path) -> Path:
    return store.root if isinstance(store, Store) else Path(store).absolute()


def marker_path(store: Store | Path, repo: str, commit: str) -> Path:
    Store(_root(store)).record_path(repo, commit)  # validates repo id and commit
    return _root(store) / ".hubserve" / "corrupt" / repo_folder_name(repo) / f"{commit}.json"


def mark_corrupt(
    store: Store | Path, repo: str, commit: str, files: Sequence[str], problems: Sequence[str] = ()
) -> None:
    """Record durably that ``repo@commit`` failed verification (temp file, fsync, rename, directory fsync)."""
    data = {"repo": repo, "commit": commit, "files": sorted(files), "problems": list(problems), "marked_at": now_iso()}
    atomic_write(marker_path(store, repo, commit), (json.dumps(data, indent=1) + "\n").encode())


def is_corrupt(store: Store | Path, repo: str, commit: str) -> bool:
    """Whether ``repo@commit`` carries a corrupt marker: the server starts no engine on such a revision."""
    try:
        return marker_path(store, repo, commit).exists()
    except HubserveError:  # not a repo id or commit: nothing of ours
        return False


def clear_corrupt(store: Store | Path, repo: str, commit: str) -> bool:
    """Remove the marker (after every file verified again); True if there was one."""
    path = marker_path(store, repo, commit)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def corrupt_marks(store: Store | Path) -> list[CorruptMark]:
    """Every marker in the store; an unreadable one still counts (with no detail): fail closed."""
    base = _root(store) / ".hubserve" / "corrupt"
    marks = []
    for path in sorted(base.glob("models--*/*.json")):
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            marks.append(CorruptMark(d["repo"], d["commit"], tuple(d["files"]), tuple(d["problems"]), d["marked_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            repo = path.parent.name.removeprefix("models--").replace("--", "/", 1)
            marks.append(CorruptMark(repo, path.stem, (), ("marker unreadable",), ""))
    return marks


# ---- scanning ---------------------------------------------------------------------------------
class Throttle:
    """Paces reads to ``bytes_per_s`` (None: unthrottled); sleeps on ``stop`` so a stop is never delayed."""

    def __init__(
        self, bytes_per_s: float | None, stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.stop, self.clock = bytes_per_s, stop or threading.Event(), clock
        self._start: float | None = None
        self.consumed = 0

    def consume(self, n: int) -> None:
        if self.stop.is_set():
            raise Stopped("verification stopped")
        if self._start is None:
            self._start = self.clock()
        self.consumed += n
        if self.rate:
            ahead = self._start + self.consumed / self.rate - self.clock()
            if ahead > 0 and self.stop.wait(ahead):
                raise Stopped("verification stopped")


def _hash_blob(blob: Path, entry: FileEntry, throttle: Throttle | None) -> str:
    hasher = FileHasher(entry.lfs, entry.size)
    with blob.open("rb") as f:
        while chunk := f.read(CHUNK):
            if throttle is not None:
                throttle.consume(len(chunk))
            hasher.update(chunk)
    return hasher.hexdigest()


def scan(
    store: Store, record: RevisionRecord, throttle: Throttle | None = None, seen: dict[str, bool] | None = None,
    only: set[str] | None = None,
) -> list[Problem]:
    """Re-hash the files of ``record`` (or ``only`` those paths): the checks of ``Store.verify``, paced.

    ``seen`` caches blob verdicts by etag within one pass: revisions share blobs, each is read once.
    """
    problems = []
    snap = store.snapshot_dir(record.repo, record.commit)
    for entry in record.files:
        if only is not None and entry.path not in only:
            continue
        blob = store.blob_path(record.repo, entry.etag)
        link = snap / entry.path
        if not blob.is_file():
            problems.append(Problem(entry.path, "blob missing", True))
            continue
        size = blob.stat().st_size
        key = f"{record.repo}/{entry.etag}"
        if size != entry.size:
            problems.append(Problem(entry.path, f"size {size}, expected {entry.size}", True))
        elif seen is not None and key in seen:
            if not seen[key]:
                problems.append(Problem(entry.path, f"{entry.algo} does not match {entry.etag}", True))
        else:
            actual = _hash_blob(blob, entry, throttle)
            if seen is not None:
                seen[key] = actual == entry.etag
            if actual != entry.etag:
                problems.append(Problem(entry.path, f"expected {entry.algo} {entry.etag}, got {actual}", True))
        if not link.is_symlink() or link.resolve() != blob.resolve():
            problems.append(Problem(entry.path, "snapshot link broken", False))
    return problems


def check(store: Store, record: RevisionRecord, throttle: Throttle | None = None,
          seen: dict[str, bool] | None = None) -> list[Problem]:
    """Scan one revision and bring its marker in line: marked if problems are confirmed, cleared if clean.

    This is what ``hubserve verify`` and the daemon's schedule call. Problems are re-checked under the
    store lock (a concurrent gc or sync may have changed the revision mid-scan).
    """
    problems = scan(store, record, throttle, seen)
    if not problems:
        if is_corrupt(store, record.repo, record.commit):
            with store.locked():
                clear_corrupt(store, record.repo, record.commit)
        return []
    with store.locked():
        current = store.get_revision(record.repo, record.commit)
        if current is None:
            return []  # removed meanwhile (gc, prune): nothing left to mark
        problems = scan(store, current, only={p.path for p in problems})
        if problems:
            mark_corrupt(store, current.repo, current.commit, [p.path for p in problems],
                         [p.line(current) for p in problems])
    return problems


def repair(store: Store, record: RevisionRecord, problems: list[Problem],
           download: Callable[[FileEntry, Path], None]) -> list[Problem]:
    """Fetch the bad files of a marked revision again and clear its marker once all of it verifies.

    ``download(entry, part)`` fetches one file into ``part`` and checks its hash (the syncer's upstream);
    a good blob replaces the bad one atomically, so a reader sees the old or the new blob, never a torn
    one. Returns the problems left (empty: repaired). Upstream errors propagate; the marker stays.
    """
    with store.locked():
        current = store.get_revision(record.repo, record.commit)
        if current is None:
            return []
        # Still bad now? Revisions share blobs: another revision's repair may have fixed this one's already.
        bad = {p.path for p in scan(store, current, only={p.path for p in problems}) if p.blob_bad}
        done: set[str] = set()
        for entry in current.files:
            if entry.path in bad and entry.etag not in done:
                part = store.tmp_dir / f"{entry.etag}.part"
                part.unlink(missing_ok=True)  # never resume onto bytes of unknown origin
                download(entry, part)
                store.add_blob(current.repo, entry, part)
                done.add(entry.etag)
        store.promote(current)  # re-links broken snapshot links; the record is rewritten as it was
        left = scan(store, current)
        if left:
            mark_corrupt(store, current.repo, current.commit, [p.path for p in left], [p.line(current) for p in left])
        else:
            clear_corrupt(store, current.repo, current.commit)
    return left


def verify_and_mark(store: Store, record: RevisionRecord) -> list[str]:
    """``hubserve verify``'s per-revision step: ``Store.verify``'s problem lines, with the marker kept in line."""
    return [p.line(record) for p in check(store, record)]
