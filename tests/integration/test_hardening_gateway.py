"""Issue 16, the gateway side: the keys file under concurrent and killed `hubserve keys` processes, what the
gateway exposes without a key, what a restricted key learns of other models, tokens-per-minute under
concurrency, heavy tokenization off the event loop, deeply nested JSON bodies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from server.engines.base import ModelInfo
from server.engines.process import ProcessEngine
from server.ops.keys import new_key, read_keys, write_keys
from server.settings import Settings
from tests.fixtures.gateway_app import FLAT_KEY, EngineScript, Keys, asgi_client, build_app, served

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def hubserve_popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args], cwd=REPO_ROOT, env=ENV, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_concurrent_keys_commands_lose_no_change(tmp_path: Path) -> None:
    """12 revocations and 2 additions as 14 concurrent real processes: every one that said so took effect."""
    keys_file = tmp_path / "keys.toml"
    write_keys(keys_file, {r.id: r for r in (new_key(f"old-{n}")[1] for n in range(12))})
    procs = [hubserve_popen("keys", "revoke", f"old-{n}", "--keys-file", str(keys_file)) for n in range(12)]
    procs += [hubserve_popen("keys", "add", f"new-{n}", "--keys-file", str(keys_file)) for n in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
    names = sorted(r.name for r in read_keys(keys_file).values())
    assert names == sorted(f"new-{n}" for n in range(2))
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("keys.toml", ".keys.toml.lock")]


WRITER = """
import sys
from pathlib import Path
from server.ops.keys import new_key, update_keys
path, prefix = Path(sys.argv[1]), sys.argv[2]
n = 0
while True:
    def add(records, n=n):
        _, record = new_key(f"{prefix}-{n}")
        records[record.id] = record
        return records
    update_keys(path, add)
    print(n, flush=True)
    n += 1
"""


def test_kill_9_while_writing_keys_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    """A writer adding keys in a loop is killed at 20 points: the file always parses, holds every key whose write
    returned and at most the one in progress, and the next writer (a real CLI) goes on from there."""
    keys_file = tmp_path / "keys.toml"
    acknowledged: set[str] = set()
    for round_ in range(20):
        prefix = f"r{round_}"
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(keys_file), prefix], cwd=REPO_ROOT, env=ENV, text=True,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # running: it wrote once
        time.sleep((round_ % 10) * 0.002)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        done = [0, *(int(x) for x in out.split())]
        acknowledged |= {f"{prefix}-{n}" for n in range(max(done) + 1)}
        names = {e["name"] for e in tomllib.loads(keys_file.read_text())["keys"]}  # parses: never torn
        assert acknowledged <= names, sorted(acknowledged - names)
        assert names - acknowledged <= {f"{prefix}-{max(done) + 1}"}
        acknowledged = names
    added = subprocess.run(
        [sys.executable, "-m", "server.cli", "keys", "add", "after", "--keys-file", str(keys_file)],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert added.returncode == 0, added.stderr
    assert {r.name for r in read_keys(keys_file).values()} == acknowledged | {"after"}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("keys.toml", ".keys.toml.lock")]
    assert not leftovers, leftovers


ENV_CHILD = """
import json, os, socketserver, sys
from http.server import BaseHTTPRequestHandler
json.dump(dict(os.environ), open(sys.argv[2], "w"))
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def address_string(self):
        return "uds"
    def log_message(self, *a):
        pass
