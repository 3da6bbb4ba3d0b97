"""Cross-process exclusive locks for small files that several processes read, change and write back.

The lock is a sidecar file (``.<name>.lock`` beside the file) held with ``filelock`` (flock on POSIX), the
same mechanism as ``Store.locked``: the kernel drops it when its holder dies, even by kill -9, so a killed
writer never leaves the file locked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from sync.errors import HubserveError


class LockTimeout(HubserveError):
    """Another process held a file's lock for longer than we were willing to wait."""


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def exclusive(path: Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (which need not exist); LockTimeout after ``timeout`` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(path)
    try:
        with FileLock(str(lock), timeout=timeout):
            yield
    except Timeout:
        raise LockTimeout(f"{path}: another process holds {lock} (waited {timeout:g} s); retry") from None
