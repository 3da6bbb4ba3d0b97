"""What the rollout tests share: a store synced from a real mirror holding three revisions of a tiny Llama,
a real ``hubserve serve`` over it, client traffic that never stops during a swap, and a commit poller.

Revisions: v1 (the tiny Llama), v2 (the same plus a file: a new commit vLLM loads as well), broken (a
config.json whose hidden size does not match the weights: verified like any other revision, but vLLM
cannot load it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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
import openai

from sync.importer import import_folder
from sync.mirror import make_mirror
from sync.store import Store
from tests.fixtures.tiny import tiny_llama_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO = "hubserve-test/tiny-llama"
NAME = "tiny"
API_KEY = "rollout-test-key-0123456789"
READY_TIMEOUT_S = float(os.environ.get("HUBSERVE_E2E_READY_TIMEOUT", "600"))


@dataclass
class Revisions:
    v1: str
    v2: str
    broken: str


@dataclass
class RolloutSite:
    """A seed mirror (the upstream), a models.toml pinned to one of its revisions, and the synced store."""

    root: Path
    upstream: str
    revisions: Revisions
    config: Path
    _mirror: object = None

    def pin(self, commit: str) -> None:
        """Edit models.toml the way an operator would: change the revision line of the model."""
        text = self.config.read_text(encoding="utf-8")
        self.config.write_text(re.sub(r'revision = "[0-9a-f]{40}"', f'revision = "{commit}"', text), encoding="utf-8")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_")}
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *args, "--config", str(self.config)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
        )

    def close(self) -> None:
        mirror = self._mirror
        if mirror is not None:
            mirror.shutdown()  # type: ignore[attr-defined]
            mirror.server_close()  # type: ignore[attr-defined]


def make_site(root: Path) -> RolloutSite:
    seed = Store(root / "seed")
    v1_dir = tiny_llama_dir()
    v2_dir = shutil.copytree(v1_dir, root / "v2")
    (v2_dir / "REVISION").write_text("2\n")
    broken_dir = shutil.copytree(v1_dir, root / "broken")
    cfg = json.loads((broken_dir / "config.json").read_text())
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    (broken_dir / "config.json").write_text(json.dumps(cfg))
    revisions = Revisions(
        v1=import_folder(seed, v1_dir, REPO).record.commit,
        v2=import_folder(seed, v2_dir, REPO, refs=()).record.commit,
        broken=import_folder(seed, broken_dir, REPO, refs=()).record.commit,
    )
    mirror = make_mirror(seed, "127.0.0.1", 0)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    upstream = f"http://127.0.0.1:{mirror.server_address[1]}"
    config = root / "models.toml"
    config.write_text(
        f"""[store]
path = "store"

[upstream]
endpoint = "{upstream}"

[[models]]
name = "{NAME}"
repo = "{REPO}"
revision = "{revisions.v1}"
task = "text-generation"
[models.engine]
max_model_len = 512
""",
        encoding="utf-8",
    )
    site = RolloutSite(root, upstream, revisions, config, mirror)
    synced = site.cli("sync")
    assert synced.returncode == 0, synced.stderr
    return site


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def log_tail(self, lines: int = 60) -> str:
        """The server's last log lines, without the access log (the traffic would drown the rest)."""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join([ln for ln in text if "uvicorn.access" not in ln][-lines:])
        return ""

    def served_commit(self) -> str:
        r = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=10)
        r.raise_for_status()
        return next(m["commit"] for m in r.json()["data"] if m["id"] == NAME)

    def health(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.url}/health", timeout=10).json())

    def wait_for(self, what: str, predicate: object, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hubserve serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError, StopIteration, KeyError):
                if predicate():  # type: ignore[operator]
                    return
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_tail()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(site: RolloutSite, **settings: str) -> Iterator[Server]:
    """``hubserve serve`` over the site, with HUBSERVE_* ``settings``; stopped (no survivors) at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_")}
    env |= {"HUBSERVE_API_KEYS": API_KEY, "HUBSERVE_RELOAD_POLL_S": "2", "HUBSERVE_ENGINE_START_ATTEMPTS": "1"}
    env |= {f"HUBSERVE_{k.upper()}": v for k, v in settings.items()}
    port = _free_port()
    log_path = site.root / f"serve-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--config", str(site.config), "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        server.wait_for("the server to be ready", lambda: httpx.get(f"{server.url}/ready").status_code == 200)
        yield server
    finally:
        stop_process(proc, grace_s=60)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def daemon(site: RolloutSite) -> Iterator[subprocess.Popen[bytes]]:
    """``hubserve daemon`` over the site: it syncs whatever models.toml pins, as soon as the file changes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_")}
    log_path = site.root / "daemon.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "daemon", "--config", str(site.config),
             "--interval", "300", "--listen", f"127.0.0.1:{_free_port()}"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        stop_process(proc, grace_s=30)


# ---- traffic -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    ok: bool
    detail: str
    started: float
    latency: float


