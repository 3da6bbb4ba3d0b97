"""Bounds for the standard-library HTTP servers that face the network: the mirror and the daemon's listener.

``ThreadingHTTPServer`` alone takes one thread per connection, unbounded and before any auth, and times out
per ``recv`` only: 500 clients that send half a request hold 500 threads, one byte every two minutes keeps
each alive forever, and a request body that a handler refused without reading is parsed as the next
request on that keep-alive connection (a desync). Here:

- a connection cap: a connection beyond ``max_connections`` gets a 503 and is closed, without a thread;
- deadlines over whole phases, not bytes: the next request's first byte within ``idle_timeout``, its
  request line and headers within ``header_timeout`` of that, its body within ``body_timeout``;
- request framing checked before any route runs: one ``Content-Length`` of digits or a chunked body
  (never both), else 400; a body the route did not read is drained when small, else the response says
  ``Connection: close`` and the connection ends, so leftover bytes are never read as a request.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sync.errors import ConfigError
from sync.paths import printable

CONTENT_LENGTH_DIGITS = 18  # 1 EB: a longer Content-Length is refused before int() sees it


@dataclass(frozen=True)
class Limits:
    """Connection and time bounds of one server; ``from_env`` reads overrides (``PREFIX_MAX_CONNECTIONS`` ...)."""

    max_connections: int = 256
    idle_timeout: float = 60.0  # a keep-alive connection waiting for its next request
    header_timeout: float = 10.0  # request line and headers, from their first byte
    body_timeout: float = 60.0  # a request body, from the moment the route starts reading it
    write_timeout: float = 120.0  # each send of a response (a slow download is fine, a stuck one is not)
    drain_max: int = 64 * 1024  # an unread request body up to this size is read and dropped (keep-alive)

    @classmethod
    def from_env(cls, prefix: str, env: Mapping[str, str] | None = None, **defaults: Any) -> Limits:
        """Defaults, then ``{prefix}MAX_CONNECTIONS``, ``{prefix}HEADER_TIMEOUT``, ... from the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = dict(defaults)
        for f in fields(cls):
            name = f"{prefix}{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            kind = int if f.type in ("int", int) else float
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"${name}={raw!r}: expected a number") from None
            if value <= 0:
                raise ConfigError(f"${name}={raw!r}: must be greater than 0")
            values[f.name] = value
        return cls(**values)


