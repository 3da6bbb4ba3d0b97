"""API keys: who a request is (401 when nobody, or expired), what it may do (scopes: 403), which models (404 as
if unknown), how much (429: rpm/tpm, daily/monthly budgets, requests in flight; 400: input tokens).

Two kinds of keys are accepted, each checked in constant time:
- flat keys from HUBSERVE_API_KEYS / HUBSERVE_API_KEYS_FILE (sha256 digests): every model, no limits, the
  inference and batch scopes; their log name is ``key-`` + 8 hex of the digest;
- named keys from the keys file (``hubserve keys add``): per-key models, limits, expiry and scopes.

A key comes as ``Authorization: Bearer <key>`` or ``x-api-key: <key>``. In-process callers (the batch runner)
instead put the Principal at ``scope["hubserve.principal"]``; an ASGI server never sets that key. Model access
is enforced in one place, ``authorize``, which the registry calls whenever a request resolves a model name.
Limits are counted in the shared state (app.state.state), so gateways on one store enforce one budget;
what admission took is settled by the gateway middleware when the request ends (``KeyChecker.settle``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from fastapi import Request

from server.engines.base import ModelInfo
from server.errors import Forbidden, KeyExpired, ModelNotFound, ScopeNotAllowed, Unauthorized
from server.ops import context
from server.ops.budgets import Budgets, Reserved, Slots
from server.ops.context import ANONYMOUS, Principal, RequestContext
from server.ops.input_cap import check_input_tokens
from server.ops.keys import SCOPES, KeyRecord, KeyRing
from server.ops.ratelimit import DEFAULT_RESERVE, RateLimiter, Taken
from server.ops.usage import UsageRecorder
from server.state.base import CounterOp, StateStore

log = logging.getLogger("hubserve.auth")
PRINCIPAL_SCOPE_KEY = "hubserve.principal"


def presented_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.headers.get("x-api-key", "").strip() or None


def principal_of(record: KeyRecord) -> Principal:
    models = frozenset(record.models) if record.models is not None else None
    return Principal(record.name, models, record.rpm, record.tpm, record.daily_tokens, record.monthly_tokens,
                     record.max_concurrent, record.max_input_tokens, frozenset(record.scopes))


class Admitted:
    """What admission took for one request (on its RequestContext), given back or charged at its end."""

    def __init__(self, who: Principal) -> None:
        self.who = who
        self.rate: Taken | None = None
        self.budgets: list[Reserved] = []
        self.slot = False
        self.day: str | None = None  # the usage day its request was counted on


class KeyChecker:
    """Accepts every request when no key is configured; else only a flat or named key, as a Principal.
    Holds the limiters (their counts live in the shared state, passed in)."""

    def __init__(self, digests: frozenset[str], ring: KeyRing | None = None, reserve: int | None = None,
                 lease_s: float = 15.0) -> None:
        self._digests = tuple(sorted(digests))
        self.ring = ring
        self.limiter = RateLimiter(reserve=reserve or DEFAULT_RESERVE)
        self.budgets = Budgets(reserve=reserve or DEFAULT_RESERVE)
        self.slots = Slots(lease_s)
        self.usage = UsageRecorder()
        self._giving_back: set[asyncio.Task[None]] = set()  # give-backs of admissions cancelled mid-count

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
        """Who ``key`` is; Unauthorized when auth is on and the key is missing, unknown or expired."""
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
        if record.expired():
            raise KeyExpired(record.name, str(record.expires))
        return principal_of(record)

    def still_accepted(self, who: Principal) -> Principal:
        """An in-process caller's principal (a batch line's submitter), checked against the keys file as it is
        now: a named key revoked or expired since is refused at once, like its bearer would be."""
        if not self.enabled or who is ANONYMOUS or who.name.startswith("key-") or self.ring is None:
            return who  # auth off, or a flat key (its list changes only with a restart)
        self.ring.refresh()
        record = next((r for r in self.ring.records.values() if r.name == who.name), None)
        if record is None:
            raise Unauthorized(f"Key `{who.name}` was revoked.")
        if record.expired():
            raise KeyExpired(who.name, str(record.expires))
        return who

    def check(self, request: Request) -> Principal:
        given = request.scope.get(PRINCIPAL_SCOPE_KEY)
        who = self.still_accepted(given) if isinstance(given, Principal) else self.principal(presented_key(request))
        ctx = context.current()
        if ctx is not None:
            ctx.principal = who
        return who

    def has_scope_key(self, scope: str) -> bool:
        """Whether some unexpired named key has ``scope`` (the admin routes exist only then, or with the token)."""
        return self.ring is not None and self.ring.any_with_scope(scope)

    async def admit(self, request: Request, store: StateStore, who: Principal) -> None:
        """Count the request against its key's limits: every counter (requests/tokens per minute, budgets,
        requests in flight, the day's usage) in ONE ``counters`` call, then decide in order: rates, budgets,
        input tokens, requests in flight. A refusal gives everything back in one more call. (The request holds
        its slot while its input tokens are counted: the safe side.)"""
        ctx = context.current()
        if ctx is None or who is ANONYMOUS or ctx.admission is not None:
            return  # no context: nothing could settle it; ANONYMOUS: auth is off; admitted already
        taken = ctx.admission = Admitted(who)
        rate, rate_ops = self.limiter.plan(who)
        budgets, budget_ops = self.budgets.plan(who)
        slot_ops = self.slots.plan(store, who)
        day, usage_ops = self.usage.plan(who.name)
        taken.rate, taken.budgets, taken.slot, taken.day = rate, budgets, bool(slot_ops), day
        counting = asyncio.ensure_future(store.counters([*rate_ops, *budget_ops, *slot_ops, *usage_ops]))
        try:
            values = await asyncio.shield(counting)  # a cancelled request's counts land anyway: see below
        except BaseException:  # the counts failed, or the request was cancelled (client gone, time limit)
            ctx.admission = None
            counting.add_done_callback(lambda done: self._give_back_late(store, taken, done))  # once they land
            raise
        self.usage.indexed(who.name, day)
        at_budgets, at_slots = len(rate_ops), len(rate_ops) + len(budget_ops)
        try:
            refusal = (self.limiter.refusal(who, rate, values[:at_budgets]) if rate is not None else None) or \
                self.budgets.refusal(who, budgets, values[at_budgets:at_slots])
            if refusal is not None:
                raise refusal
            await check_input_tokens(request, who)
            if slot_ops and (refusal := self.slots.refusal(who, values[at_slots:at_slots + len(slot_ops)])):
                raise refusal
        except BaseException:
            ctx.admission = None
            await asyncio.shield(self._finish(store, taken, self._undo_ops(taken), "giving back its refused request"))
            raise

    def _give_back_late(self, store: StateStore, taken: Admitted, counting: asyncio.Future[list[object]]) -> None:
        """The counts of an admission that failed or was cancelled while they ran are done: undo what landed, in
        the background, so that a request that never ran holds no budget, slot or usage."""
        if counting.cancelled() or counting.exception() is not None:
            if taken.slot:
                taken.slot = False
                self.slots.forget(taken.who.name)
            return
        task = asyncio.ensure_future(self._finish(store, taken, self._undo_ops(taken), "giving back its cancelled "
                                                  "request"))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def settle(self, store: StateStore, ctx: RequestContext) -> None:
        """At the request's end, however it ended (the middleware awaits it after the last byte), in one call:
        reservations become the tokens used, the slot is freed, the day's usage gets the tokens."""
        taken = ctx.admission
        if not isinstance(taken, Admitted):
            return
        ctx.admission = None
        who, tokens_in, tokens_out = taken.who, ctx.tokens_in or 0, ctx.tokens_out or 0
        ops: list[CounterOp] = []
        if taken.rate is not None:
            ops += self.limiter.settle_ops(who, taken.rate, tokens_in + tokens_out)
        ops += self.budgets.settle_ops(taken.budgets, tokens_in + tokens_out)
        if taken.slot:
            ops += self.slots.release_ops(who.name)
        if taken.day is not None:
            ops += self.usage.tokens_ops(who.name, taken.day, tokens_in, tokens_out)
        await self._finish(store, taken, ops, "settling its request")

    def _undo_ops(self, taken: Admitted) -> list[CounterOp]:
        who = taken.who
        ops = self.limiter.undo_ops(who, taken.rate) if taken.rate is not None else []
        ops += self.budgets.settle_ops(taken.budgets, 0)
        if taken.slot:
            ops += self.slots.release_ops(who.name)
        if taken.day is not None:
            ops += self.usage.undo_ops(who.name, taken.day)
        return ops

    async def _finish(self, store: StateStore, taken: Admitted, ops: list[CounterOp], what: str) -> None:
        """Run the ops that settle or give back ``taken``; this gateway's slot is freed even when they fail."""
        try:
            await store.counters(ops)
        except Exception as e:  # StateUnavailable, a closed store: logged (the caller's own outcome stands)
            log.warning("key %s: %s failed: %s", taken.who.name, what, e)
        finally:
            if taken.slot:
                taken.slot = False
                self.slots.forget(taken.who.name)


def require_key(scope: str) -> Callable[[Request], Awaitable[None]]:
    """A router dependency: a valid key with ``scope`` (403 ScopeNotAllowed otherwise); for ``inference``, also
    admission against the key's limits. List it after the family dependency. Async: no worker thread."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")

    async def dependency(request: Request) -> None:
        checker: KeyChecker = request.app.state.key_checker
        who = checker.check(request)
        if checker.enabled and scope not in who.scopes:
            raise ScopeNotAllowed(who.name, scope)
        if scope == "inference":
            await checker.admit(request, request.app.state.state, who)

    dependency.__name__ = f"require_{scope}_key"
    return dependency


require_api_key = require_key("inference")  # every inference, info and models route


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
