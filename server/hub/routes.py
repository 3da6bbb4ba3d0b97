"""Hub Inference API routes: thin; the logic is in serving.py.

``/models/{repo_id}`` takes a repo id or a served name. ``/`` and ``/v1`` use the default model: they are
where ``InferenceClient(base_url=<server>)`` and ``InferenceClient(base_url=<server>/v1)`` post. ``/`` keeps
TGI's error shape (it is TGI's route too); the others answer errors in the Hub's shape until the model is
known to generate text.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.engines.base import EngineState
from server.errors import Family, family_dependency
from server.hub.serving import check_task, infer
from server.ops.auth import require_api_key

router = APIRouter(
    tags=["hub"],
    dependencies=[Depends(family_dependency(Family.HUB)), Depends(require_api_key)],
)
# POST / is TGI's compat route as well as the Inference API's root: it keeps TGI's error shape.
root_router = APIRouter(
    tags=["hub"],
    dependencies=[Depends(family_dependency(Family.TGI)), Depends(require_api_key)],
)


# Registered before POST /models/{repo_id:path}, whose path would swallow these (the OpenAI, Anthropic and TGI
# families' /models/{repo_id}/... routes are included before this router for the same reason).
@router.get("/models/{repo_id:path}/health")
async def model_health(repo_id: str, request: Request) -> JSONResponse:
    engine = request.app.state.registry.get(repo_id)
    ready = engine.state is EngineState.READY
    return JSONResponse({"model": engine.info.name, "state": engine.state.value}, status_code=200 if ready else 503)


@router.post("/models/{repo_id:path}/pipeline/{task}")  # the legacy serverless URL naming the task
async def model_pipeline(repo_id: str, task: str, request: Request) -> Response:
    engine = request.app.state.registry.get(repo_id)
    check_task(engine, task)
    return await infer(request, engine)


@router.post("/models/{repo_id:path}/v1")  # InferenceClient(base_url=".../models/<repo>/v1").text_generation
async def model_inference_v1(repo_id: str, request: Request) -> Response:
    return await infer(request, request.app.state.registry.get(repo_id))


@router.post("/models/{repo_id:path}")
async def model_inference(repo_id: str, request: Request) -> Response:
    return await infer(request, request.app.state.registry.get(repo_id))


@router.post("/v1")
async def v1_inference(request: Request) -> Response:
    return await infer(request, request.app.state.registry.default())


@root_router.post("/")
async def root_inference(request: Request) -> Response:
    return await infer(request, request.app.state.registry.default())
