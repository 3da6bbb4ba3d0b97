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
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from hashlib import sha1
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

from sync.errors import ConfigError, StoreError, UnsafePathError
from sync.paths import check_repo_id, is_commit, safe_relpath
from sync.store import FileEntry, RevisionRecord, Store

logger = logging.getLogger("hubserve.mirror")

DEFAULT_PAGE_SIZE = 1000  # the Hub's page size for non-expanded trees
README_MAX = 1 << 20
HOST_RE = re.compile(r"^[A-Za-z0-9.\-:\[\]]{1,255}$")


class HttpError(Exception):
    """An answer other than 200: status, message, and the Hub's ``X-Error-Code`` where it has one."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.headers = headers or {}


def repo_not_found(repo: str) -> HttpError:
    return HttpError(404, f"Repository {repo!r} not found on this mirror", "RepoNotFound")


# ---- resolution ------------------------------------------------------------------------------
def find_revision(store: Store, repo: str, rev: str) -> RevisionRecord:
    """The verified record that ``rev`` names, or the 404 the Hub would send.

    A ref file that points at a verified commit wins. Otherwise (ref missing, or pointing at a
    commit whose record is gone) the newest verified record that was promoted under that ref name
    is used, and ``main`` falls back to the newest verified revision of the repo: a store filled by
    ``import --ref v1`` or copied without refs/ still answers the client's default revision.
    "Newest" is the largest ``verified_at`` (ISO-8601 UTC, so string order is time order).
    """
    try:
        check_repo_id(repo)
    except ConfigError:
        raise repo_not_found(repo) from None
    record = store.resolve(repo, rev)
    if record is not None:
        return record
    records = store.revisions(repo)
    if not records:
        raise repo_not_found(repo)
    if not is_commit(rev):
        candidates = [r for r in records if rev in r.refs] or (records if rev == "main" else [])
        if candidates:
            return max(candidates, key=lambda r: (r.verified_at, r.commit))
    raise HttpError(404, f"Invalid rev id: {rev} (no verified revision of {repo} has that name)", "RevisionNotFound")


def newest_main(store: Store, repo: str) -> RevisionRecord | None:
    try:
        return find_revision(store, repo, "main")
    except HttpError:
        return None


# ---- JSON shapes -----------------------------------------------------------------------------
def _hub_time(iso: str) -> str:
    """The Hub's timestamp shape (milliseconds, ``Z``), which old clients parse strictly."""
    return iso[:-1] + ".000Z" if iso.endswith("Z") and "." not in iso else iso


@lru_cache(maxsize=64)
def card_data(store: Store, record: RevisionRecord) -> dict[str, Any]:
    """The README's YAML front matter (library_name, tags), read once per revision."""
    entry = record.file("README.md")
    if entry is None or entry.size > README_MAX:
        return {}
    try:
        import yaml

        text = store.file_path(record, "README.md").read_text(encoding="utf-8", errors="replace")
        if not text.startswith("---"):
            return {}
        data = yaml.safe_load(text.split("---", 2)[1])
    except Exception:  # a broken card must not break downloads
        return {}
    return data if isinstance(data, dict) else {}


