"""The gateway's per-request envelope, as one pure ASGI middleware (streams pass through unbuffered):

- ``X-Request-Id``: a client's is validated (400 otherwise, so no header is built from unchecked input) or one
  is generated; it is returned on every answer and passed to the engine;
- the body limit (413), the per-request timeout (504, or an error event once a stream has started);
- a client that disconnects cancels its request, which closes the engine connection: vLLM aborts the
  generation (streamed or not) instead of finishing it for nobody;
- one log line and the metrics per request, with its key name, model, tokens, queue time and latency;
- ``X-Hubserve-Model`` / ``X-Hubserve-Commit`` on every answer that a model gave: the served name and the
  commit that answered (an alias's fallback, a batch line and a cached answer are told apart by them).
  The request's context is also at ``scope["state"]["request_context"]``, for in-process callers (batches).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import (
    Family,
    HeadersTooLarge,
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    ServerError,
    error_response,
    family_of_path,
    sse_error_event,
)
from server.ops import context
from server.ops.context import REQUEST_ID_RE, RequestContext
from server.ops.metrics import Metrics
from server.settings import Settings

access_log = logging.getLogger("hubserve.access")

MAX_HEADER_BYTES = 32 * 1024  # nginx's default for large headers; far above what any client sends
QUIET_PATHS = frozenset({"/metrics", "/health", "/ready"})  # probes: no log line, no request metrics
PROMPT_LOG_BYTES = 4000
SETTLE_TIMEOUT_S = 30.0  # longest a request's end may wait on the shared state
OWN_HEADERS = frozenset({b"x-request-id", b"x-hubserve-model", b"x-hubserve-commit"})  # only the gateway sets them


class _Exchange:
    """What one request's middleware observes of the answer."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.status: int | None = None
        self.complete = False
        self.stream = False
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.prompt = bytearray()
        self.output = bytearray()


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers", [])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        header_bytes = sum(len(k) + len(v) + 4 for k, v in raw_headers)
        given = headers.get("x-request-id")
        rid, engine_rid = context.new_request_id(given if given and REQUEST_ID_RE.match(given) else None)
        ctx = RequestContext(rid, engine_rid)
        ctx.scale_up_timeout_s = context.scale_up_timeout(headers.get("x-scale-up-timeout"))
        scope.setdefault("state", {})["request_id"] = rid
        scope["state"]["request_context"] = ctx
        ex = _Exchange()
        token = context.begin(ctx)
        try:
            early = self._refuse(headers, given, header_bytes)
            if early is not None:
                await self._send_error(scope, send, ex, rid, early)
            else:
                await self._run(scope, receive, send, ctx, ex)
        except Exception:
            ex.status, ex.complete = 500, True  # Starlette's outermost handler answers it
            raise
        finally:
            context.end(token)
            self._finish(scope, ctx, ex)
            await self._settle(scope, ctx)

    def _refuse(self, headers: dict[str, str], given: str | None, header_bytes: int) -> ServerError | None:
        if header_bytes > MAX_HEADER_BYTES:
            return HeadersTooLarge(f"The request headers are over the limit of {MAX_HEADER_BYTES} bytes.")
        if given is not None and not REQUEST_ID_RE.match(given):
            return InvalidRequest("X-Request-Id: use 1-128 of A-Z a-z 0-9 . _ : -", param="X-Request-Id")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return RequestTooLarge(f"The request body is over the limit of {self.settings.max_body_bytes} bytes.")
        return None

    async def _send_error(self, scope: Scope, send: Send, ex: _Exchange, rid: str, err: ServerError) -> None:
        response = error_response(err, _family(scope))
        await response(scope, _noop_receive, self._wrap_send(send, ex, rid))

    async def _run(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext, ex: _Exchange) -> None:
        disconnected = anyio.Event()

        ctx.started_at, ctx.timeout_s = anyio.current_time(), self.settings.request_timeout_s
        app_scope = anyio.CancelScope(deadline=ctx.started_at + ctx.timeout_s)
        ctx.deadline = app_scope  # the registry sets the model's limit on it (context.bound_time)
        try:
            await self._supervise(scope, receive, send, ctx, ex, app_scope, disconnected)
        except BaseExceptionGroup as group:  # the task group wraps what the app raised: re-raise it plain
            raise group.exceptions[0] if len(group.exceptions) == 1 else group from None
        if app_scope.cancelled_caught and not disconnected.is_set():
            await self._timed_out(scope, send, ex, ctx)

    async def _supervise(
        self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext, ex: _Exchange,
        app_scope: anyio.CancelScope, disconnected: anyio.Event,
    ) -> None:
        """Run the app in ``app_scope`` beside a watcher that cancels it when the client disconnects."""
        body_read = False
        received = 0
        limit = self.settings.max_body_bytes
        log_prompts = self.settings.log_prompts
        async with anyio.create_task_group() as tg:

            async def watch() -> None:  # owns `receive` once the body is read: the next message is a disconnect
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected.set()
                if not ex.complete:
                    app_scope.cancel()

            async def app_receive() -> Message:
                nonlocal body_read, received
                if body_read:
                    await disconnected.wait()
                    return {"type": "http.disconnect"}
                message = await receive()
                if message["type"] == "http.request":
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > limit:
                        raise RequestTooLarge(f"The request body is over the limit of {limit} bytes.")
                    if log_prompts and len(ex.prompt) < PROMPT_LOG_BYTES:
                        ex.prompt += chunk[: PROMPT_LOG_BYTES - len(ex.prompt)]
                    if not message.get("more_body", False):
                        body_read = True
                        tg.start_soon(watch)
                elif message["type"] == "http.disconnect":
                    disconnected.set()
                return message

            with app_scope:
                await self.app(scope, app_receive, self._wrap_send(send, ex, ctx.request_id, ctx))
            tg.cancel_scope.cancel()  # stop the watcher

    async def _timed_out(self, scope: Scope, send: Send, ex: _Exchange, ctx: RequestContext) -> None:
        rid = ctx.request_id
        limit = f"the limit of {ctx.timeout_s:g} s" + (f" of model `{ctx.model}`" if ctx.model else "")
        err = RequestTimeout(f"The request ran past {limit}.")
        if ex.status is None:
            await self._send_error(scope, send, ex, rid, err)
        elif not ex.complete:
            tail = sse_error_event(err, _family(scope)) if ex.stream else b""
            ex.status = err.status
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            ex.complete = True

    def _wrap_send(self, send: Send, ex: _Exchange, rid: str, ctx: RequestContext | None = None) -> Send:
        log_prompts = self.settings.log_prompts

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", []) if k.lower() not in OWN_HEADERS]
                ex.stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in raw)
                raw.append((b"x-request-id", rid.encode()))
                if ctx is not None and ctx.model is not None:  # names validated by models.toml; commits are hex
                    raw.append((b"x-hubserve-model", ctx.model.encode()))
                    if ctx.commit:
                        raw.append((b"x-hubserve-commit", ctx.commit.encode()))
                message = {**message, "headers": raw}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    now = time.perf_counter()
                    if ex.first is None:
                        ex.first = now - ex.started
                    elif ex.stream and ex.last is not None:
                        ex.gaps.append(now - ex.last)
                    ex.last = now
                    if log_prompts and len(ex.output) < PROMPT_LOG_BYTES:
                        ex.output += body[: PROMPT_LOG_BYTES - len(ex.output)]
                if not message.get("more_body", False):
                    ex.complete = True
            await send(message)

        return wrapped

    async def _settle(self, scope: Scope, ctx: RequestContext) -> None:
        """Give back or charge what the key's admission took (server/ops/auth.py), for every request, quiet ones
        too: a reservation or a slot never leaks. The answer's last byte is sent already; shielded, so a
        cancelled request still settles, and bounded, so a stuck store cannot hold the task forever."""
        if ctx.admission is None:
            return
        state = getattr(scope.get("app"), "state", None)
        checker, store = getattr(state, "key_checker", None), getattr(state, "state", None)
        if checker is None or store is None:
            return
        with anyio.CancelScope(shield=True) as shield:
            shield.deadline = anyio.current_time() + SETTLE_TIMEOUT_S
            await checker.settle(store, ctx)

    def _finish(self, scope: Scope, ctx: RequestContext, ex: _Exchange) -> None:
        path = scope.get("path", "")
        who = ctx.principal
        if path in QUIET_PATHS:
            return
        # 499 (nginx's "client closed request"): the answer never finished, e.g. the client left mid-stream
        status = (ex.status or 500) if ex.complete else 499
        latency = time.perf_counter() - ex.started
        route = getattr(scope.get("route"), "path_format", None) or "unmatched"
        ttft = ex.first if ex.stream else None
        self.metrics.observe_request(
            route, ctx.model or "", status, ex.first, latency, ttft, ex.gaps, ctx, who.name if who else None
        )
        line: dict[str, Any] = {
            "request_id": ctx.request_id,
            "key": who.name if who else None,
            "method": scope.get("method"),
            "route": route,
            "model": ctx.model,
            "commit": ctx.commit,
            "status": status,
            "tokens_in": ctx.tokens_in,
            "tokens_out": ctx.tokens_out,
            "queue_s": round(ctx.queue_s, 4),
            "ttft_s": round(ttft, 4) if ttft is not None else None,
            "latency_s": round(latency, 4),
            "cache": ctx.cache,
        }
        if self.settings.log_prompts:
            line["prompt"] = ex.prompt.decode(errors="replace")
            line["output"] = ex.output.decode(errors="replace")
        access_log.info("%s %s %s", scope.get("method"), route, status, extra={"request": line})


def _family(scope: Scope) -> Family:
    fam = scope.get("state", {}).get("api_family")
    return fam if isinstance(fam, Family) else family_of_path(scope.get("path", "/"))


async def _noop_receive() -> Message:
    return {"type": "http.disconnect"}
