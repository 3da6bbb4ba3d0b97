"""Air-gap tiers: store A -> `hubserve mirror` -> `hubserve sync` into store B -> `hubserve mirror` -> stock client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from sync.importer import import_folder
from sync.store import Store
from tests.conftest import MINILM_REPO, TINY_REPO, hubserve

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mirror_process(store: Path, token: str | None = None) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "HUBSERVE_MIRROR_TOKEN": token or ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "mirror", "--store", str(store), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/api/agent-harnesses", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        if token:
            assert token not in err  # request logs never carry the token


def test_second_store_syncs_from_first_mirror_and_serves_stock_clients(
    tmp_path: Path, tiny_llama: Path, minilm: Path
) -> None:
    a = Store(tmp_path / "a")
    tiny_commit = import_folder(a, tiny_llama, TINY_REPO).record.commit
    import_folder(a, minilm, MINILM_REPO)

    with mirror_process(a.root, token="tier-secret") as url_a:
        cfg = tmp_path / "b" / "models.toml"
        cfg.parent.mkdir()
        cfg.write_text(
            f'[store]\npath = "store"\n[upstream]\nendpoint = "{url_a}"\ntoken_env = "TIER_TOKEN"\n'
            f'[[models]]\nname = "tiny"\nrepo = "{TINY_REPO}"\nrevision = "main"\n'
            f'[[models]]\nname = "minilm"\nrepo = "{MINILM_REPO}"\nrevision = "main"\ntask = "feature-extraction"\n'
        )
        denied = hubserve("sync", "--config", str(cfg))
        assert denied.returncode == 1 and "TIER_TOKEN" in denied.stderr
        res = hubserve("sync", "--config", str(cfg), env={"TIER_TOKEN": "tier-secret"})
        assert res.returncode == 0, res.stderr
        assert "tier-secret" not in res.stdout + res.stderr

    b = Store(tmp_path / "b" / "store")
    rec_b = b.get_revision(TINY_REPO, tiny_commit)
    assert rec_b is not None and b.verify(rec_b) == []

    with mirror_process(b.root) as url_b:
        cache = tmp_path / "client-cache"
        script = (
            "from huggingface_hub import snapshot_download\n"
            f"print(snapshot_download({MINILM_REPO!r}, cache_dir={str(cache)!r}))\n"
        )
        env = {**os.environ, "HF_ENDPOINT": url_b, "HF_HUB_DISABLE_TELEMETRY": "1"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        snap = Path(out.stdout.strip().splitlines()[-1])
    for f in (minilm / "model.safetensors", minilm / "1_Pooling" / "config.json", minilm / "vocab.txt"):
        rel = f.relative_to(minilm)
        assert (snap / rel).read_bytes() == f.read_bytes()
