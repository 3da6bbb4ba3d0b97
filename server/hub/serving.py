"""Hub Inference API logic: one route per model that answers every task the model serves.

``POST /models/{repo_id}`` (and ``/``, ``/v1`` for the default model) dispatches on the model's task:
text-generation behaves as TGI's ``POST /`` (errors in TGI's shape, which InferenceClient turns into typed
exceptions), feature-extraction embeds through the engine's ``/v1/embeddings``. Chat is the OpenAI family's.
The other text tasks go to the transformers worker (which answers in the Hub's shape) or, for the tasks vLLM's
pooling runner serves (text- and token-classification, fill-mask), through server/hub/on_vllm.py. Image, audio
and table tasks: server/hub/media_tasks.py.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from server.engines.base import Engine
from server.engines.client import post_engine, read_json
from server.errors import GenerationError, InvalidRequest
from server.hub import on_vllm
from server.hub.media_tasks import run_media_task
from server.registry import Registry
from server.tasks.catalog import EMBEDDING_TASKS, GENERATIVE_TASKS, MEDIA_TASKS, NOT_SERVED
from server.tasks.requests import (
    TASK_REQUESTS,
    EmbedRequest,
    FillMaskRequest,
    SimilarityRequest,
    TextClassificationRequest,
    TokenClassificationRequest,
    parse_embed,
    parse_similarity,
    parse_task,
)
from server.tasks.snapshot import snapshot_json

log = logging.getLogger("hubserve.hub")

EMBEDDING = EMBEDDING_TASKS


async def infer(request: Request, engine: Engine) -> Response:
    """Run the request body as the model's task; the answer in the Inference API's shape for that task."""
    request.state.model = engine.info.name
    task = engine.info.task
    if task in MEDIA_TASKS:
        return await run_media_task(request.app.state.registry, engine, request)
    if task in TASK_REQUESTS and (engine.backend != "vllm" or task not in GENERATIVE_TASKS):
        return await run_task(request.app.state.registry, engine, task, await read_json(request))
    if task in GENERATIVE_TASKS:
        # TGI's POST / answers it (errors in TGI's shape, which InferenceClient reads); app.py hands that handler
        # over as app.state.text_generation, so this family imports no other.
        response: Response = await request.app.state.text_generation(request, engine)
        return response
    if task in EMBEDDING:
        registry = request.app.state.registry
        payload = await read_json(request)
        if isinstance(payload, dict) and isinstance(payload.get("inputs"), dict):  # sentence-similarity
            return JSONResponse(await similarity(registry, engine, parse_similarity(payload)))
        return JSONResponse(await embed(registry, engine, parse_embed(payload)))
    raise InvalidRequest(f"Model `{engine.info.name}` has the task `{task}`, which the Inference API routes do not "
                         "serve" + ("; POST /v1/rerank" if task == "text-ranking" else "") + ".")


def check_task(engine: Engine, task: str) -> None:
    """``POST /models/{repo}/pipeline/{task}``: the task must be the model's (embedding tasks are one family)."""
    if task in NOT_SERVED:
        raise InvalidRequest(f"{task} is not served by hubserve: {NOT_SERVED[task]}.", param="task")
    if task != engine.info.task and not (task in EMBEDDING and engine.info.task in EMBEDDING):
        raise InvalidRequest(f"Model `{engine.info.name}` serves {engine.info.task}, not {task}.", param="task")


async def run_task(registry: Registry, engine: Engine, task: str, payload: object) -> Response:
    """One request of a text task other than generation and embeddings, answered in the Hub's shape."""
    parsed = parse_task(task, payload, engine.info.name)
    cap = registry.settings.max_tokenize_chars  # the gateway tokenizes token-level tasks on vLLM itself
    async with registry.using(engine) as engine:
        if engine.backend == "vllm":  # engines/select.py sends only these tasks to vLLM
            if isinstance(parsed, TextClassificationRequest):
                return JSONResponse(await on_vllm.classify(engine, parsed))
            if isinstance(parsed, TokenClassificationRequest):
                return JSONResponse(await on_vllm.token_classification(engine, parsed, cap))
            if isinstance(parsed, FillMaskRequest):
                return JSONResponse(await on_vllm.fill_mask(engine, parsed, cap))
            raise InvalidRequest(f"Model `{engine.info.name}` serves {task} on vLLM, which does not answer it here; "
                                 'set backend = "transformers" in models.toml.')
        response = await post_engine(engine, "/run", parsed.model_dump(exclude_none=True))
    return Response(response.content, media_type="application/json")



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
    config = snapshot_json(snapshot, "config_sentence_transformers.json")
    prompts = config.get("prompts") or {}
    if name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise InvalidRequest(f"`prompt_name` {name!r} is not a prompt of this model (known: {known}).")
    return str(prompts[name])


async def embed(registry: Registry, engine: Engine, request: EmbedRequest) -> list[list[float]]:
    async with registry.using(engine) as engine:
        prompt = sentence_prompt(engine.info.snapshot, request.prompt_name)
        body = embeddings_body(request, engine.model_id, prompt)
        response = await post_engine(engine, "/v1/embeddings", body)
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
