"""The Hub API over the store, without HTTP: revision lookup, model info, trees, Range parsing.

Pure functions shared by the mirror's request handler; each returns the JSON the Hub would send or
raises HttpError carrying the status and ``X-Error-Code`` the Hub would use.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from hashlib import sha1
from typing import Any
from urllib.parse import parse_qs

from sync.errors import ConfigError
from sync.paths import check_repo_id, is_commit, printable
from sync.store import FileEntry, RevisionRecord, Store

DEFAULT_PAGE_SIZE = 1000  # the Hub's page size for non-expanded trees
README_MAX = 1 << 20
# A Host value: a DNS name (labels of letters, digits, '-', '_'), IPv4, or a bracketed IPv6; an optional port.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOST_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]{{2,45}}\])(?::(?P<port>[0-9]{{1,5}}))?\Z")
RANGE_DIGITS = 18  # a Range number longer than this is "past any file" (int() of 4,300 digits raises)


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
def hub_time(iso: str) -> str:
    """The Hub's timestamp shape (milliseconds, ``Z``), which old clients parse strictly."""
    return iso[:-1] + ".000Z" if iso.endswith("Z") and "." not in iso else iso


def small_file(store: Store, record: RevisionRecord, path: str, limit: int) -> bytes | None:
    """A verified file's bytes when it exists and is at most ``limit`` bytes (cards, configs), else None."""
    entry = record.file(path)
    if entry is None or entry.size > limit:
        return None
    try:
        return store.file_path(record, path).read_bytes()
    except OSError:
        return None


@lru_cache(maxsize=64)
def card_data(store: Store, record: RevisionRecord) -> dict[str, Any]:
    """The README's YAML front matter (library_name, tags), read once per revision; JSON-safe (dates as text)."""
    raw = small_file(store, record, "README.md", README_MAX)
    text = raw.decode("utf-8", "replace") if raw else ""
    if not text.startswith("---"):
        return {}
    try:
        import yaml

        data = yaml.safe_load(text.split("---", 2)[1])
        return dict(json.loads(json.dumps(data, default=str))) if isinstance(data, dict) else {}
    except Exception:  # a broken card must not break downloads
        return {}


def sibling(entry: FileEntry, blobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rfilename": entry.path}
    if blobs:
        out.update(size=entry.size, blobId=entry.oid)
        if entry.sha256:
            out["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
    return out


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
def check_host(value: str | None) -> str | None:
    """A Host / X-Forwarded-Host value if it is a valid ``host[:port]`` (at most 255 characters), else None."""
    m = HOST_RE.match(value) if value and len(value) <= 255 else None
    return value if m and (m["port"] is None or 0 < int(m["port"]) < 65536) else None


def _range_number(digits: str) -> int:
    return int(digits) if len(digits) <= RANGE_DIGITS else 10**RANGE_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_inclusive)`` of a single ``bytes=`` range, None to send the whole file.

    Raises a 416 HttpError when the range is valid but outside the file. Malformed or multi-range
    headers are ignored (RFC 9110 allows answering 200 with the full body).
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not m or (not m[1] and not m[2]):
        return None
    first, last = _range_number(m[1]) if m[1] else None, _range_number(m[2]) if m[2] else None
    if first is None:  # suffix range: the last N bytes
        if not last or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None
    if first >= size:
        raise _unsatisfiable(size)
    return first, min(last, size - 1) if last is not None else size - 1


def _unsatisfiable(size: int) -> HttpError:
    return HttpError(416, f"Range not satisfiable (file size {size})", headers={"Content-Range": f"bytes */{size}"})


def parse_paths_body(body: bytes, content_type: str) -> list[str]:
    """``paths`` of a paths-info request: a form (what huggingface_hub sends) or a JSON object."""
    if content_type.startswith("application/json"):
        try:
            paths = json.loads(body).get("paths", [])
        except (ValueError, AttributeError, RecursionError):
            raise HttpError(400, "paths-info: body is not a JSON object") from None
    else:
        paths = parse_qs(body.decode("utf-8", "replace")).get("paths", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise HttpError(400, "paths-info: 'paths' must be a list of strings")
    return paths


def header_safe(text: str) -> str:
    """Text for a header value: ASCII (others as ``\\uXXXX``), control characters escaped, at most ~1000 chars."""
    return printable(text.encode("ascii", "backslashreplace").decode("ascii"), limit=1000)


