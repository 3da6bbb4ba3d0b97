"""The byte layer of a bundle: one file, or numbered parts for removable media.

A whole bundle is a plain tar (or tar.zst) stream, so ``tar tf`` can list it. A split bundle is the
same stream cut into parts ``FILE.000``, ``FILE.001``, ...; each part starts with a fixed-size header
naming the bundle, its index and the number of parts, so a missing, foreign, repeated or reordered
part is refused by name before any byte is trusted.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from sync.errors import HubserveError

PART_MAGIC = b"HUBSERVE-BUNDLE-PART/1\n"
PART_HEADER_SIZE = 512
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


class BundleError(HubserveError):
    """A bundle is malformed, incomplete, altered or untrusted; nothing in the store was changed."""


def parse_size(text: str) -> int:
    """``650M``, ``4G``, ``4GiB``, ``1000000`` -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise BundleError(f"--split {text!r}: expected a size such as 650M, 4G or 4GiB")
    n = int(float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " "))
    if n < 1 << 20:
        raise BundleError(f"--split {text!r}: parts must be at least 1 MiB")
    return n


def part_path(out: Path, index: int) -> Path:
    return out.with_name(f"{out.name}.{index:03d}")


def _header(bundle_id: str, index: int, count: int) -> bytes:
    body = json.dumps({"bundle": bundle_id, "index": index, "count": count}).encode()
    return (PART_MAGIC + body).ljust(PART_HEADER_SIZE - 1, b" ") + b"\n"


class PartWriter:
    """A write-only byte sink that is one file, or parts of at most ``split`` bytes of payload each.

    The part count is only known at the end, so every header is rewritten in place on close.
    """

    def __init__(self, out: Path, bundle_id: str, split: int | None = None) -> None:
        self.out, self.bundle_id, self.split = out, bundle_id, split
        self.paths: list[Path] = []
        self.written = 0
        self._f: BinaryIO | None = None
        self._left = 0
        if split is None:
            self._f = out.open("wb")
            self.paths.append(out)

    def _next_part(self) -> BinaryIO:
        if self._f is not None:
            self._f.close()
        path = part_path(self.out, len(self.paths))
        self.paths.append(path)
        self._f = path.open("wb")
        self._f.write(_header(self.bundle_id, len(self.paths) - 1, 0))
        self._left = self.split or 0
        return self._f

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if self.split is None:
            assert self._f is not None
            self._f.write(view)
        while self.split is not None and view:
            f = self._f if self._f is not None and self._left else self._next_part()
            n = min(self._left, len(view))
            f.write(view[:n])
            self._left -= n
            view = view[n:]
        self.written += len(data)
        return len(data)

    def copy_from(self, fd: int, offset: int, count: int) -> int:
        """Copy ``count`` bytes of file ``fd`` from ``offset`` in the kernel (``os.sendfile``), across parts."""
        done = 0
        while done < count:
            if self.split is not None and (self._f is None or not self._left):
                self._next_part()
            assert self._f is not None
            self._f.flush()
            want = count - done if self.split is None else min(count - done, self._left)
            n = os.sendfile(self._f.fileno(), fd, offset + done, want)
            if n == 0:
                raise BundleError(f"source file ended {count - done} bytes early while exporting")
            self._f.seek(0, os.SEEK_END)  # sendfile moved the fd's offset; parts are only ever appended to
            done += n
            if self.split is not None:
                self._left -= n
        self.written += count
        return count

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        """Finish the last part, fsync every part and write the final part count into each header."""
        if self.split is not None and not self.paths:
            self._next_part()  # an empty stream still has one part
        if self._f is not None:
            self._f.close()
            self._f = None
        for i, path in enumerate(self.paths):
            with path.open("r+b") as f:
                if self.split is not None:
                    f.write(_header(self.bundle_id, i, len(self.paths)))
                f.flush()
                os.fsync(f.fileno())

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        for path in self.paths:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class PartHeader:
    bundle: str
    index: int
    count: int


def _read_header(path: Path) -> PartHeader | None:
    with path.open("rb") as f:
        head = f.read(PART_HEADER_SIZE)
    if not head.startswith(PART_MAGIC):
        return None
    try:
        data = json.loads(head[len(PART_MAGIC):].strip())
        return PartHeader(str(data["bundle"]), int(data["index"]), int(data["count"]))
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{path}: damaged part header") from None


def check_parts(paths: list[Path]) -> bool:
    """Refuse a set of files that is not one whole bundle, or all parts of one bundle in order.

    Returns whether the files are parts (with headers) rather than one plain bundle file.
    """
    for p in paths:
        if not p.is_file():
            raise BundleError(f"{p}: no such file")
    found = [_read_header(p) for p in paths]
    if all(h is None for h in found):
        if len(paths) > 1:
            raise BundleError("several files given but none is a bundle part; pass one bundle file, or its parts")
        return False
    headers: list[PartHeader] = []
    for p, h in zip(paths, found, strict=True):
        if h is None:
            raise BundleError(f"{p}: not a part of a split bundle (no part header)")
        headers.append(h)
    if len({h.bundle for h in headers}) > 1:
        raise BundleError("the parts belong to different bundles; pass the parts of one bundle")
    count = headers[0].count
    indices = [h.index for h in headers]
    if count == 0:
        raise BundleError(f"{paths[0]}: the export that wrote this part did not finish")
    for p, idx in zip(paths, indices, strict=True):
        if indices.count(idx) > 1:
            raise BundleError(f"part {idx} given twice ({p})")
        if not 0 <= idx < count:
            raise BundleError(f"{p}: part {idx} of a {count}-part bundle is impossible; damaged header")
    missing = sorted(set(range(count)) - set(indices))
    if missing:
        raise BundleError(f"bundle has {count} parts; part(s) {', '.join(map(str, missing))} missing")
    if indices != list(range(count)):
        bad = next(i for i, idx in enumerate(indices) if idx != i)
        raise BundleError(
            f"parts out of order: part {indices[bad]} ({paths[bad]}) given in position {bad}; "
            "pass them as FILE.000 FILE.001 ..."
        )
    return True


class PartReader:
    """A read-only stream over a plain bundle file or its parts (headers skipped), in order."""

    def __init__(self, paths: list[Path]) -> None:
        self.split = check_parts(paths)
        self.paths = paths
        self.index = -1
        self._f: io.BufferedReader | None = None
        self._open_next()

    @property
    def current(self) -> Path:
        return self.paths[max(self.index, 0)]

    def _open_next(self) -> bool:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.index + 1 >= len(self.paths):
            return False
        self.index += 1
        self._f = self.paths[self.index].open("rb")
        if self.split:
            self._f.seek(PART_HEADER_SIZE)
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunks: list[bytes] = []
        want = n if n >= 0 else 1 << 62
        while want > 0 and self._f is not None:
            data = self._f.read(min(want, 1 << 22))
            if not data:
                if not self._open_next():
                    break
                continue
            chunks.append(data)
            want -= len(data)
        return b"".join(chunks)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Up to ``len(buffer)`` bytes from the current part (0 only at the end of the last part)."""
        while self._f is not None:
            n = self._f.readinto(buffer)
            if n:
                return n
            if not self._open_next():
                break
        return 0

    def peek_magic(self) -> bytes:
        """The first 4 payload bytes (to tell zstd from plain tar) without consuming them."""
        assert self._f is not None
        pos = self._f.tell()
        head = self._f.read(4)
        self._f.seek(pos)
        return head

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> PartReader:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
