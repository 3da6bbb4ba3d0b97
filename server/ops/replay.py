"""Idempotency-Key replays and the response cache, as one pure ASGI middleware inside GatewayMiddleware.

Nothing is answered from the shared state before the request's key was checked and its model resolved: the
registry calls ``model_resolved(engine)`` once ``authorize()`` let this key use the model and before the request
takes a slot (server/registry.py ``admit``). There the stored answer is looked up (idempotency first, then the
cache); when one exists the hook raises ``_Answered``, which unwinds the route to this middleware, and the
middleware sends the stored bytes (a stream as a stream, one send per SSE event). Otherwise the request runs and
its answer passes through unbuffered while it is recorded (bounded; over the bound nothing is stored), and is
stored before its last byte is sent, so a client that got an answer can always have it replayed.

Idempotency: ``StateStore.add`` takes an in-progress marker holding the body's fingerprint (a duplicate with
another body gets 422 at once; one with the same body polls until the answer is stored, within its own time
limit, or runs itself if the first failed without storing). Stored: 2xx and deterministic 4xx answers, never
5xx, 408, 409, 425 or 429 (they may succeed on a retry), nor a stream that ended in an error event.
Cache: only 200 answers, keyed on the commit that answers (server/ops/cache.py), so a swap never serves an old
revision's answer. Both live in the StateStore, so every gateway sharing it replays and hits alike.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engines.adapter import AdapterEngine
from server.engines.base import Engine
from server.errors import IdempotencyKeyReused, InvalidIdempotencyKey, error_response, family_of_path
from server.ops.auth import presented_key
from server.ops.cache import cache_key, cacheable
from server.ops.context import RequestContext
from server.ops.idempotency import BIG_BODY, check_key, digest_body, fingerprint, identity, record_key
from server.settings import Settings
from server.state import StateStore, StateUnavailable

if TYPE_CHECKING:
    from server.ops.metrics import Metrics

log = logging.getLogger("hubserve.replay")

UNSTORED_HEADERS = frozenset({b"x-request-id", b"x-hubserve-model", b"x-hubserve-commit", b"x-hubserve-cache",
                              b"idempotent-replayed", b"date", b"server", b"connection", b"transfer-encoding"})
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})  # and every 5xx: a retry may succeed, so it runs again
REPLAYED = (b"idempotent-replayed", b"true")
CACHE_HIT = (b"x-hubserve-cache", b"hit")
CACHE_MISS = (b"x-hubserve-cache", b"miss")
PENDING_GRACE_S = 5.0  # an in-progress marker outlives its request's time limit by this much (then a crash frees it)


@dataclasses.dataclass
class Answer:
    """A recorded answer: what the client got, and the model revision that gave it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    model: str | None = None
    commit: str | None = None

    @property
    def stream(self) -> bool:
        return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in self.headers)

    def encode(self, **meta: Any) -> bytes:
        head = {"status": self.status, "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
                "model": self.model, "commit": self.commit, **meta}
        return json.dumps(head).encode() + b"\n" + self.body


def decode_record(raw: bytes) -> tuple[dict[str, Any], Answer | None]:
    """(meta, answer) of a stored record; answer None for an in-progress marker or a record that does not parse."""
    head, _, body = raw.partition(b"\n")
    try:
        meta = json.loads(head)
        if not meta.get("done", True) or not isinstance(meta.get("status"), int):
            return meta, None
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["headers"]]
        return meta, Answer(meta["status"], headers, body, meta.get("model"), meta.get("commit"))
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}, None


def sse_events(body: bytes) -> list[bytes]:
    """``body`` cut after each event's blank line (the pieces join back to the same bytes)."""
    parts = body.split(b"\n\n")
    events = [p + b"\n\n" for p in parts[:-1]]
    return [*events, parts[-1]] if parts[-1] else events


def ends_in_error(body: bytes) -> bool:
    """Whether a stream's last event is an error event (OpenAI/TGI ``{"error": ...}``, Anthropic ``event: error``):
    the engine failed mid-stream, so the answer must not be replayed."""
    for event in reversed(sse_events(body)):
        lines = event.strip().split(b"\n")
        if any(ln.startswith(b"event:") and ln[6:].strip() == b"error" for ln in lines):
            return True
        data = b"".join(ln[5:].strip() for ln in lines if ln.startswith(b"data:"))
        if not data or data == b"[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        return isinstance(obj, dict) and (bool(obj.get("error")) or obj.get("type") == "error")
    return False


