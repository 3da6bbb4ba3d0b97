"""What the gateway learns about one request while serving it, for its log line, metrics and limits.

The gateway middleware opens a ``RequestContext`` per request and puts it in a context variable: the auth
dependency, the registry's model lookup and admission, and the serving code (token counts) fill it in
without every function passing it along. Each request has its own object; nothing is shared between them.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import re
import secrets
import uuid
from collections.abc import Callable
from typing import Any

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SCALE_UP_TIMEOUT_RE = re.compile(r"^\d{1,6}(\.\d{1,3})?$")
FLAT_SCOPES = frozenset({"inference", "batch"})  # flat keys (HUBSERVE_API_KEYS) and no auth: never mirror or admin


def scale_up_timeout(header: str | None) -> float | None:
    """The seconds an ``X-Scale-Up-Timeout`` header asks to wait for a model to load (Inference Endpoints' header);
    None when absent or not a plain non-negative number. Pure."""
    if header is None or not SCALE_UP_TIMEOUT_RE.match(header.strip()):
        return None
    return float(header.strip())


@dataclasses.dataclass
class Principal:
    """Who sent a request: a key name (never the key) and what that key may do."""

    name: str
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    max_concurrent: int | None = None
    max_input_tokens: int | None = None
    scopes: frozenset[str] = FLAT_SCOPES

    def may_use(self, names: tuple[str, ...]) -> bool:
        return self.models is None or any(n in self.models for n in names)


ANONYMOUS = Principal("-")  # auth is off (no keys configured)


@dataclasses.dataclass
class RequestContext:
    request_id: str
    engine_request_id: str  # what the engine sees: the request id, suffixed when the client chose it
    principal: Principal | None = None
    model: str | None = None
    commit: str | None = None
    queue_s: float = 0.0
    tokens_in: int | None = None
    tokens_out: int | None = None
    admission: Any = None  # what admission took for the key (window counts, budgets, a slot): settled at the end
    # the request's time limit: the gateway's cancel scope, when it started (anyio's clock) and the limit in s
    deadline: Any = None
    started_at: float = 0.0
    timeout_s: float = 0.0
    scale_up_timeout_s: float | None = None  # X-Scale-Up-Timeout: how long the client waits for a model to load
    cache: str | None = None  # server/ops/replay.py: "hit" | "miss" (response cache), "replay" (Idempotency-Key)

    def add_tokens(self, tokens_in: int | None, tokens_out: int | None) -> None:
        if tokens_in is not None:
            self.tokens_in = (self.tokens_in or 0) + tokens_in
        if tokens_out is not None:
            self.tokens_out = (self.tokens_out or 0) + tokens_out

    def add_usage(self, usage: object) -> None:
        """A ``usage`` object: OpenAI chat/completions (prompt/completion_tokens), or Responses and Anthropic
        Messages (input/output_tokens)."""
        if isinstance(usage, dict):
            tokens_in = _int(usage.get("prompt_tokens"))
            tokens_out = _int(usage.get("completion_tokens"))
            if tokens_in is None and tokens_out is None:
                tokens_in, tokens_out = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
            self.add_tokens(tokens_in, tokens_out)


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("hubserve_request", default=None)


def new_request_id(given: str | None) -> tuple[str, str]:
    """(request id, id for the engine). A client's id is kept (validated by the caller) and suffixed for the
    engine so that two requests reusing one id never collide inside vLLM; ours are unique already."""
    if given:
        return given, f"{given}-{secrets.token_hex(4)}"
    rid = uuid.uuid4().hex
    return rid, rid


def current() -> RequestContext | None:
    return _current.get()


def begin(ctx: RequestContext) -> contextvars.Token[RequestContext | None]:
    return _current.set(ctx)


def end(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)


def engine_headers() -> dict[str, str]:
    """Headers for a call to the engine on behalf of the current request (vLLM uses X-Request-Id as its id)."""
    ctx = _current.get()
    return {"X-Request-Id": ctx.engine_request_id} if ctx is not None else {}


def bound_time(seconds: float) -> None:
    """Set the request's time limit to ``seconds`` from its start (the model's, once the model is known)."""
    ctx = _current.get()
    if ctx is not None and ctx.deadline is not None and seconds != ctx.timeout_s:
        ctx.timeout_s = seconds
        ctx.deadline.deadline = ctx.started_at + seconds


def note_answerer(info: Any) -> None:
    """Label the request with the model and commit of the engine that took it (a ModelInfo)."""
    ctx = _current.get()
    if ctx is not None:
        ctx.model, ctx.commit = info.name, info.commit


def note_queue(seconds: float) -> None:
    ctx = _current.get()
    if ctx is not None:
        ctx.queue_s += seconds


def note_usage(usage: object) -> None:
    ctx = _current.get()
    if ctx is not None:
        ctx.add_usage(usage)


def note_tokens(tokens_in: int | None, tokens_out: int | None) -> None:
    ctx = _current.get()
    if ctx is not None:
        ctx.add_tokens(tokens_in, tokens_out)


EventHook = Callable[[dict[str, Any]], None]
TEXT_EVENTS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta",
                         "content_block_delta"})


class StreamUsage:
    """Token counts of an SSE stream passed through unparsed, in each family's shape: the ``usage`` of an OpenAI
    chunk (stream_options.include_usage), of a Responses ``response.completed`` event, of Anthropic's
    ``message_start`` + ``message_delta`` events (merged); failing that, one output token per event with text.
    ``on_event`` (optional) sees every event's JSON object."""

    def __init__(self, on_event: EventHook | None = None) -> None:
        self._pending = b""
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.on_event = on_event

    def feed(self, data: bytes) -> None:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            try:
                chunk = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if self.on_event is not None:
                self.on_event(chunk)
            usage = chunk.get("usage")
            if not isinstance(usage, dict):
                inner = chunk.get("response") or chunk.get("message")
                usage = inner.get("usage") if isinstance(inner, dict) else None
            if isinstance(usage, dict):
                self.usage = {**self.usage, **usage} if self.usage else usage
            if chunk.get("type") in TEXT_EVENTS or any(_has_text(c) for c in chunk.get("choices") or []):
                self.chunks += 1

    def close(self) -> None:
        if self.usage is not None:
            note_usage(self.usage)
        else:
            note_tokens(None, self.chunks)


def _has_text(choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    return bool(choice.get("text") or (isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls"))))
