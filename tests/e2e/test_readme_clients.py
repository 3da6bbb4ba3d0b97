"""The README's client snippets (curl, openai, InferenceClient; blocks marked ``<!-- test: server -->``) run
as written against the real e2e server: only its URL and key are swapped in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import HubserveServer
from tests.fixtures.readme import Block, blocks

pytestmark = pytest.mark.e2e
README_URL = "http://127.0.0.1:8080"
SNIPPETS = [b for b in blocks() if b.mark == "server"]


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda b: f"README:{b.line}:{b.lang}")
def test_readme_client_snippet_runs(block: Block, hubserve_server: HubserveServer) -> None:
    code = block.code.replace(README_URL, hubserve_server.url)
    # The snippet's own `export HUBSERVE_API_KEY=...` stands for "your key": the test's key replaces it.
    code = "\n".join(ln for ln in code.splitlines() if not ln.startswith("export HUBSERVE_API_KEY="))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HUBSERVE_API_KEY": hubserve_server.api_key}
    command = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README line {block.line}: {done.stderr[-3000:]}"
    assert done.stdout.strip(), f"README line {block.line} printed nothing"
