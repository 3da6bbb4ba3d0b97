"""TGI routes: thin; the logic is in serving.py. They serve the default model (``/models/{repo}`` selects)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.errors import Family, InvalidRequest, family_dependency
from server.ops.auth import require_api_key
from server.tgi.protocol import Info, parse_generate, parse_tokenize
from server.tgi.serving import TGIService, dump_generate

router = APIRouter(
    tags=["tgi"],
    dependencies=[Depends(family_dependency(Family.TGI)), Depends(require_api_key)],
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def tgi_service(request: Request) -> TGIService:
    """The app's TGIService, made on first use (it only caches token tables)."""
    service = getattr(request.app.state, "tgi", None)
    if service is None:
        service = request.app.state.tgi = TGIService(request.app.version)
    return service


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.") from e


def sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/generate")
async def generate(request: Request) -> JSONResponse:
    body = parse_generate(await read_json(request))
    engine = request.app.state.registry.default()
    request.state.model = engine.info.name
    return JSONResponse(dump_generate(await tgi_service(request).generate(engine, body)))


@router.post("/generate_stream")
async def generate_stream(request: Request) -> StreamingResponse:
    body = parse_generate(await read_json(request))
    engine = request.app.state.registry.default()
    request.state.model = engine.info.name
    return sse(await tgi_service(request).open_stream(engine, body))


@router.get("/info")
async def info(request: Request) -> Info:
    return tgi_service(request).info(request.app.state.registry.default())


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    body = parse_tokenize(await read_json(request))
    engine = request.app.state.registry.default()
    tokens = await tgi_service(request).tokenize(engine, body)
    return JSONResponse([t.model_dump() for t in tokens])
