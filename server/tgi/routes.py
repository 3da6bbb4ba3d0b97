"""TGI routes: thin; the logic is in serving.py. They serve the default model (``/models/{repo}`` selects)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from server.engines.client import read_json
from server.engines.tokenize import is_engine_tokenize, tokenize_on_engine
from server.errors import Family, family_dependency
from server.ops.auth import require_api_key
from server.tgi.protocol import Info, parse_generate, parse_tokenize
from server.tgi.serving import dump_generate, tgi_service

router = APIRouter(
    tags=["tgi"],
    dependencies=[Depends(family_dependency(Family.TGI)), Depends(require_api_key)],
)


@router.post("/generate")
async def generate(request: Request) -> JSONResponse:
    body = parse_generate(await read_json(request))
    engine = request.app.state.registry.default()
    return JSONResponse(dump_generate(await tgi_service(request).generate(engine, body)))


@router.post("/generate_stream")
async def generate_stream(request: Request) -> StreamingResponse:
    body = parse_generate(await read_json(request))
    engine = request.app.state.registry.default()
    return await tgi_service(request).open_stream(engine, body)


@router.get("/info")
async def info(request: Request) -> Info:
    return tgi_service(request).info(request.app.state.registry.default())


@router.get("/models/{repo_id:path}/info")
async def model_info(repo_id: str, request: Request) -> Info:
    return tgi_service(request).info(request.app.state.registry.get(repo_id))


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    """TGI's ``{"inputs"}`` (the default model; ``[{id, text, start, stop}]``), or vLLM's ``{"model"?, "prompt"
    | "messages"}`` on the same path (any served model; vLLM's answer and OpenAI-shaped errors)."""
    payload = await read_json(request)
    if is_engine_tokenize(payload):
        request.state.api_family = Family.OPENAI
        return await tokenize_on_engine(request, "/tokenize", payload)
    body = parse_tokenize(payload)
    engine = request.app.state.registry.default()
    tokens = await tgi_service(request).tokenize(engine, body)
    return JSONResponse([t.model_dump() for t in tokens])
