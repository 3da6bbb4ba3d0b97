"""Tar streams for bundles: written and read entry by entry with tarfile's own header encoder and parser, so
neither side ever seeks, holds a whole file in memory or needs a second copy on disk."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import zstandard

from sync.bundle_parts import BundleError

# What a damaged stream raises while it is read: a short or failing file, or a zstd frame that does not decode
# (zstandard's ZstdError is no ValueError).
STREAM_ERRORS = (OSError, ValueError, EOFError, zstandard.ZstdError)

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

    def add_file(self, name: str, path: Path, size: int, on_chunk: Callable[[memoryview], None] | None) -> None:
        """Copy ``size`` bytes of ``path`` into the stream, showing each chunk to ``on_chunk`` (hashing).

        Without ``on_chunk``, a sink that can copy in the kernel (an uncompressed PartWriter) gets the body
        with ``os.sendfile``: no byte passes through Python, as with ``tar``'s own read/write or better.
        """
        self._put(_info(name, size, self.mtime).tobuf(tarfile.PAX_FORMAT))
        copy_from = getattr(self.sink, "copy_from", None)
        if on_chunk is None and copy_from is not None:
            with path.open("rb", buffering=0) as f:
                copy_from(f.fileno(), 0, size)
            self.offset += size
            self._pad(size)
            return
        buf = bytearray(min(COPY_CHUNK, max(size, 1)))
        view = memoryview(buf)
        left = size
        with path.open("rb", buffering=0) as f:
            while left:
                n = f.readinto(view[: min(left, len(buf))])
                if not n:
                    raise BundleError(f"{path} shrank while it was exported")
                if on_chunk is not None:
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


class Readable(Protocol):
    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


class TarReader:
    """Entries of a tar stream, one at a time, never seeking and never holding more than one buffer.

    Headers are parsed by tarfile's own ``TarInfo.frombuf`` (checksums included) and pax ``path``/``size``
    records are honoured; bodies are read with ``readinto`` into one reused buffer (tarfile's stream mode
    copies every byte several times). Anything unexpected becomes one BundleError naming where it happened.
    """

    def __init__(self, stream: Readable, where: Callable[[], str]) -> None:
        self.stream, self.where = stream, where
        self._buf = bytearray(COPY_CHUNK)
        self._left = 0  # unread body + padding bytes of the current entry

    def damaged(self, why: str) -> BundleError:
        return BundleError(f"bundle truncated or damaged in {self.where()}: {why}")

    def _fill(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            try:
                n = self.stream.readinto(view[got:])
            except STREAM_ERRORS as e:
                raise self.damaged(f"{type(e).__name__}: {e}") from None
            if not n:
                break
            got += n
        return got

    def _exact(self, n: int) -> bytes:
        data = bytearray(n)
        if self._fill(memoryview(data)) != n:
            raise self.damaged("unexpected end of data")
        return bytes(data)

    def _skip(self) -> None:
        while self._left:
            n = self._fill(memoryview(self._buf)[: min(self._left, len(self._buf))])
            if not n:
                raise self.damaged("unexpected end of data")
            self._left -= n

    def next(self) -> tarfile.TarInfo | None:
        """The next entry (links, traversal and special entries refused), or None at the end of the archive."""
        self._skip()
        pax: dict[str, str] = {}
        while True:
            block = bytearray(BLOCK)
            got = self._fill(memoryview(block))
            if got == 0 or block == bytes(BLOCK):
                return None  # end of archive (a stream cut at an entry boundary shows as missing entries)
            if got != BLOCK:
                raise self.damaged("unexpected end of data in an entry header")
            try:
                info = tarfile.TarInfo.frombuf(bytes(block), "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise self.damaged(f"bad entry header ({e})") from None
            if info.type not in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                break
            if info.size > 1 << 16:
                raise self.damaged(f"pax header of {info.size} bytes")
            body = self._exact(info.size + (-info.size % BLOCK))[: info.size]
            if info.type == tarfile.XHDTYPE:
                pax = _pax_records(body, self.damaged)
        if "path" in pax:
            info.name = pax["path"]
        if "linkpath" in pax:
            info.linkname = pax["linkpath"]
        if "size" in pax:
            info.size = int(pax["size"]) if pax["size"].isdigit() else -1
        refuse_unsafe(info)
        if info.size < 0:
            raise self.damaged(f"entry {info.name!r} has an invalid size")
        self._left = info.size
        return info

    def chunks(self, member: tarfile.TarInfo) -> Iterator[memoryview]:
        """The current entry's body in order, each chunk valid until the next one is asked for."""
        view = memoryview(self._buf)
        left = member.size
        while left:
            n = self._fill(view[: min(left, len(view))])
            if not n:
                raise self.damaged("unexpected end of data")
            left -= n
            self._left -= n
            yield view[:n]
        self._left = -member.size % BLOCK  # the padding, skipped by next()

    def read_small(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise BundleError(f"bundle entry {member.name!r} is {member.size} bytes, more than {limit}; refusing it")
        return b"".join(bytes(c) for c in self.chunks(member))


def _pax_records(body: bytes, damaged: Callable[[str], BundleError]) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header (POSIX.1-2001)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        space = body.find(b" ", pos)
        try:
            length = int(body[pos:space])
            key, sep, value = body[space + 1 : pos + length - 1].partition(b"=")
        except ValueError:
            raise damaged("malformed pax header") from None
        if length <= 0 or not sep:
            raise damaged("malformed pax header")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out
