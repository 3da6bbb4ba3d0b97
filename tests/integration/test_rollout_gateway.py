"""Rollouts through the real gateway over real engine processes, driven the way an operator drives them: an edit
of models.toml and a sync (what ``hubserve sync`` runs), or ``hubserve rollback``, against a real mirror; the
gateway follows models.toml and models.lock (file events, and a 0.2 s poll) and its rollout state machine swaps,
holds, refuses and removes.

The engines are the synthetic engine as a supervised child process (tests/fixtures/sse_engine.py): it takes 1 s to
start (a load the gateway must wait for) and, for the revision a test calls broken, exits at start with an error, as
vLLM does on weights that do not fit their config. Clients keep calling through every change, over the OpenAI,
Responses and Messages routes, streamed and not; no request may fail, and the commit that /v1/models reports must
change exactly once per swap. The blue/green swap with real vLLM engines is tests/e2e/test_rollout.py's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from server.app import create_app
from server.desired import desired_models
from server.engines.base import ModelInfo
from server.registry import Registry
from server.settings import Settings
from sync.lock import read_lock
from sync.manifest import load_config
from sync.syncer import Syncer
from tests.conftest import TINY_REPO, Upstream, copy_folder, hubserve
from tests.fixtures.gateway_app import served
from tests.fixtures.sse_engine import SyntheticProcessEngine

pytestmark = pytest.mark.integration

KEY = "rollout-gateway-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"
GIB = 1024**3
START_S = 0.5  # every engine takes at least this long to start listening
BROKEN = "size mismatch for model.embed_tokens.weight: copying a param with shape [512, 128]"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("HUBSERVE_")]:
        monkeypatch.delenv(name)


@dataclass
class Site:
    """A mirror with three revisions of the tiny Llama (v1 on main), a models.toml pinned to v1, the synced store."""

    config: Path
    v1: str
    v2: str
    broken: str

    def pin(self, commit: str) -> None:
        """Edit models.toml the way an operator would: change the revision line of the model."""
        text = self.config.read_text(encoding="utf-8")
        self.config.write_text(re.sub(r'revision = "[0-9a-f]{40}"', f'revision = "{commit}"', text, count=1),
                               encoding="utf-8")

    def locked(self, name: str = NAME) -> str:
        return read_lock(self.config.with_suffix(".lock")).models[name].commit

    def sync(self) -> None:
        """What `hubserve sync` does (in process: the CLI's imports would take longer than the rollout)."""
        report = Syncer(load_config(self.config)).run()
        assert report.ok, report

    def cli(self, *args: str) -> str:
        done = hubserve(*args, "--config", str(self.config))
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


@pytest.fixture
def site(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> Site:
    revisions = []
    for name in ("v1", "v2", "broken"):
        folder = copy_folder(tiny_llama, tmp_path / name)
        (folder / "REVISION").write_text(f"{name}\n")
        revisions.append(upstream.publish(folder, TINY_REPO, refs=("main",) if name == "v1" else ()))
    config = tmp_path / "models.toml"
    config.write_text(f'[store]\npath = "store"\n\n[upstream]\nendpoint = "{upstream.url}"\n\n'
                      f'[[models]]\nname = "{NAME}"\nrepo = "{TINY_REPO}"\nrevision = "{revisions[0]}"\n'
                      'task = "text-generation"\n', encoding="utf-8")
    site = Site(config, *revisions)
    site.sync()
    return site


@dataclass
class Gateway:
    url: str
    registry: Registry

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", headers=AUTH, timeout=10)
        r.raise_for_status()
        return r.json()

    def commits(self) -> dict[str, str]:
        return {m["id"]: m["commit"] for m in self.get("/v1/models")["data"]}

    def health(self, name: str = NAME) -> dict[str, Any]:
        return dict(self.get("/health")["models"][name])

    def complete(self, model: str = NAME, **extra: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": model, "prompt": "x", "max_tokens": 4, **extra})


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError):
            if predicate():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def gateway(site: Site, engine_gib: float = 0.001, fail: tuple[str, ...] = (), **settings: object) -> Iterator[Gateway]:
    """The real app, built as ``hubserve serve`` builds it from the site's manifest, lock and store, on a loopback
    port; its engines are synthetic processes of ``engine_gib`` each, those of the commits in ``fail`` broken."""
    s = Settings.model_validate({"api_keys": KEY, "config": site.config, "reload_poll_s": 0.2,
                                 "engine_start_attempts": 1, "engine_stop_timeout_s": 5, **settings})

    def factory(info: ModelInfo, s: Settings) -> SyntheticProcessEngine:
        return SyntheticProcessEngine(info, s, int(engine_gib * GIB), start_delay_s=START_S,
                                      fail_at_start=BROKEN if info.commit in fail else None)

    registry = Registry.from_desired(desired_models(load_config(s.config, s.store)), s, factory)
    with served(create_app(s, registry)) as url:
        gw = Gateway(url, registry)
        wait_for("the gateway to be ready", lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200)
        yield gw


# ---- clients that never stop -------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    ok: bool
    detail: str
    latency: float


@dataclass
class Traffic:
    """Clients calling one model in a loop until stopped, each answer checked whole: completions (each in flight
    0.2 s in the engine, so a swap finds requests to drain), OpenAI, Responses and Messages streams (which must end
    with their closing event). Beside them a poller records each commit /v1/models reports, once per change."""

    gw: Gateway
    model: str = NAME
    concurrency: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    KINDS = ("completion", "chat-stream", "responses-stream", "messages-stream")
    STREAMS = {"chat-stream": ("/v1/chat/completions", "[DONE]"), "responses-stream": ("/v1/responses",
               "response.completed"), "messages-stream": ("/v1/messages", "message_stop")}

    def __enter__(self) -> Traffic:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(self.concurrency)]
        self._threads.append(threading.Thread(target=self._poll, daemon=True))
        for t in self._threads:
            t.start()
        time.sleep(0.5)  # steady state first
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # requests that started on the old engine finish; new ones run on the new
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def report(self) -> str:
        lines = [f"{o.kind}: {o.detail}" for o in self.failures[:10]]
        return f"{len(self.failures)} of {len(self.outcomes)} requests failed:\n" + "\n".join(lines)

    def _client(self, first: int) -> None:
        http = httpx.Client(base_url=self.gw.url, headers=AUTH, timeout=60)
        n = first
        while not self._stop.is_set():
            kind = self.KINDS[n % len(self.KINDS)]
            n += 1
            started = time.monotonic()
            try:
                ok, detail = self._call(http, kind)
            except Exception as e:  # every exception is a failed request
                ok, detail = False, f"{type(e).__name__}: {e}"
            self.outcomes.append(Outcome(kind, ok, detail, time.monotonic() - started))
            self._stop.wait(0.05)

    def _call(self, http: httpx.Client, kind: str) -> tuple[bool, str]:
        if kind == "completion":
            r = http.post("/v1/completions", json={"model": self.model, "prompt": "x", "max_tokens": 4, "delay": 0.2})
            return r.status_code == 200 and r.json() == {"ok": True}, f"HTTP {r.status_code}: {r.text[:200]}"
        path, last = self.STREAMS[kind]
        body: dict[str, object] = {"model": self.model, "stream": True}
        if path == "/v1/responses":
            body |= {"input": "x", "max_output_tokens": 4}
        else:
            body |= {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        with http.stream("POST", path, json=body) as r:
            text = r.read().decode()
        events = [line for line in text.splitlines() if line.startswith("data:")]
        ok = r.status_code == 200 and len(events) == 5 and last in events[-1] and "error" not in text
        return ok, f"HTTP {r.status_code}, {len(events)} events: {text[-200:]}"

    def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(httpx.HTTPError, KeyError):
                commit = self.gw.commits()[self.model]
                if not self.commits or self.commits[-1] != commit:
                    self.commits.append(commit)
            time.sleep(0.05)


# ---- the tests -----------------------------------------------------------------------------------------------
def test_in_place_swap_holds_requests_and_fails_none_then_rollback_swaps_back(site: Site) -> None:
    """A budget that holds one engine (auto → in-place): requests wait in the gateway while the old engine drains
    and the new one starts; then ``hubserve rollback`` pins v1 again and the server swaps back the same way."""
    with gateway(site, engine_gib=2, memory_budget_gib=3, rollout="auto") as gw:
        assert gw.commits() == {NAME: site.v1}
        old_pid = gw.health()["pid"]
        with Traffic(gw) as traffic:
            site.pin(site.v2)
            site.sync()  # the store gets v2, then the lock moves: the gateway swaps
            wait_for("v2 to serve", lambda: gw.commits()[NAME] == site.v2)
        assert not traffic.failures, traffic.report()
        assert len(traffic.outcomes) >= 10, len(traffic.outcomes)
        assert traffic.commits == [site.v1, site.v2], traffic.commits
        rollout = gw.health()["rollout"]
        assert rollout["mode"] == "in-place" and rollout["state"] == "swapped", rollout
        assert rollout["from"] == site.v1 and rollout["commit"] == site.v2
        held = [o for o in traffic.outcomes if o.latency > START_S * 0.8]  # waited for the new engine's start
        assert held, "no request was held during the swap: the in-place path was not exercised"
        assert not psutil.pid_exists(old_pid) and gw.health()["pid"] != old_pid

        with Traffic(gw) as traffic:
            out = site.cli("rollback", NAME)
            assert f"{site.v2[:12]} -> {site.v1[:12]}" in out
            wait_for("v1 to serve again", lambda: gw.commits()[NAME] == site.v1)
        assert not traffic.failures, traffic.report()
        assert traffic.commits == [site.v2, site.v1], traffic.commits
        assert gw.health()["rollout"]["mode"] == "in-place"
        locked = read_lock(site.config.with_suffix(".lock")).models[NAME]
        assert locked.commit == site.v1 and locked.rolled_back_from == site.v2
        site.sync()  # models.toml still names v2: the rollback holds, nothing swaps
        assert site.locked() == site.v1
        time.sleep(0.5)  # a reload or two
        assert gw.commits() == {NAME: site.v1}


@pytest.mark.parametrize("rollout", ["blue-green", "in-place"])
def test_a_revision_that_cannot_start_leaves_the_old_one_serving(site: Site, rollout: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hubserve")
    with gateway(site, fail=(site.broken,), rollout=rollout) as gw:
        with Traffic(gw, concurrency=2) as traffic:
            site.pin(site.broken)
            site.sync()  # verified like any other revision; its engine cannot start
            wait_for("the broken revision to fail", lambda: gw.health()["rollout"]["state"] == "failed")
        assert not traffic.failures, traffic.report()
        assert traffic.commits == [site.v1]
        rollout_state = gw.health()["rollout"]
        assert rollout_state["commit"] == site.broken and rollout_state["from"] == site.v1
        error = str(rollout_state["error"])
        assert "'tiny'" in error and "exited with code 1" in error and "size mismatch" in error, error
        assert httpx.get(f"{gw.url}/ready", timeout=10).status_code == 200
        assert f"revision {site.broken[:12]} failed to start" in caplog.text
        time.sleep(0.5)  # reloads meanwhile do not retry the same broken revision
        assert caplog.text.count(f"revision {site.broken[:12]} failed to start") == 1
        assert gw.complete().status_code == 200


def test_model_added_then_removed_without_restart(site: Site) -> None:
    base = site.config.read_text(encoding="utf-8")
    with gateway(site, rollout="blue-green") as gw:
        tiny_pid = gw.health()["pid"]
        site.config.write_text(base + f'\n[[models]]\nname = "tiny-two"\nrepo = "{TINY_REPO}"\n'
                               f'revision = "{site.v2}"\ntask = "text-generation"\n', encoding="utf-8")
        wait_for("tiny-two to wait for its sync", lambda: gw.complete("tiny-two").status_code == 503)
        waiting = gw.complete("tiny-two")  # in models.toml, not pinned yet: named, and why it cannot serve
        assert "hubserve sync" in waiting.json()["error"]["message"], waiting.text
        with Traffic(gw, concurrency=2) as traffic:
            site.sync()  # the gateway loads tiny-two beside tiny
            wait_for("tiny-two to serve", lambda: gw.complete("tiny-two").status_code == 200)
        assert not traffic.failures, traffic.report()
        assert gw.commits() == {NAME: site.v1, "tiny-two": site.v2}
        assert gw.health("tiny-two")["rollout"]["state"] == "added"
        two_pid = gw.health("tiny-two")["pid"]

        with Traffic(gw, model="tiny-two", concurrency=1) as leaving:
            site.config.write_text(base, encoding="utf-8")  # removed: it drains, then stops
            wait_for("tiny-two to be unloaded", lambda: "tiny-two" not in gw.get("/health")["models"])
        finished = [o for o in leaving.outcomes if o.ok]
        refused = [o for o in leaving.failures
                   if o.detail.startswith("HTTP 404") and "`tiny-two` does not exist" in o.detail]
        assert finished and len(refused) == len(leaving.failures), leaving.report()  # answered, or 404 once gone
        r = gw.complete("tiny-two")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        wait_for("tiny-two's process to be gone", lambda: not psutil.pid_exists(two_pid))
        assert gw.health()["pid"] == tiny_pid  # tiny served on without a restart
        assert gw.commits() == {NAME: site.v1}


def test_a_models_toml_rewritten_in_place_never_stops_a_model(site: Site) -> None:
    """An editor or script that truncates models.toml and then writes it: while it is empty (0 bytes) or just
    written (a prefix that parses with fewer models), reloads (every 0.2 s here) keep the last good configuration,
    so tiny serves on in the same process."""
    base = site.config.read_text(encoding="utf-8")
    prefix = base[:base.index("[[models]]")]  # valid TOML, and no models
    with gateway(site, rollout="blue-green") as gw:
        pid = gw.health()["pid"]
        with site.config.open("w", encoding="utf-8") as f:  # truncated: 0 bytes for several reloads
            time.sleep(1.0)
            f.write(prefix)
            f.flush()
            time.sleep(0.1)  # a half-written file, for a moment
            f.write(base[len(prefix):])
        time.sleep(1.0)
        assert gw.health()["pid"] == pid and gw.complete().status_code == 200
        assert gw.registry.served[NAME].engine.restarts == 0 and gw.commits() == {NAME: site.v1}


def test_engine_crash_is_503_then_supervision_restarts_it(site: Site) -> None:
    """SIGKILL an engine: its model answers 503 engine_unavailable with Retry-After (never a hang or a 500) while
    another model keeps answering and /ready says 503; the supervisor restarts it and it serves again."""
    other = f'\n[[models]]\nname = "other"\nrepo = "{TINY_REPO}"\nrevision = "{site.v2}"\ntask = "text-generation"\n'
    site.config.write_text(site.config.read_text(encoding="utf-8") + other, encoding="utf-8")
    site.sync()
    with gateway(site) as gw:
        before = gw.health()
        os.kill(before["pid"], 9)
        r = gw.complete()
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "engine_unavailable"
        assert gw.complete("other").status_code == 200
        assert httpx.get(f"{gw.url}/ready", timeout=10).status_code == 503
        assert gw.health()["state"] in ("restarting", "starting")
        wait_for("tiny to come back", lambda: gw.health()["state"] == "ready" and gw.health()["pid"] != before["pid"])
        assert gw.health()["restarts"] == before["restarts"] + 1
        assert gw.complete().status_code == 200
        assert httpx.get(f"{gw.url}/ready", timeout=10).status_code == 200
