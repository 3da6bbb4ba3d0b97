"""File bodies over plain ``http.client`` with ``readinto`` a reused buffer: little CPU per byte.

sync hashes every byte as it lands, on machines with few cores; httpx's per-64-KiB parsing costs
about half of a loopback download's CPU, ``readinto`` a 1 MiB buffer almost none. Metadata calls and
downloads through an HTTP proxy stay on httpx (see ``Upstream``). Redirects are followed (the Hub
sends LFS files to a CDN) and ``Authorization`` is dropped when one leaves the origin.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
BUFFER = 1 << 20


class RawResponse:
    """The parts of a response sync looks at, shaped like httpx's (status_code, headers, text)."""

    def __init__(self, resp: http.client.HTTPResponse, buffer: memoryview) -> None:
        self._resp = resp
        self._buffer = buffer
        self.status_code = resp.status
        self.headers = resp.headers

    @property
    def text(self) -> str:
        return self._resp.read(64 * 1024).decode("utf-8", "replace")

    def iter_into(self) -> Iterator[memoryview]:
        """Chunks of the body, each valid until the next one is read (one buffer, reused)."""
        while n := self._resp.readinto(self._buffer):
            yield self._buffer[:n]
        if self._resp.length:  # the server closed before Content-Length bytes
            raise http.client.IncompleteRead(b"", self._resp.length)


def uses_proxy(url: str) -> bool:
    """Whether the environment routes ``url`` through a proxy (then httpx, which speaks proxies, is used)."""
    parts = urlsplit(url)
    return parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")


class BodyFetcher:
    """Per-thread keep-alive connections and buffers for streaming GETs."""

    def __init__(self, headers: dict[str, str], timeout: float) -> None:
        self._headers = headers
        self._timeout = timeout
        self._local = threading.local()
        self._ssl = ssl.create_default_context()

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        conn = pool.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=self._timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self._timeout)
            pool[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        pool = self._local.__dict__.get("pool", {})
        conn = pool.pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    @contextmanager
    def get(self, url: str, headers: dict[str, str]) -> Iterator[RawResponse]:
        """GET ``url`` following redirects; the body must be read (or the context left) before the next GET."""
        buffer = self._local.__dict__.setdefault("buffer", memoryview(bytearray(BUFFER)))
        origin = urlsplit(url)[:2]
        send = {**self._headers, **headers}
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise http.client.HTTPException(f"unsupported URL scheme in {url!r}")
            if parts[:2] != origin:
                send.pop("Authorization", None)
            conn = self._conn(parts.scheme, parts.netloc)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target or "/", headers=send)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                self._drop(parts.scheme, parts.netloc)
                raise
            location = resp.headers.get("Location")
            if resp.status in REDIRECTS and location:
                resp.read()
                url = urljoin(url, location)
                continue
            try:
                yield RawResponse(resp, buffer)
            except BaseException:
                self._drop(parts.scheme, parts.netloc)  # body not fully read: the connection is unusable
                raise
            if not resp.isclosed():
                self._drop(parts.scheme, parts.netloc)
            return
        raise http.client.HTTPException(f"more than {MAX_REDIRECTS} redirects from {url}")
