"""/admin/* (ops): reload the manifest now. Off (404) unless HUBSERVE_ADMIN_TOKEN is set; that token is a
bearer of its own, separate from the API keys, compared in constant time."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.errors import Family, NotFound, Unauthorized, family_dependency
from server.ops.auth import admin_token_matches
from server.ops.routes import models_status

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(family_dependency(Family.OPS))])


def require_admin_token(request: Request) -> None:
    if not request.app.state.settings.admin_token:
        raise NotFound("Not Found")
    if not admin_token_matches(request):
        raise Unauthorized("Missing or invalid admin token; send 'Authorization: Bearer <HUBSERVE_ADMIN_TOKEN>'.")


@router.post("/reload", dependencies=[Depends(require_admin_token)])
async def reload(request: Request) -> JSONResponse:
    """Re-read models.toml, models.lock and the store now and apply them (swaps run before this answers);
    revisions that failed to start are tried again."""
    watcher = request.app.state.watcher
    if watcher is None:
        raise NotFound("This server does not follow its manifest (HUBSERVE_WATCH=false).")
    outcome: dict[str, Any] = await watcher.reload(retry_failed=True)
    outcome["models"] = models_status(request.app.state.registry)
    return JSONResponse(outcome, status_code=200 if outcome["applied"] else 422)
