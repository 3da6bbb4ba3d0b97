"""OpenAI routes: thin; the logic is in serving.py. Every inference route is served twice: under ``/v1`` (the
body's ``model`` routes) and under ``/models/{repo_id}/v1`` (the path routes), like chat always was."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from server.engines.client import read_json
from server.engines.tokenize import tokenize_on_engine
from server.errors import Family, family_dependency, model_path
from server.openai.audio import transcribe
from server.openai.protocol import ModelCard
from server.openai.serving import (
    create_response,
    list_models,
    model_card,
    proxy_openai,
    stored_response,
)
from server.ops.auth import may_use_names, require_api_key
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


class AliasCard(BaseModel):
    """An alias of models.toml's ``[[aliases]]`` in /v1/models: a name that its first model able to answers."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hubserve"
    candidates: list[str] = Field(description="The models tried in order; the answer names the one that answered.")
    fallback_on: list[str] = Field(description="Why the next is tried: failed, overloaded, loading, context_length.")


class ModelsAndAliases(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard | AliasCard]


def _alias_cards(request: Request) -> list[AliasCard]:
    """The aliases this request's key may use (their name is in its list); through one, its candidates are its too."""
    started = int(request.app.state.started)
    return [AliasCard(id=a.name, created=started, candidates=list(a.models), fallback_on=list(a.fallback_on))
            for a in request.app.state.registry.aliases.values() if may_use_names((a.name,))]


@router.get("/models", response_model=ModelsAndAliases)
async def models(request: Request) -> ModelsAndAliases:
    """The models this request's API key may use, each with what it takes in (text, image, audio), then the
    aliases it may use, each with its candidates."""
    listed = list_models(request.app.state.registry, request.app.state.started)
    return ModelsAndAliases(data=[*listed.data, *_alias_cards(request)])


@router.get("/models/{model:path}", response_model=ModelCard | AliasCard)
async def model(request: Request, model: str) -> ModelCard | AliasCard:
    """One model by served name or repo id, or an alias (`openai` client: `models.retrieve`)."""
    alias = next((a for a in _alias_cards(request) if a.id == model), None)
    if alias is not None:
        return alias
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
