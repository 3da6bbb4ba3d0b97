"""The server's exception hierarchy and the one place that turns it into each API family's error shape.

Domain code raises a ``ServerError`` subclass; each carries its HTTP status and a stable code. Which shape
an error takes is decided by the route's API family, set by a router dependency (``family_dependency``)
and, for requests that matched no route, by the path prefix table ``family_of_path``:

- OpenAI: ``{"error": {"message", "type", "param", "code"}}``
- TGI:    ``{"error", "error_type"}``; validation → 422, generation → 424, overloaded → 429, unhealthy → 503
- Hub:    ``{"error": message}`` plus ``X-Error-Code`` / ``X-Error-Message`` headers (huggingface_hub reads them)
- Anthropic: ``{"type": "error", "error": {"type", "message"}}``; overload is 529 ``overloaded_error``
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sync.errors import HubserveError

log = logging.getLogger("hubserve.errors")


class Family(enum.StrEnum):
    OPENAI = "openai"
    TGI = "tgi"
    HUB = "hub"
    ANTHROPIC = "anthropic"
    OPS = "ops"


class ServerError(HubserveError):
    """Base of the errors the server answers with. Subclasses set status and codes; nothing parses messages."""

    status: int = 500
    code: str = "internal_error"
    openai_type: str = "server_error"
    tgi_type: str = "generation"  # validation | generation | overloaded | unhealthy | authentication | not_found
    hub_code: str | None = None  # X-Error-Code on Hub routes; `code` when None
    anthropic_type: str = "api_error"
    anthropic_status: int | None = None  # when Anthropic's API answers this with another status than `status`

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:  # type: ignore[override]  # sync.errors names the same idea http_status
        return self.status

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}

    def hub_fields(self) -> dict[str, Any]:
        """Fields the Hub family's error body carries beside ``error``."""
        return {}


class InvalidRequest(ServerError):
    """The request is malformed: not JSON, a missing or mistyped field, a value out of range, over a cap."""

    status = 400
    code = "invalid_request"
    openai_type = "invalid_request_error"
    tgi_type = "validation"
    anthropic_type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ServerError):
    status = 401
    code = "invalid_api_key"
    openai_type = "invalid_request_error"
    tgi_type = "authentication"
    anthropic_type = "authentication_error"
    hub_code = "Unauthorized"

    def __init__(
        self, message: str = "Missing or invalid API key; send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
    ) -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServerError):
    """A valid key that may not use this model (or route)."""

    status = 403
    code = "model_not_allowed"
    openai_type = "permission_error"
    tgi_type = "authorization"
    anthropic_type = "permission_error"
    hub_code = "Forbidden"


class RequestTooLarge(ServerError):
    status = 413
    code = "request_too_large"
    openai_type = "invalid_request_error"
    tgi_type = "request_too_large"
    anthropic_type = "invalid_request_error"


class HeadersTooLarge(RequestTooLarge):
    status = 431
    code = "headers_too_large"


class RequestTimeout(ServerError):
    """The request ran past HUBSERVE_REQUEST_TIMEOUT_S (queue and stream included)."""

    status = 504
    code = "timeout"
    tgi_type = "timeout"


class NotFound(ServerError):
    status = 404
    code = "not_found"
    openai_type = "invalid_request_error"
    tgi_type = "not_found"
    anthropic_type = "not_found_error"
    hub_code = "EntryNotFound"


class ModelNotFound(NotFound):
    """The request names a model this server does not serve."""

    code = "model_not_found"
    hub_code = "RepoNotFound"

    def __init__(self, name: str, served: Sequence[str]) -> None:
        if _restricted_key():  # it must not learn other models' names, nor tell a forbidden one from an unknown one
            message = HIDDEN_MODEL_MESSAGE
        else:
            message = f"The model `{name}` does not exist on this server. Served models: {', '.join(served) or 'none'}."
        super().__init__(message, param="model")
        self.name = name
        self.served = tuple(served)


# What a key restricted to some models reads for an unknown model and for one it may not use alike (same status,
# same words): neither the name asked for (a repo id would map to a served name) nor the served names.
HIDDEN_MODEL_MESSAGE = (
    "This server has no such model for this API key (unknown, or not allowed to it); "
    "GET /v1/models lists the models it may use."
)


def _restricted_key() -> bool:
    from server.ops import context  # no import cycle: context imports nothing of server

    ctx = context.current()
    return ctx is not None and ctx.principal is not None and ctx.principal.models is not None


