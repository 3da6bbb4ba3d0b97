"""Validation of names and paths that come from config, an upstream or a bundle."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from sync.errors import ConfigError, UnsafePathError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
HASH_RE = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def is_commit(rev: str) -> bool:
    return bool(COMMIT_RE.match(rev))


def check_repo_id(repo_id: str) -> str:
    """An ``org/name`` repo id; also safe as a path component once mapped to ``models--org--name``."""
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ConfigError(f"invalid repo id {repo_id!r}: expected 'org/name' (letters, digits, '.', '_', '-')")
    return repo_id


def safe_relpath(path: str) -> str:
    """Validate a repo-relative file path from the network; return it normalised (POSIX)."""
    if not path or "\\" in path or "\x00" in path:
        raise UnsafePathError(f"unsafe file path {path!r}: empty, backslash or NUL")
    p = PurePosixPath(path)
    if p.is_absolute() or path.startswith("/"):
        raise UnsafePathError(f"unsafe file path {path!r}: absolute paths are not allowed")
    if any(part in ("..", ".", "") for part in path.split("/")):
        raise UnsafePathError(f"unsafe file path {path!r}: '..', '.' or empty segments are not allowed")
    if re.match(r"^[A-Za-z]:", path):
        raise UnsafePathError(f"unsafe file path {path!r}: drive letters are not allowed")
    return str(p)


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)