def sibling(entry: FileEntry, blobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rfilename": entry.path}
    if blobs:
        out.update(size=entry.size, blobId=entry.oid)
        if entry.sha256:
            out["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
    return out


def model_info(store: Store, record: RevisionRecord, blobs: bool) -> dict[str, Any]:
    card = card_data(store, record)
    tags = card.get("tags")
    info: dict[str, Any] = {
        "_id": record.commit[:24],
        "id": record.repo,
        "modelId": record.repo,
        "author": record.repo.split("/")[0],
        "sha": record.commit,
        "lastModified": _hub_time(record.verified_at),
        "createdAt": _hub_time(record.verified_at),
        "private": False,
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "tags": [str(t) for t in tags] if isinstance(tags, list) else [],
        "siblings": [sibling(f, blobs) for f in sorted(record.files, key=lambda f: f.path)],
        "usedStorage": record.size,
    }
    pipeline_tag = record.pipeline_tag or card.get("pipeline_tag")
    if isinstance(pipeline_tag, str):
        info["pipeline_tag"] = pipeline_tag
    if isinstance(card.get("library_name"), str):
        info["library_name"] = card["library_name"]
    return info


def _git_tree_sha(children: dict[str, Any]) -> str:
    """The git tree object id of a directory: what the Hub shows as a directory's ``oid``."""
    def key(item: tuple[str, Any]) -> str:
        return item[0] + ("/" if isinstance(item[1], dict) else "")

    body = b""
    for name, child in sorted(children.items(), key=key):
        mode, oid = ("40000", _git_tree_sha(child)) if isinstance(child, dict) else ("100644", child)
        body += f"{mode} {name}".encode() + b"\0" + bytes.fromhex(oid)
    return sha1(b"tree %d\0" % len(body) + body).hexdigest()


@lru_cache(maxsize=64)
def tree_listing(record: RevisionRecord) -> tuple[dict[str, Any], ...]:
    """Every file and directory of a revision, sorted by path, each directory before its contents."""
    root: dict[str, Any] = {}
    for f in record.files:
        *parents, name = f.path.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = f.oid
    by_path = {f.path: f for f in record.files}
    out: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, child in node.items():
            path = prefix + name
            if isinstance(child, dict):
                out.append({"type": "directory", "oid": _git_tree_sha(child), "size": 0, "path": path})
                walk(child, path + "/")
            else:
                out.append(tree_file(by_path[path]))

    walk(root, "")
    return tuple(sorted(out, key=lambda e: e["path"].split("/")))


def tree_file(entry: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": entry.path}
    if entry.sha256:  # never "xetHash": it would switch clients to the xet protocol
        out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return out


def tree_entries(record: RevisionRecord, base: str, recursive: bool) -> list[dict[str, Any]]:
    """The entries under directory ``base`` ('' for the root): one level, or all of them."""
    everything = tree_listing(record)
    if base and not any(e["path"] == base and e["type"] == "directory" for e in everything):
        raise HttpError(404, f"{base}: no such directory at {record.commit}", "EntryNotFound", record.commit)
    prefix = base + "/" if base else ""
    under = [e for e in everything if e["path"].startswith(prefix)]
    return under if recursive else [e for e in under if "/" not in e["path"][len(prefix):]]


# ---- ranges ----------------------------------------------------------------------------------
def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_inclusive)`` of a single ``bytes=`` range, None to send the whole file.

    Raises a 416 HttpError when the range is valid but outside the file. Malformed or multi-range
    headers are ignored (RFC 9110 allows answering 200 with the full body).
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix range: the last N bytes
        if int(m[2]) == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - int(m[2])), size - 1
    start = int(m[1])
    if m[2] and int(m[2]) < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    return start, min(int(m[2]), size - 1) if m[2] else size - 1


def _unsatisfiable(size: int) -> HttpError:
    return HttpError(416, f"Range not satisfiable (file size {size})", headers={"Content-Range": f"bytes */{size}"})


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")[:1000]


# ---- the HTTP layer ----------------------------------------------------------------------------
@dataclass
class Request:
    """One parsed request target: raw (still percent-encoded) path segments and the query."""

    segments: list[str]
    query: dict[str, list[str]]

    def flag(self, name: str, default: bool = False) -> bool:
        values = self.query.get(name)
        return default if not values else values[-1].lower() in ("1", "true", "yes")


class MirrorHandler(BaseHTTPRequestHandler):
    """Routes one connection's requests; GET and HEAD only."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections for HEAD + GET
    server_version = "hubserve-mirror"
    timeout = 120  # idle keep-alive or stalled client: the thread ends instead of waiting forever
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

    def _not_allowed(self) -> None:
        self._dispatch(head=False, allowed=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, oversized headers) as JSON, and logged."""
        self.close_connection = True
        self._status, self._sent = 0, 0
        self._send_error(HttpError(code, message or HTTPStatus(code).phrase), head=self.command == "HEAD")
        self._log(time.monotonic())

    def _dispatch(self, head: bool, allowed: bool = True) -> None:
        started = time.monotonic()
        self._status, self._sent = 0, 0
        try:
            if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
                self.close_connection = True  # a request body we do not read would corrupt the next request
            if not allowed:
                raise HttpError(405, f"{self.command} not allowed: this mirror is read-only",
                                headers={"Allow": "GET, HEAD"})
            self._route(head)
        except HttpError as e:
            self._send_error(e, head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # one bad request must not take the mirror down
            logger.exception("mirror: %s %s failed", self.command, self.path)
            if self._status:  # the response has started: all we can do is end the connection
                self.close_connection = True
            else:
                self._send_error(HttpError(500, f"internal error: {type(e).__name__}"), head)
        finally:
            self._log(started)

    def _log(self, started: float) -> None:
        ms = (time.monotonic() - started) * 1000
        method, path = getattr(self, "command", None) or "-", getattr(self, "path", "") or "-"
        logger.info("%s %s %d %d %.1fms", method, path, self._status, self._sent, ms)

    def _route(self, head: bool) -> None:
        target = urlsplit(self.path)
        req = Request([s for s in target.path.split("/") if s], parse_qs(target.query))
        seg = req.segments
        if seg in (["health"], ["api", "health"]):
            return self._send_json({"status": "ok"}, head)
        if seg == ["api", "agent-harnesses"]:  # clients >= 1.19 ask once a day; always open
            return self._send_json({"standardEnvVars": [], "harnesses": {}}, head)
        self._check_token()
        if seg[:2] == ["api", "models"]:
            return self._api(req, head)
        if len(seg) >= 5 and seg[2] == "resolve" and seg[0] != "api":
            return self._resolve(seg[0], seg[1], seg[3:], head)
        if len(seg) >= 6 and seg[0] == "models" and seg[3] == "resolve":
            return self._resolve(seg[1], seg[2], seg[4:], head)
        raise HttpError(404, f"no route for {target.path}")

    def _check_token(self) -> None:
        token = self.server.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HttpError(401, "Invalid credentials: this mirror needs 'Authorization: Bearer <token>'",
                            "RepoNotFound", headers={"WWW-Authenticate": 'Bearer realm="hubserve-mirror"'})

    def _api(self, req: Request, head: bool) -> None:
        seg = [unquote(s) for s in req.segments[2:]]
        if not seg:
            return self._send_json(self._list_models(), head)
        repo = "/".join(seg[:2])
        if len(seg) == 2:
            return self._send_json(self._info(repo, "main", req), head)
        if len(seg) >= 4 and seg[2] == "revision":
            return self._send_json(self._info(repo, "/".join(seg[3:]), req), head)
        if len(seg) >= 4 and seg[2] == "tree":
            return self._tree(repo, req, head)
        raise HttpError(404, f"no route for /api/models/{'/'.join(seg)}")

    def _list_models(self) -> list[dict[str, Any]]:
        out = []
        for repo in self.server.store.repos():
            record = newest_main(self.server.store, repo)
            if record is not None:
                out.append({"id": repo, "modelId": repo, "sha": record.commit, "private": False})
        return out

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
        try:
            offset = int(req.query.get("cursor", ["0"])[-1])
        except ValueError:
            offset = -1
        if offset < 0:
            raise HttpError(400, "invalid cursor")
        page_size = self.server.page_size
        headers = {"X-Repo-Commit": record.commit}
        if offset + page_size < len(entries):
            headers["Link"] = f'<{self._next_page_url(repo, record.commit, base, req, offset + page_size)}>; rel="next"'
        self._send_json(list(entries[offset:offset + page_size]), head, headers)

    def _next_page_url(self, repo: str, commit: str, base: str, req: Request, cursor: int) -> str:
        """Absolute (the client follows it verbatim) and pinned to the commit, so pages never mix revisions."""
        host = self.headers.get("X-Forwarded-Host") or self.headers.get("Host") or ""
        if not HOST_RE.match(host):
            host = f"{self.server.server_address[0]!s}:{self.server.server_address[1]}"
        scheme = "https" if self.headers.get("X-Forwarded-Proto") == "https" else "http"
        path = f"/api/models/{repo}/tree/{commit}" + (f"/{quote(base)}" if base else "")
        recursive = "true" if req.flag("recursive") else "false"
        expand = "true" if req.flag("expand") else "false"
        return f"{scheme}://{host}{path}?recursive={recursive}&expand={expand}&cursor={cursor}"

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
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json; charset=utf-8")
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
        headers["X-Error-Message"] = _header_safe(err.message)
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
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
    headers = {
        "X-Repo-Commit": record.commit,
        "ETag": f'"{entry.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream",
        "Content-Disposition": f"{'attachment' if entry.lfs else 'inline'}; "
                               f"filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\"",
    }
    if entry.sha256:
        headers["X-Linked-Etag"] = f'"{entry.sha256}"'
        headers["X-Linked-Size"] = str(entry.size)
    return headers


class MirrorServer(ThreadingHTTPServer):
    """The mirror: a threading HTTP/1.1 server with daemon threads over one store."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the stdlib's 5 drops SYNs when a client opens 8+ parallel downloads

    def __init__(
        self, store: Store, host: str = "127.0.0.1", port: int = 8090, token: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.store, self.token, self.page_size = store, token, max(1, page_size)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((host, port), MirrorHandler)

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
    page_size: int = DEFAULT_PAGE_SIZE,
) -> MirrorServer:
    """A bound, not yet serving mirror (port 0 picks a free port: see ``server_address``)."""
    return MirrorServer(store, host, port, token, page_size)


def serve_mirror(store: Store, host: str = "127.0.0.1", port: int = 8090, token: str | None = None) -> None:
    """Serve until interrupted, logging one line per request to stderr."""
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    server = make_mirror(store, host, port, token)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