class MethodNotAllowed(ServerError):
    status = 405
    code = "method_not_allowed"
    openai_type = "invalid_request_error"
    tgi_type = "validation"
    anthropic_type = "invalid_request_error"


class Overloaded(ServerError):
    """Too many requests for a model (in flight and queued): 429 with Retry-After."""

    status = 429
    code = "overloaded"
    openai_type = "rate_limit_error"
    tgi_type = "overloaded"
    anthropic_type = "overloaded_error"
    anthropic_status = 529  # Anthropic's overloaded status (the SDK's OverloadedError, retried)
    hub_code = "Overloaded"


class RateLimited(Overloaded):
    """A key over its requests/min or tokens/min."""

    code = "rate_limit_exceeded"
    hub_code = "RateLimited"
    anthropic_type = "rate_limit_error"
    anthropic_status = 429


class EngineUnavailable(ServerError):
    """The model's engine is starting, restarting or failed: 503 with Retry-After."""

    status = 503
    code = "engine_unavailable"
    openai_type = "server_error"
    tgi_type = "unhealthy"
    anthropic_type = "overloaded_error"
    hub_code = "ModelNotReady"


class ModelLoading(EngineUnavailable):
    """The model is loading (on demand) and the client would not wait that long: 503 with Retry-After and, on
    Hub routes, the Inference API's ``{"error": "... is loading", "estimated_time": s}``."""

    code = "model_loading"
    hub_code = "ModelLoading"

    def __init__(self, name: str, estimated_time: float) -> None:
        super().__init__(f"Model `{name}` is loading (about {estimated_time:.0f} s more); retry later.",
                         retry_after=estimated_time)
        self.estimated_time = round(estimated_time, 1)

    def hub_fields(self) -> dict[str, Any]:
        return {"estimated_time": self.estimated_time}


class GenerationError(ServerError):
    """The engine failed while producing an answer (TGI: 424)."""

    status = 500
    code = "generation_error"
    tgi_type = "generation"


class IncompleteGeneration(GenerationError):
    """A stream ended before the generation finished (TGI's error_type ``incomplete_generation``)."""

    code = "incomplete_generation"
    tgi_type = "incomplete_generation"


class EngineStartError(ServerError):
    """An engine process could not be started or did not become ready."""

    status = 503
    code = "engine_start_failed"
    tgi_type = "unhealthy"
    anthropic_type = "overloaded_error"


class ModelNotVerified(ServerError):
    """A model of the manifest has no verified revision in the store: `hubserve sync` first."""

    exit_code = 1
    status = 503
    code = "model_not_verified"


_TGI_STATUS = {"validation": 422, "generation": 424, "overloaded": 429, "unhealthy": 503}

# Fallback when no route dependency named the family (unmatched paths, errors raised before routing).
# Longest match wins; an entry ending in "/" is a prefix, others match exactly.
PATH_FAMILIES: tuple[tuple[str, Family], ...] = (
    ("/v1/", Family.OPENAI),
    ("/v1/messages", Family.ANTHROPIC),
    ("/v1/messages/", Family.ANTHROPIC),
    ("/v1", Family.HUB),  # InferenceClient(base_url=".../v1").text_generation posts here
    ("/models/", Family.HUB),
    ("/", Family.TGI),
    ("/generate", Family.TGI),
    ("/generate_stream", Family.TGI),
    ("/info", Family.TGI),
    ("/tokenize", Family.TGI),
    ("/health", Family.OPS),
    ("/ready", Family.OPS),
    ("/metrics", Family.OPS),
    ("/openapi.json", Family.OPS),
    ("/docs", Family.OPS),
    ("/redoc", Family.OPS),
)


def validation_problem(error: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the first problem of a pydantic ValidationError, the one way every family words it:
    ``field: what is wrong``, or the validator's own text where it names the field itself."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    if msg.startswith("`") or msg.startswith("you must") or not loc:
        return msg, loc or None
    return f"{loc}: {msg}", loc


def family_of_path(path: str) -> Family:
    best: tuple[int, Family] = (-1, Family.OPENAI)
    for key, fam in PATH_FAMILIES:
        hit = path.startswith(key) if key.endswith("/") and key != "/" else path == key
        if hit and len(key) > best[0]:
            best = (len(key), fam)
    return best[1]


def family_dependency(family: Family) -> Callable[[Request], Awaitable[None]]:
    """A router dependency that names the API family of its routes: ``APIRouter(dependencies=[Depends(...)])``.

    List it first, before auth, so that errors raised by later dependencies take the family's shape. Async:
    FastAPI runs a sync dependency in a worker thread, a thread hop on every request (~0.3 ms of TTFT here).
    """

    async def set_family(request: Request) -> None:
        request.state.api_family = family

    return set_family


async def model_path(repo_id: str) -> None:
    """Declares the ``{repo_id}`` of a ``/models/{repo_id}/v1/...`` router in the OpenAPI schema (serving code reads
    it from ``request.path_params``): the dependency of every family's model router."""


def family_of(request: Request) -> Family:
    fam = getattr(request.state, "api_family", None)
    return fam if isinstance(fam, Family) else family_of_path(request.url.path)


# ---- shapes ------------------------------------------------------------------------------------------------


def openai_body(exc: ServerError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.openai_type, "param": exc.param, "code": exc.code}}


