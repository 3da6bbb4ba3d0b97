"""OpenAI routes: thin; the logic is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.errors import Family, family_dependency
from server.openai.protocol import ModelList
from server.openai.serving import list_models, proxy_openai
from server.ops.auth import require_api_key

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(family_dependency(Family.OPENAI)), Depends(require_api_key)],
)


@router.get("/models")
async def models(request: Request) -> ModelList:
    return list_models(request.app.state.registry, request.app.state.started)


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await proxy_openai(request, request.app.state.registry, "/v1/chat/completions", _log_prompts(request))


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await proxy_openai(request, request.app.state.registry, "/v1/completions", _log_prompts(request))


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    return await proxy_openai(request, request.app.state.registry, "/v1/embeddings", _log_prompts(request))


def _log_prompts(request: Request) -> bool:
    return bool(request.app.state.settings.log_prompts)
