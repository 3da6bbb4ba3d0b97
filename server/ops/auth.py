"""API keys: who a request is (401 when nobody), which models it may use (403), how fast (429).

Two kinds of keys are accepted, each checked in constant time:
- flat keys from HUBSERVE_API_KEYS / HUBSERVE_API_KEYS_FILE (sha256 digests): every model, no rate limit;
  their log name is ``key-`` + 8 hex of the digest;
- named keys from the keys file (``hubserve keys add``): per-key models, requests/min and tokens/min.

A key comes as ``Authorization: Bearer <key>`` or ``x-api-key: <key>``. Model access is enforced in one place,
``authorize``, which the registry calls whenever a request resolves a model name to an engine.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.engines.base import ModelInfo
from server.errors import Forbidden, ModelNotFound, Unauthorized
from server.ops import context
from server.ops.context import ANONYMOUS, Principal
from server.ops.keys import KeyRing
from server.ops.ratelimit import DEFAULT_RESERVE, RateLimiter


def presented_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.headers.get("x-api-key", "").strip() or None


class KeyChecker:
    """Accepts every request when no key is configured; else only a flat or named key, as a Principal."""

    def __init__(self, digests: frozenset[str], ring: KeyRing | None = None, reserve: int | None = None) -> None:
        self._digests = tuple(sorted(digests))
        self.ring = ring
        self.limiter = RateLimiter(reserve=reserve or DEFAULT_RESERVE)

    @property
    def enabled(self) -> bool:
        return bool(self._digests) or (self.ring is not None and self.ring.seen)

    def _flat(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode()).hexdigest()
        match = None
        for known in self._digests:  # no early exit: every digest is compared
            if hmac.compare_digest(digest, known):
                match = known
        return match

    def principal(self, key: str | None) -> Principal:
        """Who ``key`` is; Unauthorized when auth is on and the key is missing or unknown."""
        if self.ring is not None:
            self.ring.refresh()
        if not self.enabled:
            return ANONYMOUS
        if key is None:
            raise Unauthorized()
        digest = self._flat(key)
        if digest is not None:
            return Principal(f"key-{digest[:8]}")
        record = self.ring.lookup(key) if self.ring is not None else None
        if record is None:
            raise Unauthorized()
        models = frozenset(record.models) if record.models is not None else None
        return Principal(record.name, models, record.rpm, record.tpm)

    def check(self, request: Request) -> Principal:
        who = request.scope.get("hubserve.principal")  # set only by in-process callers (a batch line's submitter)
        if not isinstance(who, Principal):
            who = self.principal(presented_key(request))
        ctx = context.current()
        if ctx is not None:
            ctx.principal = who
        return who


async def require_api_key(request: Request) -> None:
    """Router dependency for every inference, info, models and admin route; list it after the family one.
    Async: no worker thread for a few microseconds of work."""
    checker: KeyChecker = request.app.state.key_checker
    who = checker.check(request)
    checker.limiter.admit(who, context.current())


def admin_token_matches(request: Request) -> bool:
    """Whether the request carries HUBSERVE_ADMIN_TOKEN as its bearer (constant time); False when none is set."""
    token: str | None = request.app.state.settings.admin_token
    if not token:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def require_docs_access(request: Request) -> None:
    """/docs, /redoc, /openapi.json: any valid key once keys exist, unless HUBSERVE_PUBLIC_DOCS."""
    if not request.app.state.settings.public_docs:
        request.app.state.key_checker.check(request)


async def require_metrics_access(request: Request) -> None:
    """/metrics names every model and key: once keys exist, a key allowed every model or the admin token,
    unless HUBSERVE_PUBLIC_METRICS. A key restricted to some models gets 403 (it would learn the others)."""
    if request.app.state.settings.public_metrics or admin_token_matches(request):
        return
    who = request.app.state.key_checker.check(request)
    if who.models is not None:
        raise Forbidden(
            "/metrics names every model and key: it needs a key allowed every model or the admin token "
            "(or HUBSERVE_PUBLIC_METRICS=true)."
        )


def authorize(info: ModelInfo) -> None:
    """Called by the registry for every name → engine lookup made while serving a request: when the request's
    key may not use that model, the same 404 as for a model that does not exist (a key must not learn the names
    of models it may not use). Also labels the request with its model and commit."""
    ctx = context.current()
    if ctx is None:
        return
    who = ctx.principal
    if who is not None and not who.may_use(info.served_names):
        raise ModelNotFound(info.name, ())  # reads exactly like an unknown model to this key (errors.py)
    ctx.model, ctx.commit = info.name, info.commit


def may_see(info: ModelInfo) -> bool:
    """Whether the current request's key may see the model (in /v1/models)."""
    return may_use_names(info.served_names)


def may_use_names(names: tuple[str, ...]) -> bool:
    """Whether the current request's key may use (and so learn of) a model known by one of ``names``."""
    ctx = context.current()
    who = ctx.principal if ctx is not None else None
    return who is None or who.may_use(names)
