"""OpenAI routes: thin; the logic is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.errors import Family, family_dependency
from server.openai.protocol import ModelCard, ModelList
from server.openai.serving import RERANK_TASKS, list_models, model_card, proxy_openai
from server.ops.auth import require_api_key

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(family_dependency(Family.OPENAI)), Depends(require_api_key)],
)


@router.get("/models")
async def models(request: Request) -> ModelList:
    """The models this request's API key may use."""
    return list_models(request.app.state.registry, request.app.state.started)


@router.get("/models/{model:path}")
async def model(request: Request, model: str) -> ModelCard:
    """One model by served name or repo id (`openai` client: `models.retrieve`)."""
    return model_card(request.app.state.registry.get(model), request.app.state.started)


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await proxy_openai(request, request.app.state.registry, "/v1/chat/completions")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await proxy_openai(request, request.app.state.registry, "/v1/completions")


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    return await proxy_openai(request, request.app.state.registry, "/v1/embeddings")


@router.post("/rerank")
async def rerank_v1(request: Request) -> Response:
    """Cross-encoders (text-ranking models), in the Cohere/Jina shape vLLM serves; either backend."""
    return await proxy_openai(request, request.app.state.registry, "/rerank", tasks=RERANK_TASKS)


# The same route without the /v1 prefix (TEI, Jina and vLLM clients post to /rerank).
rerank_router = APIRouter(
    tags=["openai"],
    dependencies=[Depends(family_dependency(Family.OPENAI)), Depends(require_api_key)],
)


@rerank_router.post("/rerank")
async def rerank(request: Request) -> Response:
    return await proxy_openai(request, request.app.state.registry, "/rerank", tasks=RERANK_TASKS)

