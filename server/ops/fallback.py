"""Aliases and fallbacks: a request for an alias (``[[aliases]]`` in models.toml) is tried on its models in order.

One pure ASGI middleware, inside the gateway's (which keeps the request id, the time limit, the log line and the
``X-Hubserve-Model`` header, set from the RequestContext: the model that answered). Per candidate it rewrites the
model the request names (the JSON body's ``model``, or the ``/models/{name}`` path) and runs the app again. It holds
an attempt's ``http.response.start`` while the status is an error, so it can still choose another model: once a
byte of an answer went to the client (a 2xx/3xx start, a stream that started), that answer is the client's. The
last candidate's answer goes out whatever it is.

Why an attempt failed is known without reading our own error messages: the registry notes the refusal it raised
(``note_refusal``: Overloaded, ModelLoading, EngineUnavailable) on the attempt; a 5xx is ``failed`` (an engine that
answered 5xx, a lost connection); the engine's context-length refusal is a 400 (TGI's validation: 422) carrying
vLLM's message ("This model's maximum context length is ...") or TGI's, the one case read from the answer.

Every model but the last is asked not to wait: with ``loading`` its load starts but the request does not wait for
it (X-Scale-Up-Timeout: 0), with ``overloaded`` a model at its in-flight limit refuses at once (no queue wait).

Keys: a key restricted to some models needs the alias's name in its list; through the alias, the alias's models
are its to use (the operator chose who answers), and only through it (server/registry.py grants them).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ModelLoading, Overloaded, RateLimited, ServerError, error_response, family_of_path
from server.ops.context import RequestContext

if TYPE_CHECKING:
    from server.ops.metrics import Metrics
    from sync.manifest import AliasSpec

log = logging.getLogger("hubserve.fallback")

HOLD_BYTES = 64 * 1024  # an error answer bigger than this is sent on as it comes (it is no refusal of ours)
PARSE_IN_THREAD_BYTES = 256 * 1024  # bigger bodies are parsed and re-serialized off the event loop
# Bodies the middleware never reads ahead of the route (uploads: their model is a form field, not JSON).
UNREAD_TYPES = (b"multipart/", b"image/", b"audio/", b"video/", b"application/octet-stream")
# The path routes that name a model after /models/{name}: Hub tasks, TGI info, the families' /v1 routes.
PATH_SUFFIXES = ("", "/v1", "/health", "/info")
PATH_PREFIXES = ("/v1/", "/pipeline/")
# vLLM ("This model's maximum context length is N tokens. However, your prompt contains ..."; "Input length (N)
# exceeds model's maximum context length (M)."), OpenAI's code, and TGI's validation messages.
CONTEXT_LENGTH_RE = re.compile(
    rb"maximum context length|context_length_exceeded|`inputs` tokens \+ `max_new_tokens` must be"
    rb"|`inputs` must have less than",
    re.IGNORECASE,
)
OWN_HEADERS = frozenset({b"x-hubserve-alias", b"x-hubserve-fallback", b"x-hubserve-fallback-reason"})


@dataclasses.dataclass
class Attempt:
    """One candidate tried for an alias: the registry reads it (a key's grant) and notes its refusal on it."""

    alias: str
    candidate: str
    refusal: ServerError | None = None
    may_queue: bool = True  # False: at its in-flight limit it is Overloaded at once (the next model answers)


_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("hubserve_alias_attempt", default=None)


def current_attempt() -> Attempt | None:
    return _attempt.get()


def note_refusal(error: ServerError) -> None:
    """The registry refused the current attempt's admission with ``error`` (why this candidate did not answer)."""
    attempt = _attempt.get()
    if attempt is not None:
        attempt.refusal = error


def fallback_reason(refusal: ServerError | None, status: int, body: bytes) -> str | None:
    """Why an attempt answered with ``status`` (and ``body``) counts as not answered; None: it answered. Pure."""
    if status < 400:
        return None
    if refusal is not None and (status == 429 or status >= 500):
        if isinstance(refusal, ModelLoading):
            return "loading"
        if isinstance(refusal, Overloaded) and not isinstance(refusal, RateLimited):
            return "overloaded"
    if status >= 500:
        return "failed"
    if status in (400, 422) and CONTEXT_LENGTH_RE.search(body):
        return "context_length"
    return None


def path_alias(path: str, aliases: Iterable[str]) -> tuple[str, str] | None:
    """(alias, rest of the path) when ``path`` is ``/models/{alias}`` or one of its routes. Pure."""
    if not path.startswith("/models/"):
        return None
    tail = path[len("/models/"):]
    for name in aliases:
        if tail.startswith(name):
            rest = tail[len(name):]
            if rest in PATH_SUFFIXES or rest.startswith(PATH_PREFIXES):
                return name, rest
    return None


class _Held:
    """An attempt's answer: sent on at once (``committed``) or held until it is known to be a refusal."""

    def __init__(self, send: Send, hold: bool, headers: list[tuple[bytes, bytes]]) -> None:
        self._send = send
        self._hold = hold
        self._extra = headers
        self.committed = False
        self.status = 0
        self.messages: list[Message] = []
        self.size = 0

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in OWN_HEADERS]
            message = {**message, "headers": headers + self._extra}
            if not self._hold or self.status < 400:
                self.committed = True
        if self.committed:
            await self._send(message)
            return
        self.messages.append(message)
        self.size += len(message.get("body", b""))
        if self.size > HOLD_BYTES:
            await self.flush()

    async def flush(self) -> None:
        self.committed = True
        messages, self.messages = self.messages, []
        for message in messages:
            await self._send(message)


