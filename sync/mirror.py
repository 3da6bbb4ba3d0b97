"""``hubserve mirror``: a read-only Hub-compatible HTTP endpoint over the store.

Speaks the part of the Hub protocol that ``huggingface_hub`` downloads use (see "The Hub download
protocol" in ARCHITECTURE.md): revision info, recursive trees with ``Link`` pagination, HEAD/GET on
``resolve`` with Range, and the ``X-Error-Code`` 404s. Only verified revisions (those with a record)
exist here. Built on the standard library's threading HTTP server rather than an ASGI stack so file
bodies go out with ``os.sendfile`` (zero copy), Range requests included.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import mimetypes
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from sync.errors import StoreError, UnsafePathError
from sync.httpbounds import BodyRefused, BoundedHandler, BoundedServer, Limits
from sync.hub_protocol import (
    DEFAULT_PAGE_SIZE,
    HttpError,
    check_host,
    find_revision,
    header_safe,
    parse_paths_body,
    parse_range,
    tree_entries,
)
from sync.keys import KeyRecord, KeyRing
from sync.mirror_catalog import list_refs, model_info, paths_info, search_models
from sync.mirror_page import render_index
from sync.mirror_runtime import RecordCache, run_workers
from sync.paths import has_control, printable, safe_relpath
from sync.store import FileEntry, RevisionRecord, Store

logger = logging.getLogger("hubserve.mirror")


# ---- the HTTP layer ----------------------------------------------------------------------------
@dataclass
class Request:
    """One parsed request target: raw (still percent-encoded) path segments and the query."""

    segments: list[str]
    query: dict[str, list[str]]

    def flag(self, name: str, default: bool = False) -> bool:
        values = self.query.get(name)
        return default if not values else values[-1].lower() in ("1", "true", "yes")


class MirrorHandler(BoundedHandler):
    """Routes one connection's requests: GET and HEAD, and POST where the Hub takes one (paths-info).

    HTTP/1.1 keep-alive (clients reuse connections for HEAD + GET); deadlines, the connection cap and the
    request body's framing come from ``BoundedHandler``.
    """

    server_version = "hubserve-mirror"
    server: MirrorServer
    _status = 0
    _sent = 0

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one line per request is logged by ``_dispatch`` (without headers, so no token)."""

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        """Only ``/api/models/{org}/{name}/paths-info/{rev}`` (a read that the client sends as a form POST)."""
        seg = [s for s in urlsplit(self.path).path.split("/") if s]
        self._dispatch(head=False, allowed=len(seg) >= 6 and seg[:2] == ["api", "models"] and seg[4] == "paths-info")

    def _not_allowed(self) -> None:
        self._dispatch(head=False, allowed=False)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, oversized headers) as JSON, and logged."""
        self.close_connection = True
        self._status, self._sent = 0, 0
        headers = {"Connection": "close", **({"Allow": self.allowed_methods} if code == 405 else {})}
        refusal = HttpError(code, message or HTTPStatus(code).phrase, headers=headers)
        self._send_error(refusal, head=self.command == "HEAD")
        self._log(time.monotonic())

    def _dispatch(self, head: bool, allowed: bool = True) -> None:
        started = time.monotonic()
        self._status, self._sent = 0, 0
        try:
            if not allowed:
                raise HttpError(405, f"{self.command} not allowed here: this mirror is read-only",
                                headers={"Allow": "GET, HEAD"})
            self._route(head)
        except HttpError as e:
            self._send_error(e, head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # one bad request must not take the mirror down
            logger.exception("mirror: %s %s failed", printable(self.command), printable(self.path))
            if self._status:  # the response has started: all we can do is end the connection
                self.close_connection = True
            else:
                self._send_error(HttpError(500, f"internal error: {type(e).__name__}"), head)
        finally:
            self._log(started)

    def _log(self, started: float) -> None:
        ms = (time.monotonic() - started) * 1000
        method, path = getattr(self, "command", None) or "-", getattr(self, "path", "") or "-"
        logger.info("%s %s %d %d %.1fms", printable(method), printable(path), self._status, self._sent, ms)

    def _route(self, head: bool) -> None:
        target = urlsplit(self.path)
        if has_control(unquote(target.path)):
            raise HttpError(400, "the request path has a control character (below 0x20, or 0x7f)")
        req = Request([s for s in target.path.split("/") if s], parse_qs(target.query))
        seg = req.segments
        if seg in (["health"], ["api", "health"]):
            return self._send_json({"status": "ok"}, head)
        if seg == ["api", "agent-harnesses"]:  # clients >= 1.19 ask once a day; always open
            return self._send_json({"standardEnvVars": [], "harnesses": {}}, head)
        self._check_token()
        if not seg:
            return self._send_html(render_index(self.server.store, self._base_url()), head)
        if seg[:2] == ["api", "models"]:
            return self._api(req, head)
        if len(seg) >= 5 and seg[2] == "resolve" and seg[0] != "api":
            return self._resolve(seg[0], seg[1], seg[3:], head)
        if len(seg) >= 6 and seg[0] == "models" and seg[3] == "resolve":
            return self._resolve(seg[1], seg[2], seg[4:], head)
        raise HttpError(404, f"no route for {target.path}")

    def _check_token(self) -> None:
        """The mirror's token, or a named key (``hubserve keys``) with the ``mirror`` scope, as the bearer."""
        token, keys = self.server.token, self.server.keys
        if token is None and (keys is None or not self.server.keys_seen()):
            return
        given = self.headers.get("Authorization", "")
        if token is not None and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return
        scheme, _, key = given.partition(" ")
        record = self.server.find_key(key.strip()) if keys is not None and scheme.lower() == "bearer" else None
        if record is not None and record.expired():
            raise HttpError(401, f"API key `{record.name}` expired at {record.expires}", "RepoNotFound",
                            headers={"WWW-Authenticate": 'Bearer realm="hubserve-mirror"'})
        if record is not None and "mirror" not in record.scopes:
            raise HttpError(403, f"API key `{record.name}` lacks the `mirror` scope this mirror needs "
                            f"(`hubserve keys update {record.name} --scopes ...`)")
        if record is None:
            raise HttpError(401, "Invalid credentials: this mirror needs 'Authorization: Bearer <token>' (its token "
                            "or an API key with the mirror scope)",
                            "RepoNotFound", headers={"WWW-Authenticate": 'Bearer realm="hubserve-mirror"'})

    def _api(self, req: Request, head: bool) -> None:
        seg = [unquote(s) for s in req.segments[2:]]
        if not seg:
            return self._list_models(req, head)
        repo = "/".join(seg[:2])
        if self.command == "POST":
            if len(seg) >= 4 and seg[2] == "paths-info":
                return self._paths_info(repo, req, head)
            raise HttpError(405, "POST not allowed: this mirror is read-only", headers={"Allow": "GET, HEAD"})
        if len(seg) == 2:
            return self._send_json(self._info(repo, "main", req), head)
        if seg[2:] == ["refs"]:
            return self._send_json(list_refs(self.server.store, repo, req.flag("include_prs")), head)
        if len(seg) >= 4 and seg[2] == "revision":
            return self._send_json(self._info(repo, "/".join(seg[3:]), req), head)
        if len(seg) >= 4 and seg[2] == "tree":
            return self._tree(repo, req, head)
        raise HttpError(404, f"no route for /api/models/{'/'.join(seg)}")

    def _list_models(self, req: Request, head: bool) -> None:
        """``HfApi.list_models``: filtered and sorted, paged with ``Link: rel="next"`` like the Hub."""
        items = search_models(self.server.store, req.query)
        offset = _int_param(req, "cursor", 0)
        limit = _int_param(req, "limit", 0)
        page = min(limit or self.server.page_size, self.server.page_size)
        headers = {}
        if offset + page < len(items):
            query = [(k, v) for k, vs in req.query.items() if k != "cursor" for v in vs] + [("cursor", offset + page)]
            headers["Link"] = f'<{self._base_url()}/api/models?{urlencode(query)}>; rel="next"'
        self._send_json(items[offset:offset + page], head, headers)

    def _paths_info(self, repo: str, req: Request, head: bool) -> None:
        rev, _ = split_rev(req.segments[5:])  # api models org name paths-info <rev>
        record = find_revision(self.server.store, repo, rev)
        self._send_json(paths_info(record, self._form_paths()), head, {"X-Repo-Commit": record.commit})

    def _form_paths(self) -> list[str]:
        """``paths`` from a form (what huggingface_hub sends) or JSON body, read whole (at most 1 MiB)."""
        try:
            body = self.read_body(1 << 20)
        except BodyRefused as e:
            raise HttpError(e.status, f"paths-info: {e.message}") from None
        return parse_paths_body(body, self.headers.get("Content-Type", ""))

    def _info(self, repo: str, rev: str, req: Request) -> dict[str, Any]:
        record = find_revision(self.server.store, repo, rev)
        return model_info(self.server.store, record, req.flag("blobs"))

    def _tree(self, repo: str, req: Request, head: bool) -> None:
        rev, rest = split_rev(req.segments[5:])  # api models org name tree <rev> [path...]
        record = find_revision(self.server.store, repo, rev)
        base = unquote("/".join(rest)).strip("/")
        if base:
            base = _safe_path(base)
        entries = tree_entries(record, base, req.flag("recursive"))
        offset = _int_param(req, "cursor", 0)
        page_size = self.server.page_size
        headers = {"X-Repo-Commit": record.commit}
        if offset + page_size < len(entries):
            headers["Link"] = f'<{self._next_page_url(repo, record.commit, base, req, offset + page_size)}>; rel="next"'
        self._send_json(list(entries[offset:offset + page_size]), head, headers)

    def _base_url(self) -> str:
        """This mirror's URL as the client reached it: the Host header if it is a valid host[:port], else the
        bound address. ``X-Forwarded-Host``/``-Proto`` count only with ``trust_forwarded`` (behind a proxy
        that sets them): otherwise any client could point the ``Link`` URLs it is sent elsewhere."""
        scheme, host = "http", check_host(self.headers.get("Host"))
        if self.server.trust_forwarded:
            host = check_host(_first(self.headers.get("X-Forwarded-Host"))) or host
            scheme = "https" if _first(self.headers.get("X-Forwarded-Proto")) == "https" else "http"
        if host is None:
            addr, port = str(self.server.server_address[0]), self.server.server_address[1]
            host = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        return f"{scheme}://{host}"

    def _next_page_url(self, repo: str, commit: str, base: str, req: Request, cursor: int) -> str:
        """Absolute (the client follows it verbatim) and pinned to the commit, so pages never mix revisions."""
        path = f"/api/models/{repo}/tree/{commit}" + (f"/{quote(base)}" if base else "")
        recursive = "true" if req.flag("recursive") else "false"
        expand = "true" if req.flag("expand") else "false"
        return f"{self._base_url()}{path}?recursive={recursive}&expand={expand}&cursor={cursor}"

    def _resolve(self, org: str, name: str, segments: list[str], head: bool) -> None:
        rev, rest = split_rev(segments)
        path = _safe_path(unquote("/".join(rest)))
        record = find_revision(self.server.store, f"{unquote(org)}/{unquote(name)}", rev)
        entry = record.file(path)
        if entry is None:
            raise HttpError(404, f"{path}: no such file at {record.commit}", "EntryNotFound", record.commit)
        self._send_file(record, entry, head)

    # ---- responses ---------------------------------------------------------------------------
    def _send_json(self, data: Any, head: bool, headers: dict[str, str] | None = None, status: int = 200) -> None:
        body = json.dumps(data, separators=(",", ":")).encode()
        self._send_body(body, "application/json; charset=utf-8", head, headers or {}, status)

    def _send_html(self, page: str, head: bool) -> None:
        headers = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                   "X-Content-Type-Options": "nosniff"}
        self._send_body(page.encode(), "text/html; charset=utf-8", head, headers, 200)

    def _send_body(self, body: bytes, content_type: str, head: bool, headers: dict[str, str], status: int) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self._sent += len(body)

    def _send_error(self, err: HttpError, head: bool) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        headers["X-Error-Message"] = header_safe(err.message)
        try:
            self._send_json({"error": err.message}, head, headers, err.status)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def _send_file(self, record: RevisionRecord, entry: FileEntry, head: bool) -> None:
        try:
            f = self.server.store.file_path(record, entry.path).open("rb")
        except (OSError, StoreError) as e:
            raise HttpError(500, f"{record.repo}@{record.commit[:12]}: {entry.path}: blob unreadable "
                                 f"({type(e).__name__}); run `hubserve verify`") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                raise HttpError(500, f"{record.repo}: {entry.path}: blob has {size} bytes, the record says "
                                     f"{entry.size}; run `hubserve verify`")
            rng = self._range(entry, size)
            start, end = rng or (0, size - 1)
            self.send_response(206 if rng else 200)
            for k, v in file_headers(record, entry).items():
                self.send_header(k, v)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if not head and end >= start:
                self._sendfile(f, start, end - start + 1)

    def _range(self, entry: FileEntry, size: int) -> tuple[int, int] | None:
        if_range = self.headers.get("If-Range")
        if if_range and if_range.strip('W/"') != entry.etag:
            return None  # the client's partial copy is of another file: send it all
        return parse_range(self.headers.get("Range"), size)

    def _sendfile(self, f: BinaryIO, offset: int, count: int) -> None:
        """Zero-copy body; a client that goes away mid-body just ends this connection."""
        try:
            sent = self.connection.sendfile(f, offset, count)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            logger.debug("mirror: client left during %s (%s)", self.path, type(e).__name__)
            self.close_connection = True
            return
        self._sent += sent
        if sent != count:
            self.close_connection = True