@dataclass
class Traffic:
    """Clients calling the server in a loop until stopped: streaming and non-streaming OpenAI completions
    (stream checked for a finish_reason and ``[DONE]``), TGI ``/generate`` and ``/generate_stream`` (the last
    event must carry generated_text), OpenAI Responses and Anthropic Messages, streamed (the closing event
    must come) and not. Every answer is checked whole; anything else is a failure."""

    server: Server
    concurrency: int = 4
    # Between two requests of one client. On 2 CPU cores the old engine serving without pause starves the new
    # one's start (vLLM's CPU threads spin between steps): the tests pace their clients, the bench does not.
    pause_s: float = 1.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    KINDS = ("openai-stream", "openai", "tgi-stream", "tgi", "responses-stream", "messages", "responses",
             "messages-stream")

    def __enter__(self) -> Traffic:
        for i in range(self.concurrency):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def _worker(self, first: int) -> None:
        """Client ``first`` starts with KINDS[first] and goes round them all, one request after the other."""
        http = httpx.Client(base_url=self.server.url, headers=self.server.headers, timeout=300)
        client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        n = first
        while not self._stop.is_set():
            kind = self.KINDS[n % len(self.KINDS)]
            n += 1
            started = time.monotonic()
            try:
                ok, detail = getattr(self, "_" + kind.replace("-", "_"))(http, client)
            except Exception as e:  # every exception is a failed request
                ok, detail = False, f"{type(e).__name__}: {e}"
            self.outcomes.append(Outcome(kind, ok, detail, started, time.monotonic() - started))
            self._stop.wait(self.pause_s)

    @staticmethod
    def _openai(_http: httpx.Client, client: openai.OpenAI) -> tuple[bool, str]:
        out = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8)
        return bool(out.choices and out.choices[0].finish_reason), out.choices[0].finish_reason or "no finish"

    @staticmethod
    def _openai_stream(http: httpx.Client, _client: openai.OpenAI) -> tuple[bool, str]:
        body = {"model": NAME, "prompt": "The quick brown fox", "max_tokens": 8, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return False, f"HTTP {r.status_code}: {r.read()[:300]!r}"
            data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        finished = any('"finish_reason":"' in d.replace(" ", "") for d in data[:-1])
        return data[-1:] == ["[DONE]"] and finished, f"{len(data)} events, last {data[-1:]}"

    @staticmethod
    def _tgi(http: httpx.Client, _client: openai.OpenAI) -> tuple[bool, str]:
        r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 8}})
        return r.status_code == 200 and "generated_text" in r.json(), f"HTTP {r.status_code}: {r.text[:300]}"

    @staticmethod
    def _responses(_http: httpx.Client, client: openai.OpenAI) -> tuple[bool, str]:
        out = client.responses.create(model=NAME, input="Hello", max_output_tokens=8)
        return out.status in ("completed", "incomplete"), f"status {out.status}"

    @staticmethod
    def _responses_stream(http: httpx.Client, _client: openai.OpenAI) -> tuple[bool, str]:
        return Traffic._events(http, "/v1/responses", {"model": NAME, "input": "Hello", "max_output_tokens": 8,
                                                       "stream": True}, "response.completed")

    @staticmethod
    def _messages(http: httpx.Client, _client: openai.OpenAI) -> tuple[bool, str]:
        body = {"model": NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}
        r = http.post("/v1/messages", json=body)
        return r.status_code == 200 and r.json().get("type") == "message", f"HTTP {r.status_code}: {r.text[:300]}"

    @staticmethod
    def _messages_stream(http: httpx.Client, _client: openai.OpenAI) -> tuple[bool, str]:
        body = {"model": NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}], "stream": True}
        return Traffic._events(http, "/v1/messages", body, "message_stop")

    @staticmethod
    def _events(http: httpx.Client, path: str, body: dict[str, object], last: str) -> tuple[bool, str]:
        """A named-event stream (Responses, Messages) must end with its closing event and carry no error."""
        with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return False, f"HTTP {r.status_code}: {r.read()[:300]!r}"
            types = [json.loads(line[5:]).get("type") for line in r.iter_lines() if line.startswith("data:")]
        return types[-1:] == [last] and "error" not in types, f"{len(types)} events, last {types[-1:]}"

    @staticmethod
    def _tgi_stream(http: httpx.Client, _client: openai.OpenAI) -> tuple[bool, str]:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8}}
        with http.stream("POST", "/generate_stream", json=body) as r:
            if r.status_code != 200:
                return False, f"HTTP {r.status_code}: {r.read()[:300]!r}"
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        last = events[-1] if events else {}
        return isinstance(last.get("generated_text"), str) and "error" not in last, f"last event {last}"


@dataclass
class CommitPoller:
    """Polls /v1/models and records each commit the model reports, once per change."""

    server: Server
    seen: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> CommitPoller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                commit = self.server.served_commit()
                if not self.seen or self.seen[-1] != commit:
                    self.seen.append(commit)
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.2)


def failure_report(traffic: Traffic) -> str:
    lines = [f"{o.kind} at +{o.started:.1f}: {o.detail}" for o in traffic.failures[:20]]
    return f"{len(traffic.failures)} of {len(traffic.outcomes)} requests failed:\n" + "\n".join(lines)
