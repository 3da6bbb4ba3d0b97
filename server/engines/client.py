"""The engine client every API family uses: calls to an engine's private HTTP API and what its answers mean.

Families (openai/, anthropic/, tgi/, hub/) import none of each other; they share this module, the errors and
the registry's admission. ``server/proxy.py`` passes answers through byte for byte; this module is for the
calls whose answer the gateway reads or translates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
from fastapi import Request

from server.engines.base import Engine
from server.errors import EngineUnavailable, GenerationError, InvalidRequest, NotFound, Overloaded, ServerError
from server.ops.context import engine_headers, note_usage


def error_message(body: bytes) -> str | None:
    """The message of an engine's error answer (OpenAI, Anthropic or plain shapes), if there is one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode(errors="replace").strip()[:500] or None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "") or None
    if error is not None:
        return str(error)
    return str(data.get("message") or "") or None if isinstance(data, dict) else None


def engine_error(status: int, body: bytes) -> ServerError:
    """A vLLM error answer → hubserve's exception: 4xx the caller's fault (validation), 5xx the engine's."""
    message = error_message(body) or f"The engine answered HTTP {status}."
    if status in (400, 413, 422):
        return InvalidRequest(message)
    if status == 404:
        return NotFound(message)
    if status == 429:
        return Overloaded(message)
    if status == 503:
        return EngineUnavailable(message)
    return GenerationError(message)


def lost(engine: Engine, error: Exception) -> EngineUnavailable:
    """The engine's connection broke (it died or is restarting)."""
    return EngineUnavailable(
        f"Model `{engine.info.name}` is unavailable ({type(error).__name__}); it may be restarting, retry later.",
        retry_after=engine.retry_after_s,
    )


USAGE_PARSE_BYTES = 64 * 1024  # bigger answers (masks, vectors) are not parsed on the event loop for `usage`


async def post_engine(engine: Engine, path: str, body: dict[str, Any] | None = None, *,
                      content: bytes | None = None, form: dict[str, str] | None = None,
                      files: dict[str, Any] | None = None) -> httpx.Response:
    """POST to the engine a JSON body (``body``, or ``content`` already serialized) or a multipart form (``form``
    fields and ``files``); a lost connection is EngineUnavailable, an error answer its ServerError."""
    headers = engine_headers()
    try:
        if content is not None:
            headers = {**headers, "content-type": "application/json"}
            response = await engine.client().post(path, content=content, headers=headers)
        elif files is not None:
            response = await engine.client().post(path, data=form, files=files, headers=headers)
        else:
            response = await engine.client().post(path, json=body, headers=headers)
    except httpx.TransportError as e:
        raise lost(engine, e) from e
    if response.status_code >= 400:
        raise engine_error(response.status_code, response.content)
    if len(response.content) <= USAGE_PARSE_BYTES and response.headers.get("content-type", "").startswith(
            "application/json"):
        with contextlib.suppress(ValueError, AttributeError):
            note_usage(response.json().get("usage"))  # tokens in/out for the request log and metrics
    return response


PARSE_IN_THREAD_BYTES = 256 * 1024  # bigger bodies (inline images, audio) are parsed off the event loop


def parse_json(body: bytes) -> Any:
    """``body`` as JSON; InvalidRequest (a 4xx in every family) when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.") from e


async def read_json_body(request: Request) -> tuple[bytes, Any]:
    """The request's raw body and its JSON (parsed in a worker thread when the body is big)."""
    body = await request.body()
    if len(body) > PARSE_IN_THREAD_BYTES:
        return body, await asyncio.to_thread(parse_json, body)
    return body, parse_json(body)


async def read_json(request: Request) -> Any:
    """The request body as JSON; InvalidRequest (a 4xx in every family) when it is not JSON."""
    return (await read_json_body(request))[1]