def _first(value: str | None) -> str | None:
    """The first of a proxy chain's comma-separated values (the proxy nearest the client set it)."""
    return value.split(",", 1)[0].strip() if value else None


def _int_param(req: Request, name: str, default: int) -> int:
    try:
        value = int(req.query.get(name, [str(default)])[-1])
    except ValueError:
        value = -1
    if value < 0:
        raise HttpError(400, f"invalid {name}")
    return value


def split_rev(segments: list[str]) -> tuple[str, list[str]]:
    """The revision (one %2F-encoded segment, or an unencoded ``refs/pr/1`` as the Hub allows) and the rest."""
    rev = unquote(segments[0])
    if rev == "refs" and len(segments) >= 3:  # a git ref can never be named plain "refs"
        return f"refs/{unquote(segments[1])}/{unquote(segments[2])}", segments[3:]
    return rev, segments[1:]


def _safe_path(path: str) -> str:
    try:
        return safe_relpath(path)
    except UnsafePathError as e:
        raise HttpError(400, str(e)) from None


def file_headers(record: RevisionRecord, entry: FileEntry) -> dict[str, str]:
    """What ``huggingface_hub`` reads from HEAD/GET on resolve (never any ``X-Xet-*``)."""
    name = entry.path.rsplit("/", 1)[-1]
    # RFC 6266: filename* carries the exact name percent-encoded; filename is a printable-ASCII fallback.
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    headers = {
        "X-Repo-Commit": record.commit,
        "ETag": f'"{entry.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream",
        "Content-Disposition": f"{'attachment' if entry.lfs else 'inline'}; "
                               f"filename*=UTF-8''{quote(name, safe='')}; filename=\"{ascii_name}\"",
    }
    if entry.sha256:
        headers["X-Linked-Etag"] = f'"{entry.sha256}"'
        headers["X-Linked-Size"] = str(entry.size)
    return headers


