"""OpenAI routes: thin; the logic is in serving.py. Every inference route is served twice: under ``/v1`` (the
body's ``model`` routes) and under ``/models/{repo_id}/v1`` (the path routes), like chat always was."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request, Response

from server.engines.client import read_json
from server.engines.tokenize import tokenize_on_engine
from server.errors import Family, family_dependency, model_path
from server.openai.audio import transcribe
from server.openai.protocol import ModelCard, ModelList
from server.openai.serving import (
    create_response,
    list_models,
    model_card,
    proxy_openai,
    stored_response,
)
from server.ops.auth import require_api_key
from server.tasks.catalog import RERANK_TASKS, SCORE_TASKS

DEPENDENCIES = [Depends(family_dependency(Family.OPENAI)), Depends(require_api_key)]
router = APIRouter(prefix="/v1", tags=["openai"], dependencies=DEPENDENCIES)
# Registered before the Hub family's POST /models/{repo_id:path}, whose path would swallow these.
model_router = APIRouter(prefix="/models/{repo_id:path}/v1", tags=["openai"],
                         dependencies=[*DEPENDENCIES, Depends(model_path)])
# The same routes without /v1 (TEI, Jina and vLLM clients post to /rerank, /score, /detokenize).
root_router = APIRouter(tags=["openai"], dependencies=DEPENDENCIES)

Endpoint = Callable[..., Awaitable[Response]]


def _serve(path: str, endpoint: Endpoint, methods: tuple[str, ...] = ("POST",), root: bool = False) -> None:
    for r in (router, model_router, *((root_router,) if root else ())):
        r.add_api_route(path, endpoint, methods=list(methods))


@router.get("/models")
async def models(request: Request) -> ModelList:
    """The models this request's API key may use, each with what it takes in (text, image, audio)."""
    return list_models(request.app.state.registry, request.app.state.started)


@router.get("/models/{model:path}")
async def model(request: Request, model: str) -> ModelCard:
    """One model by served name or repo id (`openai` client: `models.retrieve`)."""
    return model_card(request.app.state.registry.get(model), request.app.state.started)


def _passthrough(path: str, tasks: frozenset[str] | None = None) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await proxy_openai(request, request.app.state.registry, path, tasks=tasks)

    endpoint.__name__ = path.strip("/").replace("/", "_")
    return endpoint


async def responses_create(request: Request) -> Response:
    """OpenAI Responses (text, tools, instructions, previous_response_id, store, streaming)."""
    return await create_response(request, request.app.state.registry)


async def responses_retrieve(request: Request, response_id: str) -> Response:
    return await stored_response(request, request.app.state.registry, response_id, "")


async def responses_cancel(request: Request, response_id: str) -> Response:
    return await stored_response(request, request.app.state.registry, response_id, "/cancel")


async def audio_transcriptions(request: Request) -> Response:
    """Multipart upload (``file``, ``model``, ``language``, ...), as ``client.audio.transcriptions.create``."""
    return await transcribe(request, request.app.state.registry, "/v1/audio/transcriptions")


async def audio_translations(request: Request) -> Response:
    return await transcribe(request, request.app.state.registry, "/v1/audio/translations")


async def tokenize(request: Request) -> Response:
    """vLLM's ``{"model", "prompt" | "messages"}`` → ``{"count", "max_model_len", "tokens", "token_strs"}``."""
    return await tokenize_on_engine(request, "/tokenize", await read_json(request))


async def detokenize(request: Request) -> Response:
    """vLLM's ``{"model", "tokens"}`` → ``{"prompt"}``."""
    return await tokenize_on_engine(request, "/detokenize", await read_json(request))


_serve("/chat/completions", _passthrough("/v1/chat/completions"))
_serve("/completions", _passthrough("/v1/completions"))
_serve("/embeddings", _passthrough("/v1/embeddings"))
_serve("/responses", responses_create)
_serve("/responses/{response_id}", responses_retrieve, methods=("GET",))
_serve("/responses/{response_id}/cancel", responses_cancel)
_serve("/audio/transcriptions", audio_transcriptions)
_serve("/audio/translations", audio_translations)
_serve("/rerank", _passthrough("/rerank", RERANK_TASKS), root=True)  # cross-encoders; either backend
_serve("/score", _passthrough("/v1/score", SCORE_TASKS), root=True)
_serve("/tokenize", tokenize)
_serve("/detokenize", detokenize, root=True)