def anthropic_body(exc: ServerError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": exc.anthropic_type, "message": exc.message}}


def tgi_body(exc: ServerError) -> dict[str, Any]:
    return {"error": exc.message, "error_type": exc.tgi_type}


def status_for(exc: ServerError, family: Family) -> int:
    if family is Family.TGI:
        return _TGI_STATUS.get(exc.tgi_type, exc.status)
    if family is Family.ANTHROPIC and exc.anthropic_status is not None:
        return exc.anthropic_status
    return exc.status


def _header_safe(text: str) -> str:
    """Printable ASCII only: the message may quote a path from the network (control bytes would break the
    answer's headers, CR/LF would split them)."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text)
    return " ".join(printable.split())[:1000]


def error_response(exc: ServerError, family: Family) -> JSONResponse:
    """The HTTP answer for ``exc`` in ``family``'s shape, with Retry-After and auth headers as needed."""
    headers = exc.headers()
    if family is Family.TGI:  # the Hub's text-generation task answers in TGI's shape, with the Hub's fields
        body: dict[str, Any] = tgi_body(exc) | exc.hub_fields()
    elif family is Family.HUB:
        body = {"error": exc.message, **exc.hub_fields()}
        headers |= {"X-Error-Code": exc.hub_code or exc.code, "X-Error-Message": _header_safe(exc.message)}
    elif family is Family.ANTHROPIC:
        body = anthropic_body(exc)
    else:
        body = openai_body(exc)
    return JSONResponse(body, status_code=status_for(exc, family), headers=headers)


def sse_error_event(exc: ServerError, family: Family) -> bytes:
    """One SSE event carrying the error, for streams that already started (then the stream ends)."""
    if family is Family.ANTHROPIC:  # Anthropic's stream names its events; the SDK raises on `error`
        return f"event: error\ndata: {json.dumps(anthropic_body(exc))}\n\n".encode()
    body = tgi_body(exc) if family is Family.TGI else openai_body(exc)
    sep = "data:" if family is Family.TGI else "data: "
    return f"{sep}{json.dumps(body)}\n\n".encode()


# ---- OpenAPI -----------------------------------------------------------------------------------------------

_ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "anyOf": [
        {
            "title": "OpenAIError",
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
        {
            "title": "TGIError",
            "type": "object",
            "required": ["error", "error_type"],
            "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
        },
        {"title": "HubError", "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        {
            "title": "AnthropicError",
            "type": "object",
            "required": ["type", "error"],
            "properties": {
                "type": {"const": "error"},
                "error": {
                    "type": "object",
                    "required": ["type", "message"],
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    ],
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for code, text in (
        ("4XX", "A client error in the route family's shape (401 no or bad key, 403 model not allowed, 429 ...)."),
        ("5XX", "A server or engine error in the route family's shape."),
    )
}


def document_errors(app: FastAPI) -> None:
    """Declare every route's error answers (FastAPI would document a 422 in its own shape, which we never send)."""
    from fastapi.routing import APIRoute

    for route in app.routes:
        if isinstance(route, APIRoute):
            route.responses = {**ERROR_RESPONSES, **route.responses}


# ---- handlers ----------------------------------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    msg = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid request"))
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problems)"
    return msg, where or None


def _from_http_exception(exc: StarletteHTTPException, request: Request) -> ServerError:
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    asked = f"{request.method} {_header_safe(request.url.path)[:200]}"
    err: ServerError
    if exc.status_code == 404:
        err = NotFound(f"This server has no route {asked}; see /docs for the routes it serves."
                       if detail == "Not Found" else detail)
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"{asked}: this route does not take {request.method}; see /docs.")
    elif exc.status_code < 500:
        err = InvalidRequest(detail)
    else:
        err = ServerError(detail)
    err.status = exc.status_code
    return err


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the shape of the family of the route it came from."""

    async def on_server_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServerError)
        return error_response(exc, family_of(request))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(InvalidRequest(message, param=param), family_of(request))

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(_from_http_exception(exc, request), family_of(request))

    async def on_too_deep(request: Request, exc: Exception) -> JSONResponse:
        # Python's json (and pydantic, and json.dumps) recurse per nesting level: a body nested deeper than
        # the interpreter's stack allows is the client's doing, wherever on the request path it is met.
        log.warning("%s %s: the request is nested too deeply (%s)", request.method, request.url.path, exc)
        message = "The request body is nested too deeply (JSON arrays or objects inside each other)."
        return error_response(InvalidRequest(message), family_of(request))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ServerError("Internal server error."), family_of(request))

    app.add_exception_handler(ServerError, on_server_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RecursionError, on_too_deep)
    app.add_exception_handler(Exception, on_unexpected)


# ---- idempotency (server/ops/replay.py) ----------------------------------------------------------------------


class InvalidIdempotencyKey(InvalidRequest):
    """An ``Idempotency-Key`` header that is not 1-255 printable ASCII characters."""

    code = "invalid_idempotency_key"

    def __init__(self) -> None:
        super().__init__("Idempotency-Key: use 1-255 printable ASCII characters.", param="Idempotency-Key")


class IdempotencyKeyReused(ServerError):
    """The same ``Idempotency-Key`` (same API key, same route) came with a different body or model: 422."""

    status = 422
    code = "idempotency_key_reused"
    openai_type = "invalid_request_error"
    tgi_type = "validation"
    anthropic_type = "invalid_request_error"
    hub_code = "IdempotencyKeyReused"

    def __init__(self) -> None:
        super().__init__("Idempotency-Key: this key was already used with a different request (another body or "
                         "model); use a new key for a new request.", param="Idempotency-Key")


# ---- batch jobs (server/batch/: /v1/files, /v1/batches) ----------------------------------------------------


class BatchFileNotFound(NotFound):
    """No such file for this key (another key's file reads the same)."""

    code = "file_not_found"


class BatchNotFound(NotFound):
    """No such batch for this key (another key's batch reads the same)."""

    code = "batch_not_found"


class BatchConflict(ServerError):
    """The batch's state does not allow it (cancel of a finished batch)."""

    status = 409
    code = "batch_conflict"
    openai_type = "invalid_request_error"
    tgi_type = "validation"
    anthropic_type = "invalid_request_error"


class BatchLimitExceeded(RateLimited):
    """A key with HUBSERVE_BATCH_MAX_PER_KEY batches not finished yet."""

    code = "batch_limit_exceeded"


# ---- key budgets, caps, expiry and scopes (issue 17: server/ops/budgets.py, auth.py) ----------------------


class KeyExpired(Unauthorized):
    """A named key past its ``expires``: 401, as for an unknown key, but saying when it expired."""

    code = "key_expired"

    def __init__(self, name: str, expires: str) -> None:
        super().__init__(f"API key `{name}` expired at {expires}; ask for a new key (`hubserve keys update "
                         f"{name} --expires ...`).")


class ScopeNotAllowed(Forbidden):
    """A valid key without the scope the route needs (inference, batch, mirror, admin)."""

    code = "scope_not_allowed"

    def __init__(self, name: str, scope: str) -> None:
        super().__init__(f"API key `{name}` lacks the `{scope}` scope this route needs "
                         f"(`hubserve keys update {name} --scopes ...`).")


class BudgetExceeded(RateLimited):
    """A key over its daily or monthly token budget: 429 with Retry-After until the UTC day or month resets.
    ``x-should-retry: false``: the stock SDKs would otherwise retry at once, for hours of nothing."""

    openai_type = "insufficient_quota"

    def __init__(self, message: str, *, code: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
        self.code = code

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "x-should-retry": "false"}


class TooManyConcurrent(RateLimited):
    """A key with ``max_concurrent`` requests in flight already (over every gateway sharing the state)."""

    code = "max_concurrent_exceeded"


class InputTooLong(InvalidRequest):
    """A request whose input tokens are over its key's ``max_input_tokens``: 400, the status of every family's
    own "prompt too long" (OpenAI context_length_exceeded, Anthropic invalid_request_error; TGI maps it to 422)."""

    code = "max_input_tokens_exceeded"