class _DeadlineReader(io.RawIOBase):
    """The socket's read side, where each ``recv`` waits at most until the current phase's deadline."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        super().__init__()
        self._sock, self._limits = sock, limits
        self.deadline: float | None = None  # None: waiting for a request (idle_timeout per recv)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = self._limits.idle_timeout
        if self.deadline is not None:
            wait = self.deadline - time.monotonic()
            if wait <= 0:
                raise TimeoutError("request deadline passed")
        self._sock.settimeout(wait)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._limits.write_timeout)


class BoundedHandler(BaseHTTPRequestHandler):
    """A request handler with deadlines and strict body framing; routes read bodies with ``read_body``."""

    protocol_version = "HTTP/1.1"
    allowed_methods = "GET, HEAD"  # the Allow header of a 405 for a method with no do_* here
    server: BoundedServer
    _reader: _DeadlineReader
    _buffered: io.BufferedReader
    _body_left: int | None = 0  # request body bytes not read yet; None: chunked (never read here)
    _code = 0  # the status of the response being sent

    def send_response_only(self, code: int, message: str | None = None) -> None:
        self._code = code
        super().send_response_only(code, message)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's buffered socket file: replaced by one whose reads have deadlines
        self._reader = _DeadlineReader(self.connection, self.server.limits)
        self.rfile = self._buffered = io.BufferedReader(self._reader)
        self.connection.settimeout(self.server.limits.write_timeout)

    def handle_one_request(self) -> None:
        self._body_left = 0
        self._reader.deadline = None
        try:
            if not self._buffered.peek(1):  # the client closed the connection between requests
                self.close_connection = True
                return
        except OSError:  # idle too long (TimeoutError) or reset
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + self.server.limits.header_timeout
        super().handle_one_request()
        if self._body_left != 0:  # a route answered without reading the body and end_headers did not see it
            self.close_connection = True

    def parse_request(self) -> bool:
        """The stdlib's parsing, then the body's framing: anything ambiguous is a 400 and the connection ends."""
        if not super().parse_request():
            return False
        if not hasattr(self, f"do_{self.command}"):  # the stdlib would answer 501: an unknown method is a 405
            self.close_connection = True
            self.send_error(405, f"method {printable(self.command, limit=40)!r} not allowed here")
            return False
        lengths = self.headers.get_all("Content-Length") or []
        chunked = "Transfer-Encoding" in self.headers
        if chunked and lengths:
            return self._refuse_framing("both Content-Length and Transfer-Encoding")
        if chunked:
            if self.headers.get("Transfer-Encoding", "").strip().lower() != "chunked":
                return self._refuse_framing("a Transfer-Encoding other than chunked")
            self._body_left = None
            return True
        if len(set(lengths)) > 1:
            return self._refuse_framing("conflicting Content-Length headers")
        if lengths:
            value = lengths[0].strip()
            if not value.isdigit() or not value.isascii() or len(value) > CONTENT_LENGTH_DIGITS:
                return self._refuse_framing("an invalid Content-Length")
            self._body_left = int(value)
        return True

    def _refuse_framing(self, what: str) -> bool:
        self._body_left = None
        self.close_connection = True
        self.send_error(400, f"bad request framing: {what}")
        return False

    @property
    def body_length(self) -> int | None:
        """The request body's declared length (0 when there is none); None for a chunked body."""
        return self._body_left

    def read_body(self, limit: int) -> bytes:
        """The whole request body, read within ``body_timeout``; BodyRefused (400, 408, 411, 413) otherwise."""
        length = self._body_left
        if length is None:
            raise BodyRefused(411, "a Content-Length body is needed (chunked bodies are not accepted)")
        if length > limit:
            raise BodyRefused(413, f"request body over {limit} bytes")
        self._reader.deadline = time.monotonic() + self.server.limits.body_timeout
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise BodyRefused(408, f"request body not received within {self.server.limits.body_timeout:g}s") from None
        if len(data) < length:
            self.close_connection = True
            raise BodyRefused(400, f"request body ended at {len(data)} of {length} bytes")
        self._body_left = 0
        return data

    def end_headers(self) -> None:
        """Before a response goes out: a body the route left unread is drained, or this connection ends."""
        if self._code >= 200 and self._body_left != 0 and not self._drain():  # not for a "100 Continue"
            self._body_left = 0
            if not self.close_connection:
                self.send_header("Connection", "close")  # sets close_connection too
            self.close_connection = True
        super().end_headers()

    def _drain(self) -> bool:
        length = self._body_left
        if length is None or length > self.server.limits.drain_max:
            return False
        try:
            self._reader.deadline = time.monotonic() + min(self.server.limits.body_timeout, 5.0)
            ok = len(self.rfile.read(length)) == length
        except OSError:
            ok = False
        self._body_left = 0 if ok else None
        return ok

    def send_header(self, keyword: str, value: str) -> None:
        """Every header value escaped: a control character in it could end the header and start another."""
        super().send_header(keyword, printable(value, limit=8192))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, too many headers) as ``{"error": ...}`` JSON."""
        self.close_connection = True
        body = json.dumps({"error": message or HTTPStatus(code).phrase}).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            if code == 405:
                self.send_header("Allow", self.allowed_methods)
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass


class BodyRefused(Exception):
    """A request body that cannot be read: its HTTP status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BoundedServer(ThreadingHTTPServer):
    """A threading HTTP server whose connections are capped: one thread per connection, at most
    ``limits.max_connections`` of them; one over gets a 503 from the accepting thread and is closed."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the stdlib's 5 drops SYNs when a client opens 8+ parallel connections

    def __init__(self, address: tuple[str, int], handler: type[BoundedHandler], limits: Limits) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"too many connections (over {self.limits.max_connections}); retry"}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"X-Error-Message: too many connections\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            request.setblocking(False)  # never wait on this client in the accepting thread
            request.send(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)
