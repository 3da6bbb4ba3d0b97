"""Pass a request through to an engine's HTTP API and its answer back, byte for byte, streams unbuffered.

Used by the OpenAI routes as is; other families may use it for routes whose answer needs no translation.

Engines on a Unix socket (vLLM) take the fast path: one connection per request, the answer parsed by
httptools (C), and each read from the engine sent on as one piece, however many SSE events it holds. A
generic HTTP client hands a stream over event by event, and each event then costs a send to the client
(measured with bench/bench_relay.py: ~56 µs of gateway CPU per event that way; see docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httptools
import httpx
from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.engines.base import Admission, Engine
from server.engines.client import lost
from server.errors import Family, InvalidRequest, sse_error_event
from server.ops.context import EventHook, StreamUsage, engine_headers, note_usage
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
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
MAX_TOKENS_PATHS = {"/v1/responses": ("max_output_tokens",), "/v1/messages": ("max_tokens",)}
CAPPED_PATHS = GENERATION_PATHS | MAX_TOKENS_PATHS.keys()


def _response_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}


async def forward(
    registry: Registry,
    engine: Engine,
    path: str,
    body: bytes,
    request_headers: Mapping[str, str],
    family: Family = Family.OPENAI,
    method: str = "POST",
    *,
    content_type: str = "application/json",
    payload: dict[str, Any] | None = None,
    admitted: Callable[[Engine], None] | None = None,
    on_event: EventHook | None = None,
) -> Response:
    """Send ``body`` to ``path`` on the engine serving ``engine``'s model now (after a swap: the new one),
    holding one in-flight slot until the answer is fully sent.

    JSON answers come back whole with vLLM's status; ``text/event-stream`` answers are streamed chunk by
    chunk as they arrive. If the engine dies mid-stream, one SSE error event in ``family``'s shape ends it.
    ``payload``: ``body`` already parsed by the caller (the max-tokens cap then reads it instead of parsing the
    body again); ``admitted(engine)`` may refuse the engine the request was admitted to (raise: the slot is freed);
    ``on_event(obj)`` sees each JSON object of a successful answer (the whole answer, or each SSE event).
    """
    if path in CAPPED_PATHS and registry.settings.max_new_tokens is not None:
        fields = MAX_TOKENS_PATHS.get(path, MAX_TOKENS_FIELDS)
        body = _capped(body, payload, registry.settings.max_new_tokens, fields)
    slot = await registry.admit(engine)
    try:
        if slot.engine.model_id != engine.model_id:  # an adapter moved since the body was made: the new name
            body = _renamed(body, payload, slot.engine.model_id)
        engine = slot.engine
        if admitted is not None:
            admitted(engine)
    except BaseException:
        slot.release()
        raise
    rename = ModelRename(engine.model_id, engine.info.name) if engine.model_id != engine.info.name else None
    uds = engine.uds
    if uds is not None:
        return await _forward_socket(
            engine, uds, slot, method, path, body, request_headers, family, content_type, on_event, rename
        )
    try:
        client = engine.client()
        headers = {"content-type": content_type, **engine_headers()}
        headers |= {h: request_headers[h] for h in FORWARD_REQUEST_HEADERS if h in request_headers}
        upstream_request = client.build_request(method, path, content=body, headers=headers)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.TransportError as e:
            raise lost(engine, e) from e
        if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                content = await upstream.aread()
            except httpx.TransportError as e:
                raise lost(engine, e) from e
            finally:
                await upstream.aclose()
                slot.release()  # a whole answer is done with its slot here (found by the TGI/Hub work)
            if rename is not None:
                content = rename.whole(content)
            _note_json_usage(content, on_event if upstream.status_code < 400 else None)
            return Response(content, status_code=upstream.status_code, headers=_response_headers(upstream))
    except BaseException:
        slot.release()
        raise
    return RelayResponse(
        _relay(engine, upstream, family, on_event if upstream.status_code < 400 else None, rename),
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


async def _relay(
    engine: Engine, upstream: httpx.Response, family: Family, on_event: EventHook | None,
    rename: ModelRename | None = None,
) -> AsyncIterator[bytes]:
    usage = StreamUsage(on_event)
    try:
        async for chunk in upstream.aiter_raw():
            if rename is not None:
                chunk = rename.feed(chunk)
            usage.feed(chunk)
            yield chunk
        if rename is not None and (tail := rename.flush()):
            yield tail
    except httpx.TransportError as e:
        log.warning("model %s: stream broken: %s", engine.info.name, type(e).__name__)
        yield sse_error_event(lost(engine, e), family)
    finally:
        usage.close()


class ModelRename:
    """Puts an adapter's served name where the engine answers with its engine name (``"poet@0123456789ab"``), in
    an answer passed through as bytes, however the stream is cut into reads: a read ending in what may be the start
    of the name is held back until the next one."""

    def __init__(self, engine_name: str, served_name: str) -> None:
        self.old = json.dumps(engine_name).encode()
        self.new = json.dumps(served_name).encode()
        self._held = b""

    def whole(self, data: bytes) -> bytes:
        return data.replace(self.old, self.new)

    def feed(self, data: bytes) -> bytes:
        data = (self._held + data).replace(self.old, self.new)
        keep = next((k for k in range(min(len(self.old) - 1, len(data)), 0, -1) if data.endswith(self.old[:k])), 0)
        self._held = data[len(data) - keep:] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def _body_object(body: bytes, payload: object) -> object:
    """The body's JSON (``payload`` when the caller parsed it already); InvalidRequest when it is not JSON."""
    if payload is not None:
        return payload
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.") from e


