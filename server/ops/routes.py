"""/health (always open), /ready, /metrics (open unless HUBSERVE_METRICS_AUTH=true)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import Family, family_dependency
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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    if request.app.state.settings.metrics_auth:
        request.app.state.key_checker.check(request)
    m: Metrics = request.app.state.metrics
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