class FallbackMiddleware:
    """Resolves alias names to their models and falls back before the first byte (module docstring)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = getattr(getattr(scope.get("app"), "state", None), "registry", None)
        aliases: dict[str, AliasSpec] = getattr(registry, "aliases", None) or {}
        if scope["type"] != "http" or not aliases:
            await self.app(scope, receive, send)
            return
        await self._route(scope, receive, send, aliases)

    async def _route(self, scope: Scope, receive: Receive, send: Send, aliases: dict[str, AliasSpec]) -> None:
        by_path = path_alias(scope["path"], aliases)
        if by_path is None and (scope["method"] != "POST" or _content_type(scope).startswith(UNREAD_TYPES)):
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
        except ServerError as e:  # the gateway's body limit, met while reading ahead of the route
            await error_response(e, family_of_path(scope["path"]))(scope, receive, send)
            return
        if body is None:  # the client left before its body was sent
            return
        payload: dict[str, Any] | None = None
        if by_path is None:
            payload = await _alias_payload(body, aliases)
            if payload is None:
                await self.app(scope, _replay(body, receive), send)
                return
        alias = aliases[by_path[0] if by_path is not None else payload["model"]]  # type: ignore[index]
        await self._fall_back(scope, receive, send, alias, body, payload, by_path[1] if by_path else None)

    async def _fall_back(
        self, scope: Scope, receive: Receive, send: Send, alias: AliasSpec, body: bytes,
        payload: dict[str, Any] | None, path_rest: str | None,
    ) -> None:
        ctx: RequestContext | None = scope.get("state", {}).get("request_context")
        asked_patience = ctx.scale_up_timeout_s if ctx is not None else None
        original = (scope["path"], scope.get("raw_path"), scope["headers"])
        hops: list[tuple[str, str]] = []  # (model that did not answer, why)
        try:
            for i, candidate in enumerate(alias.models):
                last = i == len(alias.models) - 1
                if path_rest is not None:
                    scope["path"] = f"/models/{candidate}{path_rest}"
                    scope["raw_path"] = quote(scope["path"]).encode()
                    attempt_body = body
                else:
                    attempt_body = await _renamed(body, payload or {}, candidate)
                    scope["headers"] = _with_length(original[2], len(attempt_body))
                if ctx is not None:
                    ctx.model = ctx.commit = None  # the lookup of this candidate labels the answer
                    # not the last: start loading it but let the next model answer at once (X-Scale-Up-Timeout: 0)
                    ctx.scale_up_timeout_s = 0.0 if not last and "loading" in alias.fallback_on else asked_patience
                attempt = Attempt(alias.name, candidate, may_queue=last or "overloaded" not in alias.fallback_on)
                held = _Held(send, not last, _headers(alias.name, candidate, hops))
                token = _attempt.set(attempt)
                try:
                    await self.app(scope, _replay(attempt_body, receive), held)
                finally:
                    _attempt.reset(token)
                if held.committed:
                    return
                reason = fallback_reason(attempt.refusal, held.status, held.body())
                if reason is None or reason not in alias.fallback_on:
                    await held.flush()
                    return
                hops.append((candidate, reason))
                self.metrics.observe_fallback(alias.name, candidate, alias.models[i + 1], reason)
                fields = {"request_id": ctx.request_id if ctx else None, "alias": alias.name, "from_model": candidate,
                          "to_model": alias.models[i + 1], "reason": reason, "status": held.status}
                log.info("alias %s: model %s did not answer (%s); trying %s", alias.name, candidate, reason,
                         alias.models[i + 1], extra={"request": fields})
        finally:
            scope["path"], raw_path, scope["headers"] = original
            if raw_path is not None:
                scope["raw_path"] = raw_path
            if ctx is not None:
                ctx.scale_up_timeout_s = asked_patience


def _headers(alias: str, candidate: str, hops: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """``X-Hubserve-Alias`` on every answer to an alias; after a fallback ``X-Hubserve-Fallback: big->small`` and
    ``X-Hubserve-Fallback-Reason: overloaded`` (one reason per hop). Names are models.toml's, validated."""
    out = [(b"x-hubserve-alias", alias.encode())]
    if hops:
        out.append((b"x-hubserve-fallback", "->".join([*(m for m, _ in hops), candidate]).encode()))
        out.append((b"x-hubserve-fallback-reason", ",".join(r for _, r in hops).encode()))
    return out


def _content_type(scope: Scope) -> bytes:
    return next((v.lower() for k, v in scope["headers"] if k.lower() == b"content-type"), b"")


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != b"content-length"] + [(b"content-length", str(length).encode())]


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client disconnects first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once more, then the client's own receive (which tells of a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _alias_payload(body: bytes, aliases: dict[str, AliasSpec]) -> dict[str, Any] | None:
    """The body's JSON when its ``model`` is an alias. A body that names no alias anywhere is not parsed (the
    common case costs one byte scan per alias)."""
    if not any(f'"{name}"'.encode() in body for name in aliases):
        return None
    try:
        data = await asyncio.to_thread(json.loads, body) if len(body) > PARSE_IN_THREAD_BYTES else json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # the route answers it (its own error, in its family's shape)
    return data if isinstance(data, dict) and isinstance(data.get("model"), str) and data["model"] in aliases else None


async def _renamed(body: bytes, payload: dict[str, Any], model: str) -> bytes:
    renamed = {**payload, "model": model}
    if len(body) > PARSE_IN_THREAD_BYTES:
        return (await asyncio.to_thread(json.dumps, renamed)).encode()
    return json.dumps(renamed).encode()
