"""The TGI and Hub Inference API routes in the real app (in-process, ASGITransport) over scripted engines whose
"vLLM server" is an in-memory function: routing by default model / repo id / served name, the error family
of each route, and POST / embedding when the default model is an embedding model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.engines.base import Engine, ModelInfo
from server.registry import Registry
from server.settings import Settings
from tests.fixtures.scripted_engine import Handler, ScriptedEngine

pytestmark = pytest.mark.integration

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


def completion(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    choice = {
        "index": 0,
        "text": "Paris",
        "token_ids": [7],
        "logprobs": {"tokens": ["Paris"], "token_logprobs": [-0.1], "top_logprobs": [{"Paris": -0.1}]},
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_token_ids": [1, 2],
    }
    if body.get("stream"):
        chunk = json.dumps({"choices": [choice]})
        return httpx.Response(200, content=f"data: {chunk}\n\ndata: [DONE]\n\n".encode())
    return httpx.Response(200, json={"choices": [choice]})


def embeddings(request: httpx.Request) -> httpx.Response:
    texts = json.loads(request.content)["input"]
    return httpx.Response(200, json={"data": [{"index": i, "embedding": [1.0, 0.0]} for i in range(len(texts))]})


def engines(tmp_path: Path, default: str) -> list[Engine]:
    def info(name: str, repo: str, task: str) -> ModelInfo:
        return ModelInfo(
            name=name, repo=repo, commit="c" * 40, task=task, snapshot=str(tmp_path), default=name == default
        )

    def router(table: dict[str, Handler]) -> Handler:
        return lambda request: table[request.url.path](request)

    return [
        ScriptedEngine(info("gen", "org/gen", "text-generation"), router({"/v1/completions": completion})),
        ScriptedEngine(info("emb", "org/emb", "feature-extraction"), router({"/v1/embeddings": embeddings})),
    ]


async def client_for(tmp_path: Path, default: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings.model_validate({"api_keys": KEY})
    app = create_app(settings, Registry(engines(tmp_path, default)), start_engines=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hubserve") as c:
        yield c


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(tmp_path, default="gen"):
        yield c


@pytest.fixture
async def embedding_default(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(tmp_path, default="emb"):
        yield c


async def test_tgi_routes_use_the_default_model(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"inputs": "q", "parameters": {"max_new_tokens": 1}}, headers=AUTH)
    assert r.json() == {"generated_text": "Paris"}
    r = await client.post("/", json={"inputs": "q", "parameters": {"max_new_tokens": 1}}, headers=AUTH)
    assert r.json() == [{"generated_text": "Paris"}]
    r = await client.post("/generate_stream", json={"inputs": "q", "parameters": {"max_new_tokens": 1}}, headers=AUTH)
    event = json.loads(r.text.strip().removeprefix("data:"))
    assert event["generated_text"] == "Paris" and event["token"]["id"] == 7
    assert (await client.get("/info", headers=AUTH)).json()["model_id"] == "org/gen"


async def test_hub_routes_select_by_repo_or_name(client: httpx.AsyncClient) -> None:
    r = await client.post("/models/org/emb", json={"inputs": ["a", "b"]}, headers=AUTH)
    assert r.json() == [[1.0, 0.0], [1.0, 0.0]]
    r = await client.post("/models/gen", json={"inputs": "q", "parameters": {"max_new_tokens": 1}}, headers=AUTH)
    assert r.json() == [{"generated_text": "Paris"}]
    r = await client.post(
        "/models/org/emb", json={"inputs": {"source_sentence": "a", "sentences": ["b"]}}, headers=AUTH
    )
    assert r.json() == [pytest.approx(1.0)]


async def test_error_shapes_per_route(client: httpx.AsyncClient) -> None:
    unknown = await client.post("/models/org/none", json={"inputs": "q"}, headers=AUTH)
    assert unknown.status_code == 404 and unknown.headers["x-error-code"] == "RepoNotFound"
    assert set(unknown.json()) == {"error"}
    bad = await client.post("/models/gen", json={"inputs": "q", "parameters": {"top_p": 1}}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"  # text generation: TGI's shape
    bad = await client.post("/models/emb", json={"inputs": []}, headers=AUTH)
    assert bad.status_code == 400 and bad.headers["x-error-code"] == "invalid_request"
    wrong = await client.post("/generate", json={"inputs": "q"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error_type"] == "authentication"


async def test_root_embeds_when_the_default_model_embeds(embedding_default: httpx.AsyncClient) -> None:
    r = await embedding_default.post("/", json={"inputs": "hello"}, headers=AUTH)
    assert r.json() == [[1.0, 0.0]]
    r = await embedding_default.post("/generate", json={"inputs": "hello"}, headers=AUTH)
    assert r.status_code == 422 and "does not generate text" in r.json()["error"]
