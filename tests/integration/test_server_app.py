"""The gateway app in-process (httpx ASGITransport), with real but unstarted vLLM engines: auth, error shapes,
routing, limits and ops routes, none of which need a running engine. Plus ``hubserve serve`` refusing to
start on an unverified store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engines.base import EngineState, ModelInfo
from server.errors import (
    EngineUnavailable,
    Family,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    error_response,
    family_of_path,
    sse_error_event,
)
from server.registry import Registry
from server.settings import Settings

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "integration-key"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read HUBSERVE_* from the environment: a developer's own keys must not leak into these tests."""
    for name in [n for n in os.environ if n.startswith("HUBSERVE_")]:
        monkeypatch.delenv(name)


def _registry(settings: Settings, tmp_path: Path) -> Registry:
    from server.engines.vllm import VLLMEngine

    def info(name: str, repo: str, commit: str, task: str, default: bool) -> ModelInfo:
        snapshot = tmp_path / "store" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        return ModelInfo(name=name, repo=repo, commit=commit, task=task, snapshot=str(snapshot), default=default)

    return Registry(
        [
            VLLMEngine(
                info("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", COMMIT_A, "text-generation", True), settings
            ),
            VLLMEngine(
                info("minilm", "sentence-transformers/all-MiniLM-L6-v2", COMMIT_B, "feature-extraction", False),
                settings,
            ),
        ],
        settings=settings,  # the app's own settings (queue_timeout_s=0: a full engine is 429 at once, not in 30 s)
    )


