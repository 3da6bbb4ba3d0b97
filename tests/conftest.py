"""Fixtures shared by every tier: small real model repos, stores on tmp disk, a mirror on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sync.importer import import_folder
from sync.store import Store
from tests.fixtures.tiny import minilm_dir, tiny_llama_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_REPO = "hubserve-test/tiny-llama"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"

# Nothing in the suite may reach the public Hub.
os.environ.pop("HF_ENDPOINT", None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def no_state_in_the_working_directory() -> Iterator[None]:
    """An app built without a config keeps its state (state.db) beside ./keys.toml, i.e. in the directory pytest
    runs in: what a test leaves there is removed after it, so no run leaves files in the checkout."""
    before = Path("state.db").exists()
    yield
    if not before and Path("state.db").exists():
        for left in ("state.db", "state.db-wal", "state.db-shm"):
            Path(left).unlink(missing_ok=True)
        shutil.rmtree("state.db.files", ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return tiny_llama_dir()


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()


@dataclass
class Upstream:
    """A hubserve store served by a real mirror on loopback: the upstream that sync tests pull from."""

    store: Store
    url: str

    def publish(self, folder: Path, repo: str, refs: tuple[str, ...] = ("main",)) -> str:
        return import_folder(self.store, folder, repo, refs=refs).record.commit


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    from sync.mirror import make_mirror

    store = Store(tmp_path / "upstream-store")
    store.ensure()
    server = make_mirror(store, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Upstream(store, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hubserve(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``hubserve`` CLI in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO_ROOT,
        timeout=300,
    )
