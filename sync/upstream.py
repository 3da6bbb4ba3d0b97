"""The only module that talks to an upstream Hub endpoint (the Hub, or another hubserve mirror).

Metadata comes from the documented Hub API (revision info, recursive tree with ``Link`` pagination);
files stream from ``/resolve/`` into temp files, hashed as they land, resumable with ``Range``.
Transient failures (5xx, 429, resets, truncated bodies) are retried with bounded exponential backoff
and jitter, obeying ``Retry-After``; 401/403/404 are final and explained in one line.
httpx is used directly (not ``HfApi``) for exact control of retries, resume and streaming hashes.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from sync.bodystream import BodyFetcher, uses_proxy
from sync.diskio import disk_errors
from sync.errors import (
    AuthError,
    EntryNotFound,
    RepoNotFound,
    RevisionNotFound,
    TransientUpstreamError,
    UpstreamError,
    VerificationError,
)
from sync.hashing import CHUNK, FileHasher
from sync.paths import is_commit, safe_relpath
from sync.store import FileEntry

log = logging.getLogger("hubserve.upstream")
USER_AGENT = "hubserve/0.1 (huggingface_hub-compatible)"
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class RevisionInfo:
    commit: str
    pipeline_tag: str | None


ProgressCallback = Callable[[int], None]


class Upstream:
    """A Hub endpoint, with a token that is sent but never logged."""

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        token_env: str = "HF_TOKEN",
        retries: int = 6,
        backoff_initial: float = 0.5,
        backoff_max: float = 20.0,
        timeout: float = 30.0,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token_env = token_env
        self.retries = retries
        self._wait = wait_exponential_jitter(initial=backoff_initial, max=backoff_max, jitter=backoff_initial)
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._has_token = bool(token)
        self._bodies = BodyFetcher(headers, timeout)
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=True,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- retry machinery ---------------------------------------------------------------------
    def _wait_for(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientUpstreamError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        return float(self._wait(state))

    def _retrying(self, what: str) -> Retrying:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s: %s; retry %d/%d", what, exc, state.attempt_number, self.retries)

        return Retrying(
            retry=retry_if_exception_type((TransientUpstreamError, httpx.TransportError)),
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait_for,
            before_sleep=before_sleep,
            reraise=True,
        )

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return self._retrying(what)(fn)
        except httpx.TransportError as e:
            raise UpstreamError(f"{what}: cannot reach {self.endpoint} ({type(e).__name__}: {e})") from e
        except TransientUpstreamError as e:
            raise UpstreamError(f"{what}: gave up after {self.retries + 1} attempts: {e}") from e

    # ---- errors ------------------------------------------------------------------------------
    def _raise_for(self, resp: httpx.Response, repo: str, revision: str | None = None, path: str | None = None) -> None:
        if resp.status_code < 400:
            return
        code = resp.headers.get("X-Error-Code", "")
        server_msg = resp.headers.get("X-Error-Message", "")
        where = f"{repo}" + (f"@{revision}" if revision else "") + (f": {path}" if path else "")
        status = resp.status_code
        if status == 429 or status >= 500:
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            raise TransientUpstreamError(f"{where}: HTTP {status} from {self.endpoint}", retry_after)
        token_hint = (
            f"the token in ${self.token_env} may be wrong or lack access"
            if self._has_token
            else f"set a token in ${self.token_env} if the repo is private or gated"
        )
        if code == "GatedRepo" or (status == 403 and "gated" in server_msg.lower()):
            raise AuthError(f"{where}: the repo is gated; accept its terms on the Hub, then {token_hint}")
        if code == "RevisionNotFound":
            raise RevisionNotFound(f"{where}: revision not found on {self.endpoint}; check `revision` in models.toml")
        if code == "EntryNotFound":
            raise EntryNotFound(f"{where}: file not found at that revision on {self.endpoint}")
        if code == "RepoNotFound" or status == 404:
            raise RepoNotFound(f"{repo}: repository not found on {self.endpoint}; check `repo`, or {token_hint}")
        if status in (401, 403):
            raise AuthError(f"{where}: access denied (HTTP {status}) by {self.endpoint}; {token_hint}")
        raise UpstreamError(f"{where}: HTTP {status} from {self.endpoint}: {server_msg or resp.text[:200]}")

    # ---- metadata ----------------------------------------------------------------------------
    def resolve(self, repo: str, revision: str) -> RevisionInfo:
        """Resolve a branch, tag or commit to a commit (and the repo's pipeline tag)."""
        url = f"{self.endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"

        def call() -> RevisionInfo:
            resp = self.client.get(url)
            self._raise_for(resp, repo, revision)
            data = resp.json()
            sha = data.get("sha")
            if not isinstance(sha, str) or not is_commit(sha):
                raise UpstreamError(f"{repo}@{revision}: {self.endpoint} returned no valid commit sha")
            return RevisionInfo(sha, data.get("pipeline_tag"))

        return self._call(f"{repo}@{revision}", call)

    def list_files(self, repo: str, commit: str) -> list[FileEntry]:
        """Every file of ``repo`` at ``commit`` with the hash the Hub publishes for it."""
        url: str | None = f"{self.endpoint}/api/models/{repo}/tree/{commit}?recursive=true&expand=false"
        entries: list[FileEntry] = []
        while url:
            page_url = url

            def call(page_url: str = page_url) -> httpx.Response:
                resp = self.client.get(page_url)
                self._raise_for(resp, repo, commit)
                return resp

            resp = self._call(f"{repo}@{commit[:12]} tree", call)
            for item in resp.json():
                if item.get("type") == "file":
                    entries.append(_entry_from_tree(item))
            nxt = resp.links.get("next", {}).get("url")
            url = str(resp.url.join(nxt)) if nxt else None
        return sorted(entries, key=lambda e: e.path)

    # ---- files -------------------------------------------------------------------------------
    @contextmanager
    def _open_body(self, url: str, headers: dict[str, str]) -> Iterator[tuple[Any, Iterator[Any]]]:
        """A streaming GET: plain http.client (fast path), or httpx where a proxy is configured."""
        if uses_proxy(url):
            with _httpx_body(self.client, url, headers) as pair:
                yield pair
            return
        with self._bodies.get(url, headers) as resp:
            yield resp, resp.iter_into()

    def download(
        self, repo: str, commit: str, entry: FileEntry, part: Path, on_bytes: ProgressCallback | None = None
    ) -> None:
        """Fetch one file into ``part`` (resuming what is there) and check its size and hash.

        On a hash mismatch the partial file is removed and VerificationError raised: nothing that
        failed verification ever leaves the temp area.
        """
        url = f"{self.endpoint}/{repo}/resolve/{commit}/{quote(entry.path)}"
        what = f"{repo}@{commit[:12]}: {entry.path}"
        for attempt in range(2):
            actual: str = self._call(what, lambda: self._fetch_into(url, repo, commit, entry, part, on_bytes))
            if actual == entry.etag:
                return
            part.unlink(missing_ok=True)
            if attempt == 0 and on_bytes:
                on_bytes(-entry.size)
        raise VerificationError(repo, entry.path, entry.algo, entry.etag, actual)

    def _fetch_into(
        self, url: str, repo: str, commit: str, entry: FileEntry, part: Path, on_bytes: ProgressCallback | None
    ) -> str:
        """Stream the (rest of the) file into ``part``, hashing in the same pass; return the digest."""
        have = part.stat().st_size if part.exists() else 0
        if have > entry.size:
            part.unlink()
            have = 0
        hasher = _hash_existing(part, entry) if have else FileHasher(entry.lfs, entry.size)
        if have == entry.size:
            return hasher.hexdigest()
        headers = {"Range": f"bytes={have}-"} if have else {}
        too_long = False
        try:
            with self._open_body(url, headers) as (resp, chunks):
                self._raise_for(resp, repo, commit, entry.path)
                served_commit = resp.headers.get("X-Repo-Commit")
                if served_commit and served_commit != commit:
                    raise UpstreamError(f"{repo}: {entry.path} served from commit {served_commit}, expected {commit}")
                if have and resp.status_code != 206:
                    if on_bytes:
                        on_bytes(-have)
                    have = 0  # the server ignored Range: start over
                    hasher = FileHasher(entry.lfs, entry.size)
                too_long = _write_body(chunks, part, have, entry.size, hasher, on_bytes)
        except (OSError, http.client.HTTPException) as e:
            raise TransientUpstreamError(f"{repo}: {entry.path}: {type(e).__name__}: {e}") from e
        if too_long:
            part.unlink(missing_ok=True)
            raise UpstreamError(f"{repo}: {entry.path}: the body is longer than the {entry.size} bytes the tree "
                                "declares; refusing it (stopped at the declared size)")
        got = part.stat().st_size
        if got < entry.size:
            raise TransientUpstreamError(f"{repo}: {entry.path}: body ended at {got} of {entry.size} bytes")
        return hasher.hexdigest()


def _write_body(
    chunks: Iterator[Any], part: Path, have: int, size: int, hasher: FileHasher, on_bytes: ProgressCallback | None
) -> bool:
    """Append the body to ``part`` (``have`` bytes already there), never past ``size``; True if it was longer.

    A full disk is a DiskFullError (not an OSError: never retried) with ``part`` removed.
    """
    left = size - have
    with disk_errors(part, part), part.open("ab" if have else "wb") as f:
        for chunk in chunks:  # as received: a broken body keeps what arrived
            if len(chunk) > left:
                return True
            f.write(chunk)
            hasher.update(chunk)
            left -= len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return False


@contextmanager
def _httpx_body(client: httpx.Client, url: str, headers: dict[str, str]) -> Iterator[tuple[Any, Iterator[bytes]]]:
    with client.stream("GET", url, headers=headers) as resp:
        yield resp, resp.iter_bytes()


def _hash_existing(part: Path, entry: FileEntry) -> FileHasher:
    """A hasher primed with what a previous attempt left in ``part`` (resume)."""
    hasher = FileHasher(entry.lfs, entry.size)
    with part.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher


def _entry_from_tree(item: dict[str, Any]) -> FileEntry:
    path = safe_relpath(str(item.get("path", "")))
    lfs = item.get("lfs")
    if lfs:
        return FileEntry(path, int(lfs.get("size", item.get("size", 0))), sha256=str(lfs["oid"]).lower())
    return FileEntry(path, int(item.get("size", 0)), git_sha1=str(item["oid"]).lower())


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
