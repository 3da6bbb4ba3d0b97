"""Durable, atomic writes, and a full disk turned into one clear error (never a raw ENOSPC traceback)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sync.errors import DiskFullError, disk_full


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a torn one; the file has
    ``mode`` from its first byte (the temp file is created 0600 and changed before anything is written).

    A full disk is a DiskFullError with the temp file removed and ``path`` as it was.
    """
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


@contextmanager
def disk_errors(where: Path, *cleanup: Path) -> Iterator[None]:
    """A full disk inside the block becomes a DiskFullError, after removing the ``cleanup`` files."""
    try:
        yield
    except OSError as e:
        full = disk_full(e, where)
        if full is None:
            raise
        for p in cleanup:
            p.unlink(missing_ok=True)
        raise full from e


def check_free_space(where: Path, need: int, what: str) -> None:
    """Refuse up front to write ``need`` bytes where the filesystem has less free."""
    free = shutil.disk_usage(where).free
    if need > free:
        raise DiskFullError(f"{what} needs {need} bytes but {where} has {free} free; free space and run again")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (best effort: some filesystems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
