"""Hub Inference API logic: one route per model that answers every task the model serves.

``POST /models/{repo_id}`` (and ``/``, ``/v1`` for the default model) dispatches on the model's task:
text-generation behaves as TGI's ``POST /`` (errors in TGI's shape, which InferenceClient turns into typed
exceptions), feature-extraction embeds through the engine's ``/v1/embeddings``. Chat passes through to vLLM.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from server.engines.base import Engine
from server.errors import Family, GenerationError, InvalidRequest
from server.hub.protocol import EmbedRequest, SimilarityRequest, parse_embed, parse_similarity
from server.ops.context import engine_headers, note_usage
from server.proxy import forward
from server.registry import Registry
from server.tgi.protocol import parse_generate
from server.tgi.serving import GENERATIVE_TASKS, dump_generate, engine_error, lost, read_json, tgi_service

log = logging.getLogger("hubserve.hub")

EMBEDDING = frozenset({"feature-extraction", "sentence-similarity", "embedding"})


async def infer(request: Request, engine: Engine) -> Response:
    """Run the request body as the model's task; the answer in the Inference API's shape for that task."""
    request.state.model = engine.info.name
    task = engine.info.task
    if task in GENERATIVE_TASKS:
        request.state.api_family = Family.TGI  # from here on errors carry TGI's error_type
        generate = parse_generate(await read_json(request))
        service = tgi_service(request)
        if generate.stream:
            return await service.open_stream(engine, generate)
        return JSONResponse([dump_generate(await service.generate(engine, generate))])
    if task in EMBEDDING:
        registry = request.app.state.registry
        payload = await read_json(request)
        if isinstance(payload, dict) and isinstance(payload.get("inputs"), dict):  # sentence-similarity
            return JSONResponse(await similarity(registry, engine, parse_similarity(payload)))
        return JSONResponse(await embed(registry, engine, parse_embed(payload)))
    raise InvalidRequest(
        f"Model `{engine.info.name}` has the task `{task}`; this server answers text-generation and "
        "feature-extraction models on the Inference API routes."
    )


def embeddings_body(request: EmbedRequest, model: str, prompt: str = "") -> dict[str, Any]:
    """The vLLM /v1/embeddings body for a TEI-style feature-extraction request. Pure."""
    body: dict[str, Any] = {
        "model": model,
        "input": [prompt + text for text in request.texts],
        "encoding_format": "float",
        "use_activation": request.normalize,  # vLLM: normalization of embedding outputs
    }
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.truncate:
        body["truncate_prompt_tokens"] = -1  # -1: cut to the model's context
        body["truncation_side"] = request.truncation_direction.lower()
    return body


def sentence_prompt(snapshot: str, name: str | None) -> str:
    """The text of a named sentence-transformers prompt; InvalidRequest when the model has no such prompt."""
    if name is None:
        return ""
    try:
        config = json.loads((Path(snapshot) / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    prompts = config.get("prompts") or {}
    if name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise InvalidRequest(f"`prompt_name` {name!r} is not a prompt of this model (known: {known}).")
    return str(prompts[name])


async def embed(registry: Registry, engine: Engine, request: EmbedRequest) -> list[list[float]]:
    async with registry.using(engine) as engine:
        prompt = sentence_prompt(engine.info.snapshot, request.prompt_name)
        body = embeddings_body(request, engine.info.name, prompt)
        try:
            response = await engine.client().post("/v1/embeddings", json=body, headers=engine_headers())
        except httpx.TransportError as e:
            raise lost(engine, e) from e
    if response.status_code >= 400:
        raise engine_error(response.status_code, response.content)
    note_usage(response.json().get("usage"))
    data = response.json().get("data") or []
    vectors = [item.get("embedding") for item in sorted(data, key=lambda d: d.get("index", 0))]
    if len(vectors) != len(request.texts) or not all(isinstance(v, list) for v in vectors):
        raise GenerationError("The engine answered an unexpected embeddings payload.")
    return vectors


async def similarity(registry: Registry, engine: Engine, request: SimilarityRequest) -> list[float]:
    """Cosine similarity of the source sentence with each sentence (normalized vectors: a dot product)."""
    texts = [request.inputs.source_sentence, *request.inputs.sentences]
    source, *others = await embed(registry, engine, EmbedRequest.model_validate({"inputs": texts}))
    return [cosine(source, other) for other in others]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


def chat_payload(payload: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat body for ``model``: the routed model replaces ``model`` (InferenceClient sends "dummy"),
    and TGI's ``{"type": "json_object", "value": schema}`` becomes vLLM's json_schema response format. Pure."""
    out = {**payload, "model": model}
    fmt = out.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object" and isinstance(fmt.get("value"), dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "schema", "schema": fmt["value"]}}
    return out


async def chat(request: Request, engine: Engine) -> Response:
    payload = await read_json(request)
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    request.state.model = engine.info.name
    body = json.dumps(chat_payload(payload, engine.info.name)).encode()
    return await forward(request.app.state.registry, engine, "/v1/chat/completions", body, request.headers, Family.TGI)
