"""/health and /ready (always open), /metrics and the API docs (closed once keys exist, unless HUBSERVE_PUBLIC_*)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import Family, family_dependency
from server.ops.auth import require_docs_access, require_metrics_access
from server.ops.metrics import Metrics
from server.registry import Registry
from server.state import StateStore, StateUnavailable

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


@dataclass
class StateHealth:
    """The state backend's last ping, for /health: pinged at most every ``every_s`` (probes and crowds of
    health checks do not each reach Redis), and for at most ``timeout_s`` (a hung Redis does not hold /health)."""

    every_s: float = 5.0
    timeout_s: float = 1.0
    checked: float = float("-inf")
    ok: bool = False
    _lock: asyncio.Lock | None = None

    async def check(self, store: StateStore) -> dict[str, Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one ping at a time; the others take its answer
            if time.monotonic() - self.checked >= self.every_s:
                try:
                    await asyncio.wait_for(store.ping(), self.timeout_s)
                    self.ok = True
                except (StateUnavailable, TimeoutError):
                    self.ok = False
                self.checked = time.monotonic()
        backend = "sqlite" if store.url.startswith("sqlite") else "redis"
        return {"backend": backend, "url": store.url, "ok": self.ok}  # store.url never carries a password


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the gateway is alive; the state of every model and of the state backend in the body."""
    registry: Registry | None = request.app.state.registry
    ready = registry is not None and registry.ready
    if getattr(request.app.state, "state_health", None) is None:
        request.app.state.state_health = StateHealth()
    state = await request.app.state.state_health.check(request.app.state.state)
    status = "ok" if ready and state["ok"] else "degraded"
    return JSONResponse({"status": status, "ready": ready, "models": models_status(registry), "state": state})


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
