"""Tar streams for bundles: written entry by entry with tarfile's own header encoder, read with tarfile in
stream mode, so neither side ever seeks, holds a whole file in memory or needs a second copy on disk."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

from sync.bundle_parts import BundleError

BLOCK = tarfile.BLOCKSIZE
COPY_CHUNK = 4 << 20


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, mtime, 0o644, tarfile.REGTYPE
    return info


class TarWriter:
    """Append regular-file entries to a byte sink; ``close`` writes the end-of-archive blocks."""

    def __init__(self, sink: Sink, mtime: int) -> None:
        self.sink, self.mtime = sink, mtime
        self.offset = 0

    def _put(self, data: bytes | bytearray | memoryview) -> None:
        self.sink.write(data)
        self.offset += len(data)

    def _pad(self, size: int) -> None:
        if size % BLOCK:
            self._put(b"\0" * (BLOCK - size % BLOCK))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._put(_info(name, len(data), self.mtime).tobuf(tarfile.PAX_FORMAT))
        self._put(data)
        self._pad(len(data))

    def add_file(self, name: str, path: Path, size: int, on_chunk: Callable[[memoryview], None]) -> None:
        """Copy ``size`` bytes of ``path`` into the stream, showing each chunk to ``on_chunk`` (hashing)."""
        self._put(_info(name, size, self.mtime).tobuf(tarfile.PAX_FORMAT))
        buf = bytearray(min(COPY_CHUNK, max(size, 1)))
        view = memoryview(buf)
        left = size
        with path.open("rb", buffering=0) as f:
            while left:
                n = f.readinto(view[: min(left, len(buf))])
                if not n:
                    raise BundleError(f"{path} shrank while it was exported")
                on_chunk(view[:n])
                self._put(view[:n])
                left -= n
        self._pad(size)

    def close(self) -> None:
        self._put(b"\0" * (2 * BLOCK))
        self._pad(self.offset)


def refuse_unsafe(member: tarfile.TarInfo) -> None:
    """Links, devices and paths that would leave a directory are refused before anything else."""
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hard link"
        raise BundleError(f"bundle carries a {kind} entry {member.name!r} -> {member.linkname!r}; refusing it")
    name = member.name
    if name.startswith("/") or "\\" in name or ".." in name.split("/"):
        raise BundleError(f"bundle carries a path-traversal entry {name!r}; refusing it")
    if not member.isreg():
        raise BundleError(f"bundle carries a special entry {name!r} (type {member.type!r}); refusing it")


class TarReader:
    """Entries of a tar stream, one at a time, with every tarfile failure turned into one BundleError."""

    def __init__(self, stream: IO[bytes], where: Callable[[], str]) -> None:
        self.where = where
        try:
            self._tar = tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20)  # noqa: SIM115 (closed by close())
        except (tarfile.TarError, EOFError, OSError) as e:
            raise self.damaged(e) from None

    def damaged(self, e: BaseException) -> BundleError:
        return BundleError(f"bundle truncated or damaged in {self.where()}: {type(e).__name__}: {e}")

    def next(self) -> tarfile.TarInfo | None:
        try:
            member = self._tar.next()
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise self.damaged(e) from None
        if member is not None:
            refuse_unsafe(member)
        return member

    def chunks(self, member: tarfile.TarInfo) -> Iterator[bytes]:
        f = self._tar.extractfile(member)
        assert f is not None  # regular files only (refuse_unsafe)
        left = member.size
        try:
            while left:
                data = f.read(min(left, COPY_CHUNK))
                if not data:
                    raise EOFError("unexpected end of data")
                left -= len(data)
                yield data
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise self.damaged(e) from None

    def read_small(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise BundleError(f"bundle entry {member.name!r} is {member.size} bytes, more than {limit}; refusing it")
        return b"".join(self.chunks(member))

    def close(self) -> None:
        self._tar.close()