ENV_PREFIX = "HUBSERVE_MIRROR_"  # HUBSERVE_MIRROR_MAX_CONNECTIONS, _HEADER_TIMEOUT, ... (httpbounds.Limits)


def trust_forwarded_env() -> bool:
    return os.environ.get(f"{ENV_PREFIX}TRUST_FORWARDED", "").lower() in ("1", "true", "yes")


class MirrorServer(BoundedServer):
    """The mirror: a threading HTTP/1.1 server over one store, its connections capped (``limits``)."""

    def __init__(
        self, store: Store, host: str = "127.0.0.1", port: int = 8090, token: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE, *, trust_forwarded: bool = False, limits: Limits | None = None,
        keys_file: Path | None = None,
    ) -> None:
        self.store: Store = RecordCache(store.root)
        self.token, self.page_size = token, max(1, page_size)
        self.keys = KeyRing(keys_file) if keys_file is not None else None  # named keys with the mirror scope
        self._keys_lock = threading.Lock()  # handler threads share the ring (it re-reads the file on change)
        self.trust_forwarded = trust_forwarded
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((host, port), MirrorHandler, limits or Limits())

    def keys_seen(self) -> bool:
        """Named-key auth is on once the keys file has existed (deleting it must not open the mirror)."""
        if self.keys is None:
            return False
        with self._keys_lock:
            self.keys.refresh()
            return self.keys.seen

    def find_key(self, key: str) -> KeyRecord | None:
        if self.keys is None:
            return None
        with self._keys_lock:
            return self.keys.find(key)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            logger.debug("mirror: connection from %s ended: %s", client_address, exc)
        else:
            logger.exception("mirror: error on a connection from %s", client_address)

    def server_close(self) -> None:
        """Stop listening and end open keep-alive connections, so no handler thread lingers."""
        super().server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def make_mirror(
    store: Store, host: str = "127.0.0.1", port: int = 8090, token: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE, *, trust_forwarded: bool = False, limits: Limits | None = None,
    keys_file: Path | None = None,
) -> MirrorServer:
    """A bound, not yet serving mirror (port 0 picks a free port: see ``server_address``). ``keys_file``: the
    gateway's keys file; its keys with the ``mirror`` scope are accepted as well as ``token``."""
    return MirrorServer(store, host, port, token, page_size, trust_forwarded=trust_forwarded, limits=limits,
                        keys_file=keys_file)


