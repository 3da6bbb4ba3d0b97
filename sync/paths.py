"""Validation of names and paths that come from config, an upstream, a bundle or a request.

Every name that reaches the store (repo ids, revisions and refs, file paths) passes through here first, so
the store never holds a name with a control character (below 0x20, or 0x7f): such a name could forge a
response header or a log line, or rewrite a terminal, wherever it is later printed. ``printable`` is the
other half, for text that was never checked (request lines, upstream messages): control characters escaped.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from sync.errors import ConfigError, UnsafePathError

# ``\Z``, never ``$``: a ``$`` also matches before a trailing newline, so "org/name\n" passed.
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}\Z")
HASH_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
REF_MAX = 255


def is_commit(rev: str) -> bool:
    return isinstance(rev, str) and COMMIT_RE.match(rev) is not None


def has_control(text: str) -> bool:
    return CONTROL_RE.search(text) is not None


def printable(text: object, limit: int = 1000) -> str:
    """``text`` safe for a log line, a terminal or a header: control characters escaped as ``\\xNN``,
    cut at ``limit`` characters."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "..."
    return CONTROL_RE.sub(lambda m: f"\\x{ord(m[0]):02x}", s)


def check_repo_id(repo_id: str) -> str:
    """An ``org/name`` repo id; also safe as a path component once mapped to ``models--org--name``."""
    if not isinstance(repo_id, str) or not REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ConfigError(f"invalid repo id {repo_id!r}: expected 'org/name' (letters, digits, '.', '_', '-')")
    return repo_id


def check_ref(ref: str) -> str:
    """A revision or ref name from the network or a bundle (``main``, ``v1.0``, ``refs/pr/1``, a commit)."""
    if not isinstance(ref, str) or not ref or len(ref) > REF_MAX or has_control(ref):
        raise UnsafePathError(f"invalid revision {ref!r}: empty, over {REF_MAX} characters or a control character")
    return safe_relpath(ref)


def safe_relpath(path: str) -> str:
    """Validate a repo-relative file path from the network; return it normalised (POSIX)."""
    if not isinstance(path, str) or not path or "\\" in path:
        raise UnsafePathError(f"unsafe file path {path!r}: empty or backslash")
    if has_control(path):
        raise UnsafePathError(f"unsafe file path {path!r}: control characters (below 0x20, or 0x7f) are not allowed")
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
