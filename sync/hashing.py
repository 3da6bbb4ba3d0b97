"""The two hashes the Hub uses: sha256 for LFS files and the git blob sha1 for the others."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20

# Files the Hub stores in LFS whatever their size; anything from 10 MiB up goes to LFS as well.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".onnx", ".h5", ".msgpack",
    ".model", ".npy", ".npz", ".tflite", ".ot", ".zip", ".tar", ".gz", ".parquet", ".arrow",
)
LFS_MIN_SIZE = 10 * 1024 * 1024


def is_lfs_candidate(path: str, size: int) -> bool:
    """Whether a locally imported file would be an LFS file on the Hub."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


class FileHasher:
    """Incremental hasher for one file: computes the hash the Hub would publish for it."""

    def __init__(self, lfs: bool, size: int) -> None:
        self.lfs = lfs
        if lfs:
            self._h = hashlib.sha256()
        else:
            self._h = hashlib.sha1()
            self._h.update(f"blob {size}\0".encode())
        self.seen = 0

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        self.seen += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    @property
    def algo(self) -> str:
        return "sha256" if self.lfs else "git-sha1"


def hash_file(path: Path, lfs: bool) -> str:
    """Hash a whole file on disk the way the Hub would (sha256 or git blob sha1)."""
    size = path.stat().st_size
    hasher = FileHasher(lfs, size)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()