def keys_file_env() -> Path | None:
    value = os.environ.get(f"{ENV_PREFIX}KEYS_FILE", "").strip()
    return Path(value) if value else None


def serve_mirror(
    store: Store, host: str = "127.0.0.1", port: int = 8090, token: str | None = None, workers: int = 1,
    trust_forwarded: bool | None = None, limits: Limits | None = None, keys_file: Path | None = None,
) -> None:
    """Serve until interrupted or terminated, logging one line per request to stderr.

    ``trust_forwarded`` and ``limits`` default to ``$HUBSERVE_MIRROR_TRUST_FORWARDED`` and
    ``$HUBSERVE_MIRROR_MAX_CONNECTIONS`` / ``_IDLE_TIMEOUT`` / ``_HEADER_TIMEOUT`` / ``_BODY_TIMEOUT`` (seconds);
    ``keys_file`` to ``$HUBSERVE_MIRROR_KEYS_FILE`` (keys with the mirror scope are accepted besides the token).
    """
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    trust = trust_forwarded_env() if trust_forwarded is None else trust_forwarded
    mirror = make_mirror(store, host, port, token, trust_forwarded=trust, limits=limits or Limits.from_env(ENV_PREFIX),
                         keys_file=keys_file or keys_file_env())
    run_workers(mirror, workers)
