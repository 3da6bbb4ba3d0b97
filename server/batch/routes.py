"""``/v1/files`` and ``/v1/batches`` in OpenAI's shapes (the ``openai`` SDK's ``client.files`` and
``client.batches``). Thin: the records are jobs.py's and files.py's, the work runner.py's."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from server.batch.files import parse_upload, upload_ttl_s
from server.batch.jobs import check_create
from server.batch.protocol import Batch, FileDeleted, FileObject, Page
from server.batch.runner import BatchRunner
from server.engines.client import read_json
from server.errors import Family, InvalidRequest, family_dependency
from server.ops import context
from server.ops.auth import require_key
from server.ops.context import ANONYMOUS

router = APIRouter(prefix="/v1", tags=["batches"],
                   dependencies=[Depends(family_dependency(Family.OPENAI)), Depends(require_key("batch"))])


def _runner(request: Request) -> BatchRunner:
    runner: BatchRunner = request.app.state.batches
    return runner


def _owner() -> str:
    """The key the request came with (auth off: everyone is the anonymous principal)."""
    ctx = context.current()
    return (ctx.principal if ctx is not None and ctx.principal is not None else ANONYMOUS).name


@router.post("/files")
async def create_file(request: Request) -> FileObject:
    """Multipart ``file`` + ``purpose=batch`` (``client.files.create(file=..., purpose="batch")``), and
    ``expires_after`` optionally (else it expires after HUBSERVE_BATCH_FILE_TTL_S, 30 days)."""
    runner = _runner(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("Upload the file as multipart/form-data with `file` and `purpose` parts.", param="file")
    limit = runner.settings.batch_max_file_bytes
    name, data, fields = await asyncio.to_thread(parse_upload, await request.body(), content_type, limit)
    if fields.get("purpose") != "batch":
        raise InvalidRequest("`purpose`: this server takes files for the Batch API only: use purpose `batch`.",
                             param="purpose")
    ttl_s = upload_ttl_s(fields, runner.settings.batch_file_ttl_s)
    return await runner.files.create(_owner(), name, "batch", data, ttl_s=ttl_s)


@router.get("/files")
async def list_files(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> Page:
    return await _runner(request).files.list(_owner(), after, limit, order, purpose)


@router.get("/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> FileObject:
    return await _runner(request).files.get(_owner(), file_id)


@router.get("/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    data = await _runner(request).files.content(_owner(), file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> FileDeleted:
    await _runner(request).files.delete(_owner(), file_id)
    return FileDeleted(id=file_id)


@router.post("/batches")
async def create_batch(request: Request) -> Batch:
    """JSON ``{input_file_id, endpoint, completion_window: "24h", metadata?}``. A file whose lines are wrong
    makes a ``failed`` batch naming them in ``errors`` (as OpenAI does); the rest runs in the background."""
    runner = _runner(request)
    body = check_create(await read_json(request))
    ctx = context.current()
    who = ctx.principal if ctx is not None and ctx.principal is not None else ANONYMOUS
    settings = runner.settings
    job = await runner.jobs.create(who, body, settings.batch_max_lines, settings.batch_max_per_key)
    runner.wake()
    return job.to_batch()


@router.get("/batches")
async def list_batches(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page:
    page = await _runner(request).jobs.list(_owner(), after, limit)
    return page.model_copy(update={"data": [job.to_batch() for job in page.data]})


@router.get("/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> Batch:
    return (await _runner(request).jobs.get(_owner(), batch_id)).to_batch()


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Batch:
    """Stops starting lines; those in flight finish; then ``cancelled`` with the finished lines' files."""
    runner = _runner(request)
    job = await runner.jobs.cancel(_owner(), batch_id)
    runner.wake()
    return job.to_batch()