class _Answered(Exception):  # control flow, not an error: a stored answer replaces the route's
    """Raised by the hook when a stored answer exists; not a ServerError, so no handler turns it into an error."""

    def __init__(self, answer: Answer, header: tuple[bytes, bytes]) -> None:
        super().__init__("stored answer")
        self.answer = answer
        self.header = header


_current: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar("hubserve_replay", default=None)


async def model_resolved(engine: Engine) -> None:
    """The registry's hook: the current request's key may use ``engine``'s model (authorize() passed) and the
    request has not taken a slot yet. Raises ``_Answered`` when a stored answer is to be sent instead, or
    IdempotencyKeyReused (422). Runs once per request (a second lookup, e.g. an adapter, changes nothing)."""
    ex = _current.get()
    if ex is not None and not ex.resolved:
        ex.resolved = True
        await ex.resolve(engine)


class ReplayMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            key = check_key(headers.get("idempotency-key"))
        except InvalidIdempotencyKey as e:
            await error_response(e, family_of_path(scope.get("path", "/")))(scope, receive, send)
            return
        ctx = scope.get("state", {}).get("request_context")
        store = getattr(getattr(scope.get("app"), "state", None), "state", None)
        if not isinstance(ctx, RequestContext) or not isinstance(store, StateStore):
            await self.app(scope, receive, send)
            return
        ex = _Exchange(scope, headers, key, ctx, store, self.settings, self.metrics)
        token = _current.set(ex)
        try:
            await self.app(scope, ex.tap_receive(receive), ex.tap_send(send))
        except _Answered as answered:
            if ex.started:  # cannot happen (the hook runs before the route answers); never send two answers
                raise RuntimeError("a stored answer came after the answer started") from None
            await ex.send_stored(send, answered)
        finally:
            _current.reset(token)
            with anyio.CancelScope(shield=True):  # also when cancelled (timeout, client gone): free the marker
                await ex.release()


