"""TGI routes: thin; the logic is in serving.py. They serve the default model (``/models/{repo}`` selects)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.errors import Family, family_dependency
from server.ops.auth import require_api_key
from server.tgi.protocol import Info, parse_generate, parse_tokenize
from server.tgi.serving import dump_generate, read_json, tgi_service

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


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    body = parse_tokenize(await read_json(request))
    engine = request.app.state.registry.default()
    tokens = await tgi_service(request).tokenize(engine, body)
    return JSONResponse([t.model_dump() for t in tokens])
