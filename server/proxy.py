"""Pass a request through to an engine's HTTP API and its answer back, byte for byte, streams unbuffered.

Used by the OpenAI routes as is; other families may use it for routes whose answer needs no translation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.engines.base import Admission, Engine
from server.errors import EngineUnavailable, Family, sse_error_event

if TYPE_CHECKING:
    from server.registry import Registry

log = logging.getLogger("hubserve.proxy")

# Hop-by-hop and framing headers are the gateway's own business; everything else of vLLM's answer is kept.
DROP_RESPONSE_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date", "content-encoding"}
)
FORWARD_REQUEST_HEADERS = ("accept", "x-request-id", "traceparent", "tracestate")


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
    slot = await registry.admit(engine)
    engine = slot.engine
    try:
        client = engine.client()
        headers = {"content-type": "application/json"}
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
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.TransportError as e:
        log.warning("model %s: stream broken: %s", engine.info.name, type(e).__name__)
        yield sse_error_event(_lost(engine, e), family)