def _app(tmp_path: Path, **settings: object) -> FastAPI:
    s = Settings.model_validate({"state_url": f"sqlite://{tmp_path / 'state.db'}", **settings})  # not ./state.db
    return create_app(s, _registry(s, tmp_path), start_engines=False)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = _app(tmp_path, api_keys=KEY, max_concurrent_requests=1, queue_timeout_s=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hubserve") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}


def _assert_openai_error(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


# ---- auth ------------------------------------------------------------------------------------------------


async def test_inference_routes_need_a_key(client: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings")):
        r = await client.request(method, path, json=CHAT)
        _assert_openai_error(r, 401, "invalid_api_key")
        r = await client.request(method, path, json=CHAT, headers={"Authorization": "Bearer nope"})
        _assert_openai_error(r, 401, "invalid_api_key")
    assert (await client.get("/v1/models", headers=AUTH)).status_code == 200


async def test_health_is_open_and_metrics_configurable(client: httpx.AsyncClient, tmp_path: Path) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 401  # closed by default once keys exist
    assert (await client.get("/metrics", headers=AUTH)).status_code == 200
    app = _app(tmp_path, api_keys=KEY, public_metrics=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://h") as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/health")).status_code == 200


async def test_keys_file_holds_digests(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# hubserve keys\n{hashlib.sha256(b'from-file').hexdigest()}\n")
    app = _app(tmp_path, api_keys_file=keys)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://h") as c:
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer from-file"})).status_code == 200


def test_keys_are_not_kept_in_clear() -> None:
    s = Settings.model_validate({"api_keys": "alpha, beta"})
    assert "alpha" not in repr(s) and "alpha" not in str(s.model_dump())
    assert s.all_key_digests() == {hashlib.sha256(k).hexdigest() for k in (b"alpha", b"beta")}


def test_bad_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text("not-a-digest\n")
    with pytest.raises(ValueError, match="keys:1: not a sha256"):
        Settings.model_validate({"api_keys_file": bad})


# ---- routing and errors ----------------------------------------------------------------------------------


async def test_models_list_without_engines(client: httpx.AsyncClient) -> None:
    data = (await client.get("/v1/models", headers=AUTH)).json()["data"]
    assert [(m["id"], m["repo"], m["commit"], m["owned_by"]) for m in data] == [
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", COMMIT_A, "hubserve"),
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2", COMMIT_B, "hubserve"),
    ]
    assert data[0]["state"] == "stopped"


async def test_retrieve_one_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models/sentence-transformers/all-MiniLM-L6-v2", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == "minilm" and r.json()["commit"] == COMMIT_B
    _assert_openai_error(await client.get("/v1/models/nope", headers=AUTH), 404, "model_not_found")


async def test_unknown_model_is_404_listing_served_names(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}, headers=AUTH)
    error = _assert_openai_error(r, 404, "model_not_found")
    assert error["param"] == "model"
    assert "smollm2" in str(error["message"]) and "minilm" in str(error["message"])


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'"text"', b'{"model": 5}', b'{"model": "smollm2", "stream": "maybe"}', b"\xff\xfe"],
)
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, content: bytes) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    r = await client.post("/v1/completions", content=content, headers=headers)
    _assert_openai_error(r, 400, "invalid_request")


async def test_known_model_not_started_is_503_with_retry_after(client: httpx.AsyncClient) -> None:
    for body in (CHAT, {"messages": CHAT["messages"]}, {**CHAT, "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}):
        r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        _assert_openai_error(r, 503, "engine_unavailable")
        assert r.headers["retry-after"] == "5"


async def test_overload_is_429_with_retry_after(client: httpx.AsyncClient) -> None:
    registry: Registry = client.app.state.registry  # type: ignore[attr-defined]
    engine = registry.get("smollm2")
    # Pretend the engine is up (no process needed) and hold its only slot: the next request must be refused.
    engine._state = EngineState.READY  # type: ignore[attr-defined]
    with engine.admit():
        r = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        _assert_openai_error(r, 429, "overloaded")
        assert r.headers["retry-after"] == "5"
    assert engine.in_flight == 0


async def test_unknown_route_keeps_the_family_shape(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing-here", headers=AUTH)
    _assert_openai_error(r, 404, "not_found")
    r = await client.get("/v1/chat/completions", headers=AUTH)
    _assert_openai_error(r, 405, "method_not_allowed")


async def test_ready_and_health_report_each_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/ready")
    assert r.status_code == 503
    assert r.json()["models"] == {"smollm2": "stopped", "minilm": "stopped"}
    health = (await client.get("/health")).json()
    assert health["ready"] is False
    assert health["models"]["minilm"]["commit"] == COMMIT_B


async def test_metrics_count_requests_by_model(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    text = (await client.get("/metrics", headers=AUTH)).text
    assert 'hubserve_request_failure_total{model="smollm2",route="/v1/chat/completions",status="503"} 1.0' in text
    assert 'hubserve_engine_state{model="smollm2",state="stopped"} 1.0' in text


# ---- the three error shapes ------------------------------------------------------------------------------


def test_error_shapes_per_family() -> None:
    exc = Overloaded("busy", retry_after=3)
    openai_r = error_response(exc, Family.OPENAI)
    assert openai_r.status_code == 429 and openai_r.headers["retry-after"] == "3"
    tgi = error_response(InvalidRequest("bad temperature"), Family.TGI)
    assert tgi.status_code == 422
    assert tgi.body == b'{"error":"bad temperature","error_type":"validation"}'
    assert error_response(EngineUnavailable("down"), Family.TGI).status_code == 503
    hub = error_response(ModelNotFound("x/y", ["smollm2"]), Family.HUB)
    assert hub.status_code == 404
    assert hub.headers["x-error-code"] == "RepoNotFound"
    assert "x/y" in hub.headers["x-error-message"]
    assert sse_error_event(exc, Family.TGI) == b'data:{"error": "busy", "error_type": "overloaded"}\n\n'


def test_family_of_path() -> None:
    assert family_of_path("/v1/chat/completions") is Family.OPENAI
    assert family_of_path("/v1") is Family.HUB
    assert family_of_path("/models/org/name") is Family.HUB
    assert family_of_path("/generate_stream") is Family.TGI
    assert family_of_path("/") is Family.TGI
    assert family_of_path("/metrics") is Family.OPS


# ---- serve refuses an unverified store -------------------------------------------------------------------


def test_serve_exits_1_when_a_model_is_not_verified(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        f'[store]\npath = "store"\n\n[[models]]\nname = "ghost"\nrepo = "org/ghost"\nrevision = "{COMMIT_A}"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        env={**os.environ, "COLUMNS": "1000"},  # rich wraps at 80 columns without a terminal
    )
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "ghost" in lines[0] and "hubserve sync" in lines[0]
