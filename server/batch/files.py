"""Uploaded and produced files (``/v1/files``), kept in the shared state: the bytes as a blob named by the file
id, the File object as a value, and one index per key (a sorted set by creation time) for listing.

A file belongs to the key that uploaded it (or whose batch produced it): another key gets the same 404 as for a
file that does not exist. Writes go bytes first, record second, index last, so a crash leaves at worst an
unreferenced blob, never a record without its bytes.

A file with an ``expires_at`` (OpenAI's ``expires_after``; by default HUBSERVE_BATCH_FILE_TTL_S, 30 days) is
gone at that time: a 404 from then on, left out of lists, and deleted, bytes and all, by the first gateway whose
runner sweeps the expiring index (``files:expiring``, by expiry time) or that reads it.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from pydantic import ValidationError

from server.batch.protocol import EXPIRES_AFTER_MAX_S, EXPIRES_AFTER_MIN_S, FILE_ID_RE, ExpiresAfter, FileObject, Page
from server.errors import BatchFileNotFound, InvalidRequest, RequestTooLarge
from server.multipart import parse_multipart, the_file
from server.state import StateStore


def file_key(file_id: str) -> str:
    return f"file:{file_id}"


def files_index(owner: str) -> str:
    return f"files:{owner}"


EXPIRING = "files:expiring"  # every file with an expiry, scored by it
SWEEP_CHUNK = 100


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class FileStore:
    def __init__(self, state: StateStore) -> None:
        self.state = state

    async def create(
        self, owner: str, filename: str, purpose: str, data: bytes, file_id: str | None = None,
        ttl_s: float | None = None,
    ) -> FileObject:
        """Store ``data``; ``file_id`` given: (re)write that file (a batch's output, written again after a crash).
        ``ttl_s``: it expires that long after now (None or 0: kept until deleted)."""
        now = time.time()
        expires_at = int(now + ttl_s) if ttl_s else None
        obj = FileObject.model_validate({"id": file_id or new_file_id(), "bytes": len(data), "created_at": int(now),
                                         "filename": filename, "purpose": purpose, "expires_at": expires_at})
        await self.state.put_blob(obj.id, data)
        record = {"object": obj.model_dump(), "owner": owner, "score": now}
        await self.state.set(file_key(obj.id), json.dumps(record).encode())
        await self.state.zadd(files_index(owner), obj.id, now)
        if expires_at is not None:
            await self.state.zadd(EXPIRING, obj.id, expires_at)
        return obj

    async def _read(self, file_id: str) -> dict[str, Any] | None:
        """A file's stored record (None: no such file, or not a file id)."""
        raw = await self.state.get(file_key(file_id)) if FILE_ID_RE.match(file_id) else None
        return dict(json.loads(raw)) if raw is not None else None

    async def _record(self, owner: str, file_id: str) -> dict[str, Any]:
        record = await self._read(file_id)
        if record is not None and _expired(record, time.time()):
            await self._purge(file_id, record)
            record = None
        if record is None or record.get("owner") != owner:
            raise BatchFileNotFound(f"No such File object: {file_id if FILE_ID_RE.match(file_id) else '(bad id)'}",
                                    param="file_id")
        return record

    async def get(self, owner: str, file_id: str) -> FileObject:
        return FileObject.model_validate((await self._record(owner, file_id))["object"])

    async def content(self, owner: str, file_id: str) -> bytes:
        await self._record(owner, file_id)
        data = await self.state.get_blob(file_id)
        if data is None:
            raise BatchFileNotFound(f"No such File object: {file_id}", param="file_id")
        return data

    async def delete(self, owner: str, file_id: str) -> None:
        await self._purge(file_id, await self._record(owner, file_id))

    async def _purge(self, file_id: str, record: dict[str, Any]) -> None:
        """Index, record, bytes, then the expiring entry: a crash midway leaves it to the next sweep."""
        await self.state.zrem(files_index(str(record.get("owner"))), file_id)
        await self.state.delete(file_key(file_id))
        await self.state.delete_blob(file_id)
        await self.state.zrem(EXPIRING, file_id)

    async def sweep_expired(self) -> int:
        """Delete the files whose expiry has passed (up to a chunk per call); how many."""
        now = time.time()
        swept = 0
        for file_id, _ in await self.state.zrange(EXPIRING, max_score=now, limit=SWEEP_CHUNK):
            record = await self._read(file_id)
            if record is not None and not _expired(record, now):  # rewritten since with a later expiry
                continue
            await self._purge(file_id, record or {})
            swept += 1
        return swept

    async def list(self, owner: str, after: str | None, limit: int, order: str, purpose: str | None) -> Page:
        async def score_of(file_id: str) -> float | None:
            record = await self._read(file_id)
            return float(record["score"]) if record is not None else None

        now = time.time()

        async def load(file_id: str) -> FileObject | None:
            record = await self._read(file_id)
            if record is None or _expired(record, now):
                return None
            obj = FileObject.model_validate(record["object"])
            return obj if purpose is None or obj.purpose == purpose else None

        return await page_index(self.state, files_index(owner), after, limit, order == "desc", score_of, load)


def _expired(record: dict[str, Any], now: float) -> bool:
    expires_at = record["object"].get("expires_at")
    return expires_at is not None and now >= expires_at


def upload_ttl_s(fields: dict[str, str], default_s: float) -> float:
    """The lifetime an upload asks for: ``client.files.create(..., expires_after={"anchor": "created_at",
    "seconds": N})`` arrives as the form fields ``expires_after[anchor]`` and ``expires_after[seconds]``; none:
    ``default_s``. InvalidRequest naming the field when it is not a valid policy. Pure."""
    given = {k.removeprefix("expires_after[").removesuffix("]"): v for k, v in fields.items()
             if k.startswith("expires_after[")}
    if not given:
        return default_s
    try:
        return float(ExpiresAfter.model_validate(given).seconds)
    except ValidationError as e:
        raise InvalidRequest(f"`expires_after`: give `anchor` \"created_at\" and `seconds` from {EXPIRES_AFTER_MIN_S} "
                             f"(1 hour) to {EXPIRES_AFTER_MAX_S} (30 days).", param="expires_after") from e


async def page_index(
    state: StateStore, index: str, after: str | None, limit: int, reverse: bool,
    score_of: Any, load: Any,
) -> Page:
    """One cursor page of the objects of a sorted-set ``index`` (score: creation time), newest first when
    ``reverse``: those strictly after the member ``after`` in that order, at most ``limit``; ``load(id)`` gives the
    object (None: skip it). ``has_more`` says whether another page follows."""
    bound = await score_of(after) if after else None
    if after and bound is None:
        raise InvalidRequest(f"`after`: no such object {after if FILE_ID_RE.match(after) else ''}".strip(),
                             param="after")
    window = {"max_score": bound} if reverse else {"min_score": bound}
    items: list[Any] = []
    offset, chunk = 0, limit + 16
    while len(items) <= limit:
        rows = await state.zrange(index, offset=offset, limit=chunk, reverse=reverse, **window)
        for member, score in rows:
            if bound is not None and score == bound and (member >= after if reverse else member <= after):  # type: ignore[operator]
                continue  # at or before the cursor (same creation time: ordered by id, like the index)
            obj = await load(member)
            if obj is not None:
                items.append(obj)
            if len(items) > limit:
                break
        if len(rows) < chunk:
            break
        offset += chunk
    data = items[:limit]
    return Page(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                has_more=len(items) > limit)


def parse_upload(body: bytes, content_type: str, limit: int) -> tuple[str, bytes, dict[str, str]]:
    """(file name, bytes, text fields) of ``client.files.create``'s multipart form; run in a worker thread.
    InvalidRequest when it is not that form; RequestTooLarge past ``limit`` bytes."""
    fields, files = parse_multipart(body, content_type, limit)
    upload = the_file(files, "the JSONL")
    if len(upload.data) > limit:
        raise RequestTooLarge(f"file: over the limit of {limit} bytes (HUBSERVE_BATCH_MAX_FILE_BYTES).", param="file")
    name = upload.filename or "upload.jsonl"
    safe_name = "".join(c for c in name if c.isprintable() and c not in "/\\")[:255] or "upload.jsonl"
    return safe_name, upload.data, dict(fields)
