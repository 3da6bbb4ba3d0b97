"""Keys, model access, rate limits, request ids and request-size/time limits in the real app over scripted
engines: the auth matrix over every route of the app's own OpenAPI schema, the families' 401/404/429 shapes,
hot reload of the keys file through the real ``hubserve keys`` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.registry import Registry
from tests.fixtures.gateway_app import FLAT_KEY, EngineScript, Keys, asgi_client, build_app

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
OPEN = {("GET", "/health"), ("GET", "/ready")}
ADMIN_TOKEN = "admin-token-0123456789"  # /admin/*: its own bearer token, never an API key
GEN = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MESSAGES = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# (method, path) → (path params, body, model the route uses or None). Routes missing here are still checked
# for 401 (no key, bad key) and for "no 401/403 with a good key".
ROUTES: dict[tuple[str, str], tuple[dict[str, str], Any, str | None]] = {
    ("GET", "/v1/models"): ({}, None, None),
    ("GET", "/v1/models/{model}"): ({"model": "gen"}, None, "gen"),
    ("POST", "/v1/chat/completions"): ({}, {"model": "gen", **CHAT}, "gen"),
    ("POST", "/v1/completions"): ({}, {"model": "org/gen", "prompt": "hi", "max_tokens": 2}, "gen"),
    ("POST", "/v1/embeddings"): ({}, {"model": "emb", "input": "hi"}, "emb"),
    ("POST", "/generate"): ({}, GEN, "gen"),
    ("POST", "/generate_stream"): ({}, GEN, "gen"),
    ("GET", "/info"): ({}, None, "gen"),
    ("POST", "/tokenize"): ({}, {"inputs": "hi"}, "gen"),
    ("POST", "/models/{repo_id}/v1/chat/completions"): ({"repo_id": "org/gen"}, CHAT, "gen"),
    ("GET", "/models/{repo_id}/info"): ({"repo_id": "gen"}, None, "gen"),
    ("GET", "/models/{repo_id}/health"): ({"repo_id": "org/emb"}, None, "emb"),
    ("POST", "/models/{repo_id}/v1"): ({"repo_id": "org/gen"}, GEN, "gen"),
    ("POST", "/models/{repo_id}"): ({"repo_id": "emb"}, {"inputs": ["a"]}, "emb"),
    ("POST", "/v1"): ({}, GEN, "gen"),
    ("POST", "/"): ({}, GEN, "gen"),
    ("POST", "/v1/responses"): ({}, {"model": "gen", "input": "hi", "max_output_tokens": 2}, "gen"),
    ("POST", "/models/{repo_id}/v1/responses"): ({"repo_id": "org/gen"}, {"input": "hi"}, "gen"),
    ("POST", "/v1/messages"): ({}, {"model": "gen", **MESSAGES}, "gen"),
    ("POST", "/v1/messages/count_tokens"): ({}, {"model": "org/gen", **MESSAGES}, "gen"),
    ("POST", "/models/{repo_id}/v1/messages"): ({"repo_id": "gen"}, {"model": "x", **MESSAGES}, "gen"),
    ("POST", "/v1/tokenize"): ({}, {"model": "gen", "prompt": "hi"}, "gen"),
    ("POST", "/detokenize"): ({}, {"model": "gen", "tokens": [1, 2]}, "gen"),
    ("POST", "/v1/score"): ({}, {"model": "emb", "text_1": "a", "text_2": "b"}, "emb"),
    ("POST", "/score"): ({}, {"model": "emb", "text_1": "a", "text_2": "b"}, "emb"),
}
UNKNOWN_IDS = {  # path params of routes not in ROUTES; any other: org/gen
    "{response_id}": "resp_unknown", "{file_id}": "file-unknown", "{batch_id}": "batch_unknown",
}


@pytest.fixture
async def app_client(tmp_path: Path, keys: Keys, script: EngineScript) -> AsyncIterator[httpx.AsyncClient]:
    app, _ = build_app(tmp_path, script, max_new_tokens=64, admin_token=ADMIN_TOKEN)
    async with asgi_client(app) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return (
        await client.request(method, path, json=body, headers=headers)
        if body is not None
        else await client.request(method, path, headers=headers)
    )


async def test_auth_matrix_over_every_route_of_the_schema(app_client: httpx.AsyncClient, keys: Keys) -> None:
    schema = (await app_client.get("/openapi.json", headers=bearer(keys.all))).json()
    operations = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    assert len(operations) >= len(ROUTES), "the schema lost routes"
    wrong: list[str] = []
    checked = 0
    for method, template in operations:
        if (method, template) in OPEN:
            r = await app_client.request(method, template)
            checked += 1
            if r.status_code != 200:
                wrong.append(f"{method} {template} without a key: {r.status_code} (must stay open)")
            continue
        if template.startswith("/admin/"):
            wrong += await _check_admin(app_client, method, template, keys)
            checked += 5
            continue
        params, body, model = ROUTES.get((method, template), ({}, None, None))
        path = template.format(**params) if params else re.sub(
            r"\{[^}]+\}", lambda m: UNKNOWN_IDS.get(m.group(0), "org/gen"), template
        )
        other = {None: keys.emb_only, "gen": keys.emb_only, "emb": keys.gen_only}[model]
        cases: list[tuple[str, dict[str, str], set[int]]] = [
            ("no key", {}, {401}),
            ("bad key", bearer("hs_000000000000_" + "x" * 43), {401}),
            ("bad flat key", bearer("nope"), {401}),
        ]
        if (method, template) in ROUTES:
            cases += [
                ("key without that model", bearer(other), {200} if model is None else {404}),  # as if unknown
                ("good key", bearer(keys.all), {200}),
                ("good key (x-api-key)", {"x-api-key": keys.all}, {200}),
                ("flat key", bearer(FLAT_KEY), {200}),
            ]
        for what, headers, expected in cases:
            r = await call(app_client, method, path, body, headers)
            checked += 1
            if r.status_code not in expected:
                wrong.append(f"{method} {path} with {what}: {r.status_code} {r.text[:120]}")
        if (method, template) not in ROUTES:  # a route this table does not know yet: a good key must get in
            r = await call(app_client, method, path, body, bearer(keys.all))
            if r.status_code in (401, 403) or r.status_code >= 500:
                wrong.append(f"{method} {path} with a good key: {r.status_code}")
    print(f"\nauth matrix: {len(operations)} operations, {checked} requests, {len(wrong)} wrong")
    assert not wrong, "\n".join(wrong)


async def _check_admin(client: httpx.AsyncClient, method: str, path: str, keys: Keys) -> list[str]:
    wrong = []
    for what, headers, status in (("no key", {}, 401), ("bad key", bearer("nope"), 401),
                                  ("an API key without the admin scope", bearer(keys.all), 403),
                                  ("a flat key", bearer(FLAT_KEY), 403)):
        r = await client.request(method, path, headers=headers)
        if r.status_code != status:
            wrong.append(f"{method} {path} with {what}: {r.status_code}")
    r = await client.request(method, path, headers=bearer(ADMIN_TOKEN))
    if r.status_code in (401, 403) or r.status_code >= 500:
        wrong.append(f"{method} {path} with the admin token: {r.status_code}")
    return wrong


async def test_401_and_hidden_404_in_each_family_shape(app_client: httpx.AsyncClient, keys: Keys) -> None:
    r = await app_client.post("/v1/completions", json={"model": "gen", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = await app_client.post("/v1/completions", json={"model": "gen", "prompt": "x"}, headers=bearer(keys.emb_only))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # a model it may not use
    assert r.json()["error"]["type"] == "invalid_request_error" and "gen" not in r.json()["error"]["message"]
    r = await app_client.post("/generate", json=GEN, headers=bearer(keys.emb_only))
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = await app_client.post("/generate", json=GEN)
    assert r.status_code == 401 and r.json()["error_type"] == "authentication"
    r = await app_client.post("/models/org/emb", json={"inputs": "a"}, headers=bearer(keys.gen_only))
    assert r.status_code == 404 and r.headers["x-error-code"] == "RepoNotFound" and set(r.json()) == {"error"}
    r = await app_client.post("/models/org/emb", json={"inputs": "a"})
    assert r.status_code == 401 and r.headers["x-error-code"] == "Unauthorized"
    # an unknown model stays 404 whatever the key may use; a wrong key never learns more than 401
    r = await app_client.post("/v1/completions", json={"model": "none", "prompt": "x"}, headers=bearer(keys.gen_only))
    assert r.status_code == 404


async def test_models_list_hides_what_a_key_may_not_use(app_client: httpx.AsyncClient, keys: Keys) -> None:
    async def ids(key: str) -> list[str]:
        return [m["id"] for m in (await app_client.get("/v1/models", headers=bearer(key))).json()["data"]]

    assert await ids(keys.all) == ["gen", "emb"]
    assert await ids(FLAT_KEY) == ["gen", "emb"]
    assert await ids(keys.gen_only) == ["gen"]
    assert await ids(keys.emb_only) == ["emb"]
    assert (await app_client.get("/v1/models/emb", headers=bearer(keys.gen_only))).status_code == 404


def hubserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


async def test_keys_cli_changes_reach_the_running_server(tmp_path: Path, script: EngineScript) -> None:
    keys_file = tmp_path / "keys.toml"
    app, _ = build_app(tmp_path, script, api_keys="")  # no key at all yet: auth is off
    async with asgi_client(app) as client:
        assert (await client.get("/v1/models")).status_code == 200
        added = hubserve("keys", "add", "team-a", "--models", "gen", "--rpm", "100", "--keys-file", str(keys_file))
        assert added.returncode == 0, added.stderr
        key = added.stdout.strip()
        assert re.fullmatch(r"hs_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
        assert key not in keys_file.read_text() and keys_file.stat().st_mode & 0o077 == 0
        assert (await client.get("/v1/models")).status_code == 401  # the first key switches auth on
        r = await client.get("/v1/models", headers=bearer(key))
        assert [m["id"] for m in r.json()["data"]] == ["gen"]
        listed = hubserve("keys", "list", "--keys-file", str(keys_file))
        assert "team-a" in listed.stdout and key not in listed.stdout
        assert hubserve("keys", "add", "team-a", "--keys-file", str(keys_file)).returncode == 2
        revoked = hubserve("keys", "revoke", "team-a", "--keys-file", str(keys_file))
        assert revoked.returncode == 0, revoked.stderr
        assert (await client.get("/v1/models", headers=bearer(key))).status_code == 401
        assert (await client.get("/v1/models")).status_code == 401  # no key left: still closed, not open
        keys_file.unlink()
        assert (await client.get("/v1/models")).status_code == 401  # deleting the file does not open it
    gone = hubserve("keys", "revoke", "team-a", "--keys-file", str(keys_file))
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1 and "no key named" in gone.stderr


@pytest.mark.parametrize("command", [["serve"], ["mirror"]])
def test_no_public_bind_without_keys(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "store").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_")}
    args = [sys.executable, "-m", "server.cli", *command, "--host", "0.0.0.0", "--store", str(tmp_path / "store")]
    if command == ["serve"]:
        args += ["--config", str(tmp_path / "models.toml")]
    run = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "refusing to listen on 0.0.0.0 with no API key configured" in run.stderr
    assert "--insecure-public" in run.stderr


async def test_requests_per_minute(app_client: httpx.AsyncClient, keys: Keys) -> None:
    for _ in range(2):
        assert (await app_client.get("/v1/models", headers=bearer(keys.limited))).status_code == 200
    r = await app_client.get("/v1/models", headers=bearer(keys.limited))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    # the sliding-window estimate (ratelimit.py) weighs the last minute's requests: up to 2 minutes to wait
    assert 1 <= int(r.headers["retry-after"]) <= 120 and "2 requests per minute" in r.json()["error"]["message"]
    r = await app_client.post("/generate", json=GEN, headers=bearer(keys.limited))
    assert r.status_code == 429 and r.json()["error_type"] == "overloaded" and "retry-after" in r.headers
    assert (await app_client.get("/v1/models", headers=bearer(keys.all))).status_code == 200  # others unaffected


async def test_tokens_per_minute(app_client: httpx.AsyncClient, keys: Keys) -> None:
    body = {"model": "gen", "prompt": "hi", "max_tokens": 2}
    first = await app_client.post("/v1/completions", json=body, headers=bearer(keys.thrifty))
    assert first.status_code == 200  # 3 + 4 tokens: over the 5 of its minute from now on
    r = await app_client.post("/v1/completions", json=body, headers=bearer(keys.thrifty))
    assert r.status_code == 429 and "5 tokens per minute" in r.json()["error"]["message"]
    assert r.headers["retry-after"]


async def test_request_id_is_validated_returned_and_passed_to_the_engine(
    app_client: httpx.AsyncClient, keys: Keys, script: EngineScript
) -> None:
    body = {"model": "gen", "prompt": "hi", "max_tokens": 2}
    r = await app_client.post("/v1/completions", json=body, headers={**bearer(keys.all), "X-Request-Id": "abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    assert re.fullmatch(r"abc-1-[0-9a-f]{8}", script.seen[-1].headers["x-request-id"])
    r = await app_client.post("/generate", json=GEN, headers=bearer(keys.all))
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and script.seen[-1].headers["x-request-id"] == rid
    for bad in (b"a b", b"x" * 129, b"<script>", "ü".encode()):
        r = await app_client.get("/v1/models", headers={**bearer(keys.all), "X-Request-Id": bad})
        assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]["message"], bad
        assert r.headers["x-request-id"].encode() != bad


async def test_body_size_limit(tmp_path: Path, keys: Keys, script: EngineScript) -> None:
    app, _ = build_app(tmp_path, script, max_body_bytes=4096)
    big = {"model": "gen", "prompt": "x" * 5000}
    async with asgi_client(app) as client:
        r = await client.post("/v1/completions", json=big, headers=bearer(keys.all))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunked() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
            for _ in range(10):
                yield b" " * 1000

        r = await client.post("/generate", content=chunked(), headers=bearer(keys.all))
        assert r.status_code == 413 and r.json()["error_type"] == "request_too_large"
    assert not script.seen


async def test_max_new_tokens_cap(app_client: httpx.AsyncClient, keys: Keys, script: EngineScript) -> None:
    r = await app_client.post(
        "/v1/completions", json={"model": "gen", "prompt": "hi", "max_tokens": 65}, headers=bearer(keys.all)
    )
    assert r.status_code == 400 and "<= 64" in r.json()["error"]["message"]
    r = await app_client.post(
        "/v1/chat/completions", json={"model": "gen", "messages": CHAT["messages"]}, headers=bearer(keys.all)
    )
    assert r.status_code == 200
    assert b'"max_tokens": 64' in script.seen[-1].content  # none asked: the cap is sent
    r = await app_client.post(
        "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 65}}, headers=bearer(keys.all)
    )
    assert r.status_code == 422 and "<= 64" in r.json()["error"]
    r = await app_client.post(
        "/models/org/gen/v1/chat/completions", json={**CHAT, "max_tokens": 100}, headers=bearer(keys.all)
    )
    assert r.status_code == 400 and "HUBSERVE_MAX_NEW_TOKENS" in r.json()["error"]["message"]  # the OpenAI family


async def test_request_timeout_frees_the_slot(tmp_path: Path, keys: Keys, script: EngineScript) -> None:
    app, registry = build_app(tmp_path, script, request_timeout_s=0.5)
    async with asgi_client(app) as client:
        r = await client.post("/generate", json={"inputs": "slow"}, headers=bearer(keys.all))
        assert r.status_code == 504 and r.json()["error_type"] == "timeout"
        r = await client.post("/v1/completions", json={"model": "gen", "prompt": "slow"}, headers=bearer(keys.all))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert script.cancelled == 2 and _in_flight(registry) == 0


def _in_flight(registry: Registry) -> int:
    return sum(e.in_flight for e in registry.engines.values())


async def test_grafana_dashboard_uses_only_exposed_metrics(app_client: httpx.AsyncClient, keys: Keys) -> None:
    dashboard = json.loads((REPO_ROOT / "docker" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {re.sub(r"_bucket$", "", n) for e in exprs for n in re.findall(r"hubserve_[a-z_]+", e)}
    assert (await app_client.post("/generate", json=GEN, headers=bearer(keys.all))).status_code == 200
    text = (await app_client.get("/metrics", headers=bearer(keys.all))).text
    missing = sorted(n for n in names if f"# TYPE {n} " not in text)
    assert len(names) >= 12 and not missing, missing
    assert 'hubserve_requests_total{model="gen",route="/generate",status="200"} 1.0' in text
    assert 'hubserve_key_requests_total{key="all",model="gen",status="200"} 1.0' in text
    assert 'hubserve_tokens_out_total{model="gen"} 4.0' in text


@pytest.mark.parametrize("queued", [0, 4])
async def test_bounded_queue(tmp_path: Path, keys: Keys, queued: int) -> None:
    """One slot: with room in the queue the second request waits for it (200); without, 429 at once."""
    script = EngineScript(pause_s=0.3)
    app, registry = build_app(
        tmp_path, script, max_concurrent_requests=1, max_queued_requests=queued, queue_timeout_s=10
    )
    body = {"model": "gen", "prompt": "hi", "max_tokens": 2}
    async with asgi_client(app) as client:
        first, second = await asyncio.gather(
            client.post("/v1/completions", json=body, headers=bearer(keys.all)),
            client.post("/v1/completions", json=body, headers=bearer(keys.all)),
        )
        metrics = (await client.get("/metrics", headers=bearer(keys.all))).text
    # which of the two concurrent requests takes the slot first is the event loop's business
    first, second = sorted((first, second), key=lambda r: r.status_code)
    assert first.status_code == 200
    if queued:
        assert second.status_code == 200
        assert 'hubserve_queue_seconds_bucket{le="0.1",model="gen"} 1.0' in metrics  # one waited ~0.3 s
    else:
        assert second.status_code == 429 and second.headers["retry-after"] == "5"
        assert "1 requests in flight and 0 waiting" in second.json()["error"]["message"]
    assert _in_flight(registry) == 0
