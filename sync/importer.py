"""``hubserve import``: a plain folder becomes a verified revision of the store."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sync.diskio import disk_errors
from sync.errors import StoreError, UnsafePathError
from sync.hashing import CHUNK, FileHasher, is_lfs_candidate
from sync.paths import check_repo_id, is_pickle, safe_relpath
from sync.store import FileEntry, RevisionRecord, Store, now_iso

SKIP_DIRS = {".git", ".cache", ".huggingface", "__pycache__"}


@dataclass(frozen=True)
class ImportResult:
    record: RevisionRecord
    skipped_pickle: tuple[str, ...]


def scan_folder(folder: Path) -> list[str]:
    """Repo-relative POSIX paths of the regular files under ``folder`` (symlinks must stay inside)."""
    root = folder.resolve()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink() and root not in full.resolve().parents:
                raise UnsafePathError(f"{full}: symlink points outside {folder}")
            paths.append(safe_relpath(rel))
    return sorted(paths)


def import_commit_id(entries: list[FileEntry]) -> str:
    """Deterministic 40-hex id for an imported file set: same bytes, same commit."""
    h = hashlib.sha1(b"hubserve-import-v1\n")
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path}\0{e.etag}\0{e.size}\n".encode())
    return h.hexdigest()


def _pipeline_tag(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    m = re.search(r"^pipeline_tag:\s*([\w-]+)\s*$", front, re.M)
    return m.group(1) if m else None


def _ingest(store: Store, repo_id: str, src: Path, rel: str) -> FileEntry:
    """Copy one file into a temp file while hashing it, then move it into blobs/."""
    size = src.stat().st_size
    lfs = is_lfs_candidate(rel, size)
    hasher = FileHasher(lfs, size)
    tmp = store.new_tmp_file("import")
    try:
        with disk_errors(tmp, tmp), src.open("rb") as fin, tmp.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                hasher.update(chunk)
                fout.write(chunk)
        if hasher.seen != size:
            raise StoreError(f"{src} changed while it was imported")
        digest = hasher.hexdigest()
        entry = FileEntry(rel, size, sha256=digest) if lfs else FileEntry(rel, size, git_sha1=digest)
        if store.has_blob(repo_id, entry):
            tmp.unlink()
        else:
            store.add_blob(repo_id, entry, tmp)
        return entry
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def import_folder(
    store: Store, folder: Path, repo_id: str, allow_pickle: bool = False, refs: tuple[str, ...] = ("main",)
) -> ImportResult:
    """Hash and copy every file of ``folder`` into the store and promote it as one revision."""
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise StoreError(f"{folder} is not a directory")
    paths = scan_folder(folder)
    skipped = tuple(p for p in paths if is_pickle(p) and not allow_pickle)
    paths = [p for p in paths if p not in skipped]
    if not paths:
        raise StoreError(f"{folder} has no files to import")
    with store.locked():
        entries = [_ingest(store, repo_id, folder / p, p) for p in paths]
        record = RevisionRecord(
            repo=repo_id,
            commit=import_commit_id(entries),
            files=tuple(entries),
            verified_at=now_iso(),
            source=f"import:{folder.resolve()}",
            pipeline_tag=_pipeline_tag(folder),
            refs=refs,
        )
        store.promote(record, refs=refs)
    return ImportResult(record, skipped)