def _renamed(body: bytes, payload: dict[str, Any] | None, model: str) -> bytes:
    """The JSON body with its ``model`` replaced."""
    data = _body_object(body, payload)
    return json.dumps({**data, "model": model}).encode() if isinstance(data, dict) else body


def _capped(body: bytes, payload: object, cap: int, fields: tuple[str, ...]) -> bytes:
    """The body with max_tokens capped (HUBSERVE_MAX_NEW_TOKENS); InvalidRequest when it asks for more.
    ``payload``: the body's JSON when the caller has it (else parsed here)."""
    data = _body_object(body, payload)
    if not isinstance(data, dict):
        return body
    capped = cap_max_tokens(data, cap, fields)
    return body if capped is None else json.dumps(capped).encode()


def _note_json_usage(content: bytes, on_event: EventHook | None = None) -> None:
    """Token counts of a whole JSON answer (vLLM's carry ``usage``), for the request's log line and metrics."""
    if b'"usage"' in content or on_event is not None:
        try:
            data = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(data, dict):
            note_usage(data.get("usage"))
            if on_event is not None:
                on_event(data)


# ---- the fast path: an engine on a Unix socket -----------------------------------------------------------------
READ_SIZE = 1 << 16


class _Answer:
    """httptools callbacks for one engine answer: headers, then body pieces as they are decoded."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.pieces: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def take(self) -> bytes:
        data = b"".join(self.pieces)
        self.pieces.clear()
        return data


def _request_bytes(
    method: str, path: str, body: bytes, request_headers: Mapping[str, str], content_type: str = "application/json"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: engine", f"content-type: {content_type}", "connection: close"]
    lines += [f"{h}: {request_headers[h]}" for h in FORWARD_REQUEST_HEADERS if h in request_headers]
    lines += [f"{h}: {v}" for h, v in engine_headers().items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _forward_socket(
    engine: Engine,
    uds: Path,
    slot: Admission,
    method: str,
    path: str,
    body: bytes,
    request_headers: Mapping[str, str],
    family: Family,
    content_type: str,
    on_event: EventHook | None,
    rename: ModelRename | None = None,
) -> Response:
    writer: asyncio.StreamWriter | None = None
    try:
        try:
            reader, writer = await asyncio.open_unix_connection(str(uds))
            writer.write(_request_bytes(method, path, body, request_headers, content_type))
            answer = _Answer()
            parser = httptools.HttpResponseParser(answer)
            while not answer.headers_done:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise ConnectionResetError("engine closed the connection")
                parser.feed_data(data)
            headers = [(k, v) for k, v in answer.headers if k.decode("latin-1") not in DROP_RESPONSE_HEADERS]
            status = parser.get_status_code()
            if not dict(answer.headers).get(b"content-type", b"").startswith(b"text/event-stream"):
                while not answer.complete and (data := await reader.read(READ_SIZE)):
                    parser.feed_data(data)
                if not answer.complete:
                    raise ConnectionResetError("engine closed the connection mid-answer")
                writer.close()
                slot.release()
                content = answer.take()
                if rename is not None:
                    content = rename.whole(content)
                _note_json_usage(content, on_event if status < 400 else None)
                return Response(content, status_code=status, headers={k.decode(): v.decode() for k, v in headers})
        except (OSError, httptools.HttpParserError) as e:
            raise lost(engine, e) from e
    except BaseException:
        slot.release()
        if writer is not None:
            writer.close()
        raise
    relay = SocketRelay(engine, family, slot, status, headers, answer, parser, reader, writer)
    relay.on_event = on_event if status < 400 else None
    relay.rename = rename
    return relay


class SocketRelay(Response):
    """A streamed engine answer relayed read by read; frees its slot and connection however it ends. A client
    that leaves closes the engine connection, so vLLM aborts the request."""

    def __init__(
        self,
        engine: Engine,
        family: Family,
        slot: Admission,
        status: int,
        headers: list[tuple[bytes, bytes]],
        answer: _Answer,
        parser: httptools.HttpResponseParser,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.status_code = status
        self.raw_headers = headers
        self.background = None
        self._engine, self._family, self._slot = engine, family, slot
        self._answer, self._parser, self._reader, self._writer = answer, parser, reader, writer
        self._client_gone = False
        self.on_event: EventHook | None = None
        self.rename: ModelRename | None = None

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_gone = True
        self._writer.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        answer, reader = self._answer, self._reader
        usage = StreamUsage(self.on_event)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                while True:
                    if answer.pieces:
                        piece = answer.take()
                        if self.rename is not None:
                            piece = self.rename.feed(piece)
                        usage.feed(piece)
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                    if answer.complete:
                        if self.rename is not None and (tail := self.rename.flush()):
                            await send({"type": "http.response.body", "body": tail, "more_body": True})
                        break
                    data = await reader.read(READ_SIZE)
                    if not data:
                        raise ConnectionResetError("engine closed the stream")
                    self._parser.feed_data(data)
            except (OSError, httptools.HttpParserError) as e:
                if self._client_gone:
                    return
                log.warning("model %s: stream broken: %s", self._engine.info.name, type(e).__name__)
                error = sse_error_event(lost(self._engine, e), self._family)
                await send({"type": "http.response.body", "body": error, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            usage.close()
            watcher.cancel()
            self._writer.close()
            self._slot.release()
