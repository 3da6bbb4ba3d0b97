"""Desired state (manifest + lock) against the store: what sync has to do. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from sync.errors import StoreError
from sync.lock import LockedModel
from sync.manifest import ModelSpec
from sync.paths import is_commit
from sync.store import FileEntry, check_file_tree


@dataclass(frozen=True)
class Pin:
    """Where a model's commit comes from this run."""

    commit: str | None  # None: must be resolved upstream
    source: str  # "manifest" | "lock" | "resolve"


def choose_pin(spec: ModelSpec, locked: LockedModel | None, update: bool) -> Pin:
    """A rolled-back pin holds until ``--update``; a 40-hex revision is used as is; a branch/tag uses the lock
    unless ``--update`` asks to re-resolve."""
    same = locked is not None and locked.repo == spec.repo and locked.revision == spec.revision
    if same and not update and locked is not None and locked.rolled_back_from:
        return Pin(locked.commit, "rollback")
    if is_commit(spec.revision):
        return Pin(spec.revision, "manifest")
    if same and not update and locked is not None:
        return Pin(locked.commit, "lock")
    return Pin(None, "resolve")


@dataclass(frozen=True)
class Selection:
    files: tuple[FileEntry, ...]
    skipped_pickle: tuple[str, ...]


def select_files(spec: ModelSpec, listing: list[FileEntry]) -> Selection:
    """Apply include/exclude and the pickle rule to an upstream listing (refused whole if it cannot be a tree)."""
    check_file_tree(listing, f"{spec.name} ({spec.repo})")
    wanted = [f for f in listing if spec.wants(f.path)]
    pickles = tuple(f.path for f in wanted if spec.refuses_pickle(f.path))
    files = tuple(f for f in wanted if f.path not in pickles)
    if not files:
        reason = f"; {len(pickles)} pickle file(s) refused (set allow_pickle = true)" if pickles else ""
        raise StoreError(f"{spec.name}: no files of {spec.repo} match include/exclude{reason}")
    return Selection(files, pickles)


def check_against_lock(spec: ModelSpec, locked: LockedModel | None, commit: str, files: tuple[FileEntry, ...]) -> None:
    """A commit's files never change: if the lock already recorded them, the upstream must agree."""
    if not locked or locked.commit != commit or not locked.files:
        return
    pinned = {f.path: f for f in locked.files}
    for f in files:
        old = pinned.get(f.path)
        if old is not None and (old.etag, old.size) != (f.etag, f.size):
            raise StoreError(
                f"{spec.name}: upstream serves {f.path} at {commit[:12]} as {f.algo} {f.etag} ({f.size} B) but "
                f"models.lock pinned {old.algo} {old.etag} ({old.size} B); refusing the changed content"
            )


def missing_blobs(files: tuple[FileEntry, ...], present: set[str]) -> list[FileEntry]:
    """Files whose blob is not in the store yet, one per distinct blob."""
    seen: set[str] = set()
    out = []
    for f in files:
        if f.etag not in present and f.etag not in seen:
            seen.add(f.etag)
            out.append(f)
    return out