socketserver.UnixStreamServer(sys.argv[1], H).serve_forever()
"""


class EnvDumpEngine(ProcessEngine):
    """The real engine supervision (spawn, environment, health) around a child that writes down what it got."""

    def __init__(self, info: ModelInfo, settings: Settings, report: Path) -> None:
        super().__init__(info, settings)
        self.report = report

    def command(self) -> list[str]:
        return [sys.executable, "-c", ENV_CHILD, str(self.socket_path), str(self.report)]


async def test_a_real_engine_process_sees_only_the_allow_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"HF_TOKEN": "hf_x", "HUGGING_FACE_HUB_TOKEN": "hf_y", "CORP_HUB_CRED": "custom",
                        "VLLM_API_KEY": "v", "OMP_NUM_THREADS": "3", "MY_LIB_MODE": "fast"}.items():
        monkeypatch.setenv(name, value)
    snapshot = tmp_path / "store" / "models--o--n" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    info = ModelInfo("m", "o/n", "c" * 40, "text-generation", str(snapshot))
    settings = Settings(engine_env=frozenset({"MY_LIB_*"}), engine_start_timeout_s=30, engine_start_attempts=1)
    engine = EnvDumpEngine(info, settings, tmp_path / "env.json")
    await engine.start()
    try:
        seen = json.loads((tmp_path / "env.json").read_text())
    finally:
        await engine.stop()
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CORP_HUB_CRED", "VLLM_API_KEY"} & set(seen)
    assert not [k for k in seen if k.startswith("HUBSERVE_")]
    assert seen["OMP_NUM_THREADS"] == "3" and seen["MY_LIB_MODE"] == "fast" and seen["HF_HUB_OFFLINE"] == "1"
    assert set(seen) <= set(os.environ) | {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                                           "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTHONUNBUFFERED", "LC_CTYPE"}


DEEP = b"[" * 50_000 + b"]" * 50_000
NESTED_BODIES = {  # one route of each family, the nesting where its parser meets it
    "/v1/completions": b'{"model": "gen", "prompt": ' + DEEP + b"}",
    "/v1/chat/completions": b'{"model": "gen", "messages": ' + DEEP + b"}",
    "/v1/messages": b'{"model": "gen", "max_tokens": 2, "messages": ' + DEEP + b"}",
    "/v1/responses": DEEP,
    "/v1/tokenize": b'{"model": "gen", "prompt": ' + DEEP + b"}",
    "/generate": b'{"inputs": "hi", "parameters": {"stop": ' + DEEP + b"}}",
    "/tokenize": DEEP,
    "/": DEEP,
    "/models/org/emb": b'{"inputs": ' + DEEP + b"}",
    "/models/org/gen": DEEP,
}


async def test_deeply_nested_json_is_a_4xx_in_each_family_shape(tmp_path: Path, keys: Keys,
                                                               script: EngineScript) -> None:
    app, _ = build_app(tmp_path, script)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 must show as one, not raise
    async with httpx.AsyncClient(transport=transport, base_url="http://hubserve") as client:
        wrong = []
        for path, body in NESTED_BODIES.items():
            r = await client.post(path, content=body, headers={**bearer(keys.all), "content-type": "application/json"})
            family_shape = _error_shape(path, r)
            if not (400 <= r.status_code < 500 and family_shape and "nested" in r.text):
                wrong.append(f"{path}: {r.status_code} {r.text[:160]}")
    assert not wrong, "\n".join(wrong)
    assert not script.seen  # nothing reached an engine


def _error_shape(path: str, r: httpx.Response) -> bool:
    body = r.json()
    if path.startswith("/v1/messages"):
        return body.get("type") == "error" and isinstance(body.get("error"), dict)
    if path.startswith("/v1/"):
        return isinstance(body.get("error"), dict) and "message" in body["error"]
    if path.startswith("/models/"):
        return isinstance(body.get("error"), str)  # Hub (or, for a text-generation model, TGI)
    return "error_type" in body  # TGI: /generate, /tokenize, /


ADMIN = "admin-token-0123456789"
DOCS = ("/openapi.json", "/docs", "/redoc")


async def test_metrics_and_docs_are_closed_by_default_when_keys_exist(tmp_path: Path, keys: Keys,
                                                                      script: EngineScript) -> None:
    app, _ = build_app(tmp_path, script, admin_token=ADMIN)
    async with asgi_client(app) as client:
        assert (await client.get("/health")).status_code == 200
        for path in ("/metrics", *DOCS):
            r = await client.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert (await client.get(path, headers=bearer("hs_000000000000_" + "x" * 43))).status_code == 401
        for path in DOCS:
            assert (await client.get(path, headers=bearer(keys.gen_only))).status_code == 200, path
        r = await client.get("/metrics", headers=bearer(keys.gen_only))  # it would read every model's and key's name
        assert r.status_code == 403 and "every model" in r.json()["error"]["message"]
        for who in (keys.all, FLAT_KEY, ADMIN):
            r = await client.get("/metrics", headers=bearer(who))
            assert r.status_code == 200 and "hubserve_requests_total" in r.text


async def test_settings_open_metrics_and_docs(tmp_path: Path, keys: Keys, script: EngineScript) -> None:
    app, _ = build_app(tmp_path, script, public_metrics=True, public_docs=True)
    async with asgi_client(app) as client:
        for path in ("/metrics", *DOCS):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/v1/models")).status_code == 401  # the rest stays closed


async def test_without_any_key_everything_stays_open(tmp_path: Path, script: EngineScript) -> None:
    app, _ = build_app(tmp_path, script, api_keys="")  # no keys file either: auth is off (loopback only)
    async with asgi_client(app) as client:
        for path in ("/metrics", *DOCS, "/v1/models"):
            assert (await client.get(path)).status_code == 200, path


async def test_tokens_per_minute_holds_under_concurrency(tmp_path: Path, keys: Keys) -> None:
    """20 concurrent requests of a key with 5 tokens a minute, over loopback: admission reserves, so one runs
    (it uses 7) and the others get 429; a roomier key gets its unused reservation back when a request ends."""
    script = EngineScript(pause_s=0.5)
    app, _ = build_app(tmp_path, script)
    roomy_key, roomy = new_key("roomy", tpm=300)
    write_keys(keys.path, {**read_keys(keys.path), roomy.id: roomy})
    body = {"model": "gen", "prompt": "hi", "max_tokens": 2}
    with served(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            answers = await asyncio.gather(*(
                client.post("/v1/completions", json=body, headers=bearer(keys.thrifty)) for _ in range(20)
            ))
            statuses = sorted(r.status_code for r in answers)
            assert statuses == [200] + [429] * 19, statuses
            assert all("5 tokens per minute" in r.json()["error"]["message"] for r in answers if r.status_code == 429)
            r = await client.post("/v1/completions", json=body, headers=bearer(keys.thrifty))
            assert r.status_code == 429  # settled: the 7 it used count for the minute
            for _ in range(3):  # each reserves 256 and uses 7: without the refund the third would be refused
                assert (await client.post("/v1/completions", json=body, headers=bearer(roomy_key))).status_code == 200
    assert script.finished == 4


def _asking(model: str) -> list[tuple[str, str, object]]:
    """One request per family naming ``model`` (method, path, JSON body or None)."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return [
        ("POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": model, **chat}),
        ("POST", "/v1/messages", {"model": model, **chat}),
        ("POST", "/v1/tokenize", {"model": model, "prompt": "hi"}),
        ("GET", f"/v1/models/{model}", None),
        ("POST", f"/models/{model}", {"inputs": "hi"}),
        ("GET", f"/models/{model}/info", None),
        ("POST", f"/models/{model}/v1/chat/completions", chat),
    ]


