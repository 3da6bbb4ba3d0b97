"""/admin/* (ops): reload the manifest now. Taken by HUBSERVE_ADMIN_TOKEN (a bearer of its own, compared in
constant time) or by a named key with the ``admin`` scope; off (404) while neither exists."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.errors import Family, KeyExpired, NotFound, ScopeNotAllowed, Unauthorized, family_dependency
from server.ops import context
from server.ops.auth import KeyChecker, admin_token_matches, presented_key
from server.ops.context import ANONYMOUS
from server.ops.routes import models_status

ADMIN_HELP = ("Missing or invalid admin credentials; send 'Authorization: Bearer <HUBSERVE_ADMIN_TOKEN>' or a "
              "key with the admin scope.")
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(family_dependency(Family.OPS))])


async def require_admin_token(request: Request) -> None:
    """The admin token, or a named key with the admin scope (401 for no or a bad key, 403 for a key without it).
    Async: no worker thread."""
    checker: KeyChecker = request.app.state.key_checker
    if not request.app.state.settings.admin_token and not checker.has_scope_key("admin"):
        raise NotFound("Not Found")
    if admin_token_matches(request):
        return
    key = presented_key(request)
    try:
        who = checker.principal(key) if key is not None else ANONYMOUS
    except KeyExpired:
        raise
    except Unauthorized:
        who = ANONYMOUS
    if who is ANONYMOUS:  # no key, an unknown one, or auth is off for API keys: only the token would do
        raise Unauthorized(ADMIN_HELP)
    if "admin" not in who.scopes:
        raise ScopeNotAllowed(who.name, "admin")
    ctx = context.current()
    if ctx is not None:
        ctx.principal = who  # the request log names the key


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
