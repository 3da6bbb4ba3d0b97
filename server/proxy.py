"""Pass a request through to an engine's HTTP API and its answer back, byte for byte, streams unbuffered.

Used by the OpenAI routes as is; other families may use it for routes whose answer needs no translation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.engines.base import Admission, Engine
from server.errors import EngineUnavailable, Family, InvalidRequest, sse_error_event
from server.ops.context import StreamUsage, engine_headers, note_usage
from server.ops.limits import cap_max_tokens

if TYPE_CHECKING:
    from server.registry import Registry

log = logging.getLogger("hubserve.proxy")

# Hop-by-hop and framing headers are the gateway's own business; everything else of vLLM's answer is kept.
DROP_RESPONSE_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date", "content-encoding"}
)
FORWARD_REQUEST_HEADERS = ("accept", "traceparent", "tracestate")  # X-Request-Id: the gateway's, validated
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def _response_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}


def _lost(engine: Engine, error: Exception) -> EngineUnavailable:
    return EngineUnavailable(
        f"Model `{engine.info.name}` is unavailable ({type(error).__name__}); it may be restarting, retry later.",
        retry_after=engine.retry_after_s,
    )


async def forward(
    registry: Registry,
    engine: Engine,
    path: str,
    body: bytes,
    request_headers: Mapping[str, str],
    family: Family = Family.OPENAI,
    method: str = "POST",
) -> Response:
    """Send ``body`` to ``path`` on the engine serving ``engine``'s model now (after a swap: the new one),
    holding one in-flight slot until the answer is fully sent.

    JSON answers come back whole with vLLM's status; ``text/event-stream`` answers are streamed chunk by
    chunk as they arrive. If the engine dies mid-stream, one SSE error event in ``family``'s shape ends it.
    """
    if path in GENERATION_PATHS and registry.settings.max_new_tokens is not None:
        body = _capped(body, registry.settings.max_new_tokens)
    slot = await registry.admit(engine)
    engine = slot.engine
    try:
        client = engine.client()
        headers = {"content-type": "application/json", **engine_headers()}
        headers |= {h: request_headers[h] for h in FORWARD_REQUEST_HEADERS if h in request_headers}
        upstream_request = client.build_request(method, path, content=body, headers=headers)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.TransportError as e:
            raise _lost(engine, e) from e
        if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                content = await upstream.aread()
            except httpx.TransportError as e:
                raise _lost(engine, e) from e
            finally:
                await upstream.aclose()
                slot.release()  # a whole answer is done with its slot here (found by the TGI/Hub work)
            _note_json_usage(content)
            return Response(content, status_code=upstream.status_code, headers=_response_headers(upstream))
    except BaseException:
        slot.release()
        raise
    return RelayResponse(
        _relay(engine, upstream, family),
        status_code=upstream.status_code,
        headers=_response_headers(upstream),
        upstream=upstream,
        slot=slot,
    )


class RelayResponse(StreamingResponse):
    """A streamed answer that frees its slot and upstream connection however it ends: finished, broken, or
    the client gone before the first chunk (when the body generator never ran and its ``finally`` cannot)."""

    def __init__(self, content: AsyncIterator[bytes], *, upstream: httpx.Response, slot: Admission, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._upstream = upstream
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()
            await self._upstream.aclose()


async def _relay(engine: Engine, upstream: httpx.Response, family: Family) -> AsyncIterator[bytes]:
    usage = StreamUsage()
    try:
        async for chunk in upstream.aiter_raw():
            usage.feed(chunk)
            yield chunk
    except httpx.TransportError as e:
        log.warning("model %s: stream broken: %s", engine.info.name, type(e).__name__)
        yield sse_error_event(_lost(engine, e), family)
    finally:
        usage.close()


def _capped(body: bytes, cap: int) -> bytes:
    """The body with max_tokens capped (HUBSERVE_MAX_NEW_TOKENS); InvalidRequest when it asks for more."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.") from e
    if not isinstance(payload, dict):
        return body
    capped = cap_max_tokens(payload, cap, ("max_tokens", "max_completion_tokens"))
    return body if capped is None else json.dumps(capped).encode()


def _note_json_usage(content: bytes) -> None:
    if b'"usage"' in content:
        try:
            data = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(data, dict):
            note_usage(data.get("usage"))