class _Exchange:
    """One POST request: its body (as the route reads it), what the hook decided, and its recorded answer."""

    def __init__(self, scope: Scope, headers: Headers, key: str | None, ctx: RequestContext, store: StateStore,
                 settings: Settings, metrics: Metrics) -> None:
        self.scope, self.headers, self.key, self.ctx, self.store = scope, headers, key, ctx, store
        self.settings, self.metrics = settings, metrics
        self.body = bytearray()
        self.body_done = False
        self.resolved = False
        self.idem: str | None = None  # the record whose in-progress marker this request holds
        self.fp = ""
        self.stored = False
        self.cache: tuple[str, float, str] | None = None  # (cache key, ttl, commit) of a cacheable miss
        self.started = False
        self.status = 0
        self.answer_headers: list[tuple[bytes, bytes]] = []
        self.recorded: bytearray | None = None  # None: not recording (nothing to store, or over the bound)

    # ---- the hook -----------------------------------------------------------------------------------
    async def resolve(self, engine: Engine) -> None:
        if not self.body_done:  # the route looked the model up before reading its body: nothing to key on
            return
        body, content_type = bytes(self.body), self.headers.get("content-type", "")
        if len(body) > BIG_BODY:  # parsing and hashing megabytes: off the event loop
            digest, payload = await anyio.to_thread.run_sync(digest_body, body, content_type)
        else:
            digest, payload = digest_body(body, content_type)
        info = engine.info
        if self.key is not None:
            await self._claim(fingerprint(info.name, digest))
        route = getattr(self.scope.get("route"), "path_format", "")
        if info.cache and cacheable(route, info.task, payload):
            await self._lookup_cache(engine, digest)
        if self.idem is not None or self.cache is not None:
            self.recorded = bytearray()

    async def _claim(self, fp: str) -> None:
        """Hold the key's in-progress marker, or replay its answer, or wait for the request that holds it."""
        ctx = self.ctx
        who = ctx.principal
        rkey = record_key(identity(who.name if who else "-", presented_key(Request(self.scope))), self.scope["path"],
                          str(self.key))
        pending = json.dumps({"fp": fp, "done": False}).encode() + b"\n"
        while True:
            left = ctx.started_at + ctx.timeout_s - anyio.current_time() if ctx.timeout_s else 0.0
            if await self.store.add(rkey, pending, max(1.0, left) + PENDING_GRACE_S):
                self.idem, self.fp = rkey, fp
                return
            raw = await self.store.get(rkey)
            if raw is None:  # finished without an answer (or expired) meanwhile: take it
                continue
            meta, answer = decode_record(raw)
            if meta.get("fp") != fp:
                raise IdempotencyKeyReused()
            if answer is not None:
                ctx.cache = "replay"
                raise _Answered(answer, REPLAYED)
            await anyio.sleep(self.settings.idempotency_poll_s)  # bounded by the request's own time limit

    async def _lookup_cache(self, engine: Engine, digest: str) -> None:
        info = engine.info
        base = engine.base.info.commit if isinstance(engine, AdapterEngine) else None
        query = self.scope.get("query_string", b"").decode("latin-1")
        route = self.scope["path"] + (f"?{query}" if query else "")
        key = cache_key(info.name, info.commit, base, route, self.headers.get("accept", ""), digest,
                        self.settings.max_new_tokens)
        raw = await self.store.cache_get(key)
        answer = decode_record(raw)[1] if raw is not None else None
        self.metrics.cache_requests.labels(info.name, "hit" if answer else "miss").inc()
        self.ctx.cache = "hit" if answer else "miss"
        if answer is None:
            self.cache = (key, info.cache_ttl_s, info.commit)
            return
        if self.idem is not None:  # the key's answer is this one: keep it for the key's replays too
            await self._keep_idempotent(answer)
        raise _Answered(answer, CACHE_HIT)

    # ---- the live answer ----------------------------------------------------------------------------
    def tap_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not self.body_done:
                self.body += message.get("body", b"")
                self.body_done = not message.get("more_body", False)
            return message

        return wrapped

    def tap_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.started = True
                self.status = message["status"]
                headers = list(message.get("headers", []))
                self.answer_headers = [(k, v) for k, v in headers if k.lower() not in UNSTORED_HEADERS]
                if self.cache is not None:
                    message = {**message, "headers": [*headers, CACHE_MISS]}
            elif message["type"] == "http.response.body" and self.recorded is not None:
                self.recorded += message.get("body", b"")
                if len(self.recorded) > self._bound():
                    self.recorded = None  # over every bound: nothing is stored (a retry runs again)
                elif not message.get("more_body", False):
                    await self._keep()
            await send(message)

        return wrapped

    def _bound(self) -> int:
        return max(self.settings.idempotency_max_bytes if self.idem else 0,
                   self.settings.cache_max_entry_bytes if self.cache else 0)

    async def _keep(self) -> None:
        """Store the finished answer (before its last byte goes out): for the key's replays, in the cache."""
        assert self.recorded is not None
        answer = Answer(self.status, self.answer_headers, bytes(self.recorded), self.ctx.model, self.ctx.commit)
        if answer.stream and ends_in_error(answer.body):
            return
        size = len(answer.body)
        try:
            if self.idem is not None and self.status < 500 and self.status not in RETRYABLE_STATUSES \
                    and size <= self.settings.idempotency_max_bytes:
                await self._keep_idempotent(answer)
            if self.cache is not None and self.status == 200 and size <= self.settings.cache_max_entry_bytes:
                key, ttl, commit = self.cache
                if self.ctx.commit == commit:  # not when a swap moved the request to another commit meanwhile
                    await self.store.cache_put(key, answer.encode(), ttl, self.settings.cache_max_bytes)
        except StateUnavailable as e:  # the answer still goes out; it is just not kept
            log.warning("request %s: its answer was not stored: %s", self.ctx.request_id, e)

    async def _keep_idempotent(self, answer: Answer) -> None:
        assert self.idem is not None
        await self.store.set(self.idem, answer.encode(fp=self.fp, done=True), self.settings.idempotency_ttl_s)
        self.stored = True

    async def send_stored(self, send: Send, answered: _Answered) -> None:
        """Send a stored answer (the gateway adds the request id and the model and commit that gave it)."""
        answer = answered.answer
        self.ctx.model, self.ctx.commit = answer.model, answer.commit
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [*answer.headers, answered.header]})
        if answer.stream:
            for event in sse_events(answer.body):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    async def release(self) -> None:
        """A request that held a marker and stored no answer frees it: a duplicate waiting on it runs itself."""
        if self.idem is not None and not self.stored:
            try:
                await self.store.delete(self.idem)
            except StateUnavailable as e:
                log.warning("request %s: its Idempotency-Key marker stays until it expires: %s", self.ctx.request_id, e)
