"""Anthropic Messages routes: thin; the logic is in serving.py. ``ANTHROPIC_BASE_URL=<server>`` reaches them,
and so does ``<server>/models/{repo_id}`` (the path names the model)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.anthropic.serving import proxy_messages
from server.errors import Family, family_dependency, model_path
from server.ops.auth import require_api_key

DEPENDENCIES = [Depends(family_dependency(Family.ANTHROPIC)), Depends(require_api_key)]
router = APIRouter(prefix="/v1", tags=["anthropic"], dependencies=DEPENDENCIES)
model_router = APIRouter(prefix="/models/{repo_id:path}/v1", tags=["anthropic"],
                         dependencies=[*DEPENDENCIES, Depends(model_path)])


async def messages(request: Request) -> Response:
    """Messages (system, tools, tool_use/tool_result, image blocks, streaming); `x-api-key` or a bearer key."""
    return await proxy_messages(request, request.app.state.registry, "/v1/messages")


async def count_tokens(request: Request) -> Response:
    return await proxy_messages(request, request.app.state.registry, "/v1/messages/count_tokens")


for _router in (router, model_router):
    _router.add_api_route("/messages", messages, methods=["POST"])
    _router.add_api_route("/messages/count_tokens", count_tokens, methods=["POST"])
