"""/health and /ready (always open), /metrics and the API docs (closed once keys exist, unless HUBSERVE_PUBLIC_*)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import Family, family_dependency
from server.ops.auth import require_docs_access, require_metrics_access
from server.ops.metrics import Metrics
from server.registry import Registry

router = APIRouter(tags=["ops"], dependencies=[Depends(family_dependency(Family.OPS))])


def models_status(registry: Registry | None) -> dict[str, Any]:
    """Each served model's state (and last rollout), then each manifest model still waiting for its revision."""
    if registry is None:
        return {}
    out: dict[str, Any] = {name: served.describe() for name, served in registry.served.items()}
    for name, reason in registry.waiting.items():
        out.setdefault(name, {"state": "waiting"})["waiting"] = reason
    for name, reason in registry.pending.items():
        if name in out:
            out[name]["pending"] = reason
    return out


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the gateway is alive; the state of every model in the body."""
    registry: Registry | None = request.app.state.registry
    ready = registry is not None and registry.ready
    return JSONResponse({"status": "ok" if ready else "degraded", "ready": ready, "models": models_status(registry)})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once every model is ready, else 503 (for load balancers and orchestrators)."""
    registry: Registry | None = request.app.state.registry
    is_ready = registry is not None and registry.ready
    states = {name: m["state"] for name, m in models_status(registry).items()}
    body = {"status": "ready" if is_ready else "not ready", "models": states}
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/metrics", dependencies=[Depends(require_metrics_access)])
async def metrics(request: Request) -> Response:
    m: Metrics = request.app.state.metrics
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


# FastAPI's own /docs, /redoc and /openapi.json are off (create_app): these are the same pages behind a key check.
docs_router = APIRouter(
    tags=["ops"], include_in_schema=False,
    dependencies=[Depends(family_dependency(Family.OPS)), Depends(require_docs_access)],
)


@docs_router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@docs_router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - Swagger UI")


@docs_router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")