async def test_a_restricted_key_cannot_tell_forbidden_models_from_unknown_ones(
    tmp_path: Path, keys: Keys, script: EngineScript
) -> None:
    app, _ = build_app(tmp_path, script)
    async with asgi_client(app) as client:
        wrong = []
        for forbidden, unknown in (("emb", "nope"), ("org/emb", "org/nope")):
            for (method, path, body), (_, path_unknown, body_unknown) in zip(
                _asking(forbidden), _asking(unknown), strict=True
            ):
                seen = []
                for p, b in ((path, body), (path_unknown, body_unknown)):
                    r = await client.request(method, p, json=b, headers=bearer(keys.gen_only))
                    seen.append((r.status_code, r.text, r.headers.get("x-error-code")))
                if seen[0] != seen[1] or "emb" in seen[0][1] or seen[0][0] != 404:
                    wrong.append(f"{method} {path}: {seen[0]} vs {path_unknown}: {seen[1]}")
        r = await client.post("/generate", json={"inputs": "hi"}, headers=bearer(keys.emb_only))  # the default: gen
        if "gen" in r.text.replace("generation", ""):
            wrong.append(f"/generate names the default model to a key that may not use it: {r.text}")
    assert not wrong, "\n".join(wrong)


def _word_tokenizer(snapshot: Path) -> None:
    """A real tokenizer.json (word level) in the gen/emb snapshot: the gateway tokenizes TGI /tokenize itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    tokenizer.save(str(snapshot / "tokenizer.json"))


async def test_big_tokenize_runs_off_the_event_loop_and_has_a_cap(tmp_path: Path, keys: Keys,
                                                                 script: EngineScript) -> None:
    _word_tokenizer(tmp_path)
    app, _ = build_app(tmp_path, script, max_tokenize_chars=2_000_000)
    order: list[str] = []
    async with asgi_client(app) as client:

        async def big() -> httpx.Response:
            r = await client.post("/tokenize", json={"inputs": "a b " * 100_000}, headers=bearer(keys.all))
            order.append("tokenize")
            return r

        async def health() -> None:
            await asyncio.sleep(0.02)  # the tokenize request is under way
            assert (await client.get("/health")).status_code == 200
            order.append("health")

        r, _ = await asyncio.gather(big(), health())
        assert r.status_code == 200 and len(r.json()) == 200_000
        assert order == ["health", "tokenize"]  # /health did not wait for the tokenizer
        over = {"inputs": "a" * 2_000_001}
        r = await client.post("/tokenize", json=over, headers=bearer(keys.all))
        assert r.status_code == 413 and r.json()["error_type"] == "request_too_large"
        assert "HUBSERVE_MAX_TOKENIZE_CHARS" in r.json()["error"]
        r = await client.post("/v1/tokenize", json={"model": "gen", "prompt": "a" * 2_000_001},
                              headers=bearer(keys.all))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
