"""Uploaded and produced files (``/v1/files``), kept in the shared state: the bytes as a blob named by the file
id, the File object as a value, and one index per key (a sorted set by creation time) for listing.

A file belongs to the key that uploaded it (or whose batch produced it): another key gets the same 404 as for a
file that does not exist. Writes go bytes first, record second, index last, so a crash leaves at worst an
unreferenced blob, never a record without its bytes.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from server.batch.protocol import FILE_ID_RE, FileObject, Page
from server.errors import BatchFileNotFound, InvalidRequest, RequestTooLarge
from server.multipart import parse_multipart, the_file
from server.state import StateStore


def file_key(file_id: str) -> str:
    return f"file:{file_id}"


def files_index(owner: str) -> str:
    return f"files:{owner}"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class FileStore:
    def __init__(self, state: StateStore) -> None:
        self.state = state

    async def create(
        self, owner: str, filename: str, purpose: str, data: bytes, file_id: str | None = None
    ) -> FileObject:
        """Store ``data``; ``file_id`` given: (re)write that file (a batch's output, written again after a crash)."""
        now = time.time()
        obj = FileObject.model_validate({"id": file_id or new_file_id(), "bytes": len(data), "created_at": int(now),
                                         "filename": filename, "purpose": purpose})
        await self.state.put_blob(obj.id, data)
        record = {"object": obj.model_dump(), "owner": owner, "score": now}
        await self.state.set(file_key(obj.id), json.dumps(record).encode())
        await self.state.zadd(files_index(owner), obj.id, now)
        return obj

    async def _record(self, owner: str, file_id: str) -> dict[str, Any]:
        raw = await self.state.get(file_key(file_id)) if FILE_ID_RE.match(file_id) else None
        record = json.loads(raw) if raw is not None else None
        if record is None or record.get("owner") != owner:
            raise BatchFileNotFound(f"No such File object: {file_id if FILE_ID_RE.match(file_id) else '(bad id)'}",
                                    param="file_id")
        return dict(record)

    async def get(self, owner: str, file_id: str) -> FileObject:
        return FileObject.model_validate((await self._record(owner, file_id))["object"])

    async def content(self, owner: str, file_id: str) -> bytes:
        await self._record(owner, file_id)
        data = await self.state.get_blob(file_id)
        if data is None:
            raise BatchFileNotFound(f"No such File object: {file_id}", param="file_id")
        return data

    async def delete(self, owner: str, file_id: str) -> None:
        await self._record(owner, file_id)
        await self.state.zrem(files_index(owner), file_id)
        await self.state.delete(file_key(file_id))
        await self.state.delete_blob(file_id)

    async def list(self, owner: str, after: str | None, limit: int, order: str, purpose: str | None) -> Page:
        async def score_of(file_id: str) -> float | None:
            raw = await self.state.get(file_key(file_id)) if FILE_ID_RE.match(file_id) else None
            return float(json.loads(raw)["score"]) if raw is not None else None

        async def load(file_id: str) -> FileObject | None:
            raw = await self.state.get(file_key(file_id))
            obj = FileObject.model_validate(json.loads(raw)["object"]) if raw is not None else None
            return obj if obj is not None and (purpose is None or obj.purpose == purpose) else None

        return await page_index(self.state, files_index(owner), after, limit, order == "desc", score_of, load)


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
