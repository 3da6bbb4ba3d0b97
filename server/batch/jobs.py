"""Batch jobs as records in the shared state, and the validation of their input files.

Layout (only StateStore primitives, so SQLite and Redis hold it alike):

- ``batch:<id>`` (hash): ``doc`` (what never changes: endpoint, times, owner, the submitter's Principal, total),
  ``status`` and the ``*_at`` times, ``output_file_id`` / ``error_file_id``, ``errors``, and the counters
  ``completed`` / ``failed`` / ``tokens_in`` / ``tokens_out``;
- ``batch:<id>:lines`` (hash): one field per finished line (its index), set with ``hsetnx`` before it counts, so a
  line lands once whatever crashes or races; the output and error files are assembled from it in input order;
- the validated input as the blob ``<id>.input`` (the batch keeps running if its input file is deleted);
- indexes (sorted sets by creation time): ``batches`` (every batch: ``hubserve batches``), ``batches:<key>``
  (listing), ``batches:active`` (the runners' queue) and ``batches:active:<key>`` (the per-key bound).

A cancel only sets ``cancelling_at``; the runner that holds the batch writes every status after ``validating``,
so a cancel racing the end of a batch cannot move a finished batch back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from typing import Any

from pydantic import ValidationError

from server.batch.files import FileStore, page_index
from server.batch.protocol import (
    BATCH_ID_RE,
    COMPLETION_WINDOW_S,
    TERMINAL,
    Batch,
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchRequest,
    Page,
    RequestCounts,
)
from server.errors import BatchConflict, BatchLimitExceeded, BatchNotFound, InvalidRequest
from server.ops.context import Principal
from server.state import StateStore

ALL = "batches"
ACTIVE = "batches:active"
MAX_REPORTED_ERRORS = 100
TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
         "cancelled_at")
COUNTERS = ("completed", "failed", "tokens_in", "tokens_out")


def batch_key(batch_id: str) -> str:
    return f"batch:{batch_id}"


def lines_key(batch_id: str) -> str:
    return f"batch:{batch_id}:lines"


def lease_key(batch_id: str) -> str:
    return f"batch-lease:{batch_id}"


def input_blob(batch_id: str) -> str:
    return f"{batch_id}.input"


def owner_index(owner: str) -> str:
    return f"batches:{owner}"


def active_index(owner: str) -> str:
    return f"batches:active:{owner}"


@dataclasses.dataclass
class Job:
    """One batch as stored: its fixed ``doc`` and its changing fields."""

    doc: dict[str, Any]
    fields: dict[str, bytes]

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    @property
    def owner(self) -> str:
        return str(self.doc["owner"])

    @property
    def stored_status(self) -> str:
        return self.fields.get("status", b"validating").decode()

    @property
    def status(self) -> str:
        """What clients see: ``cancelling`` once asked to cancel, until the runner writes a final status."""
        status = self.stored_status
        if status in ("validating", "in_progress") and "cancelling_at" in self.fields:
            return "cancelling"
        return status

    @property
    def cancel_requested(self) -> bool:
        return "cancelling_at" in self.fields

    @property
    def principal(self) -> Principal:
        p = self.doc["principal"]
        return Principal(p["name"], frozenset(p["models"]) if p["models"] is not None else None, p["rpm"], p["tpm"])

    def count(self, name: str) -> int:
        return int(self.fields.get(name, b"0"))

    def to_batch(self) -> Batch:
        d = self.doc
        errors = self.fields.get("errors")
        tokens_in, tokens_out = self.count("tokens_in"), self.count("tokens_out")
        text = {k: self.fields[k].decode() for k in ("output_file_id", "error_file_id") if k in self.fields}
        return Batch.model_validate({
            "id": self.id, "endpoint": d["endpoint"], "input_file_id": d["input_file_id"], "status": self.status,
            "completion_window": d["completion_window"], "created_at": d["created_at"], "expires_at": d["expires_at"],
            "metadata": d.get("metadata"), "model": d.get("model"),
            "errors": BatchErrors.model_validate_json(errors) if errors else None,
            "request_counts": RequestCounts(total=d["total"], completed=self.count("completed"),
                                            failed=self.count("failed")),
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
            **{k: int(self.fields[k]) for k in TIMES if k in self.fields}, **text,
        })


def validate_input(data: bytes, endpoint: str, max_lines: int) -> tuple[list[BatchRequest], list[BatchError]]:
    """The requests of a JSONL input file, or what is wrong with it (OpenAI's codes, 1-based line numbers, the
    first 100 problems). More than ``max_lines`` requests: InvalidRequest (400 at create). Pure; run in a thread."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [BatchError(code="invalid_file_format", message="The input file is not UTF-8 text.")]
    requests: list[BatchRequest] = []
    errors: list[BatchError] = []
    seen: set[str] = set()
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) > max_lines:
        raise InvalidRequest(f"The input file has {len(lines)} requests, over the limit of {max_lines} per batch "
                             "(HUBSERVE_BATCH_MAX_LINES).", param="input_file_id")
    for n, line in lines:
        problem = _line_problem(n, line, endpoint, seen)
        if isinstance(problem, BatchError):
            errors.append(problem)
        else:
            requests.append(problem)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if not lines:
        errors.append(BatchError(code="empty_file", message="The input file has no requests."))
    return requests, errors


def _line_problem(n: int, line: str, endpoint: str, seen: set[str]) -> BatchRequest | BatchError:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return BatchError(code="invalid_json_line", line=n, message=f"Line {n} is not valid JSON.")
    if not isinstance(obj, dict):
        return BatchError(code="invalid_json_line", line=n, message=f"Line {n} is not a JSON object.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchError(code="missing_required_parameter", line=n, param="custom_id",
                          message=f"Line {n}: `custom_id` must be a non-empty string.")
    if custom_id in seen:
        return BatchError(code="duplicate_custom_id", line=n, param="custom_id",
                          message=f"Line {n}: the custom_id of each request must be unique in the batch.")
    seen.add(custom_id)
    if obj.get("method") != "POST":
        return BatchError(code="invalid_method", line=n, param="method", message=f"Line {n}: `method` must be POST.")
    if obj.get("url") != endpoint:
        return BatchError(code="invalid_url", line=n, param="url",
                          message=f"Line {n}: `url` must be the batch's endpoint {endpoint}.")
    body = obj.get("body")
    if not isinstance(body, dict):
        return BatchError(code="invalid_request", line=n, param="body",
                          message=f"Line {n}: `body` must be a JSON object.")
    if body.get("stream"):
        return BatchError(code="invalid_request", line=n, param="body.stream",
                          message=f"Line {n}: a batch request cannot stream; drop `stream`.")
    return BatchRequest(custom_id=custom_id, url=endpoint, body=body)


def encode_requests(requests: list[BatchRequest]) -> bytes:
    return b"".join(r.model_dump_json().encode() + b"\n" for r in requests)


def decode_requests(data: bytes) -> list[BatchRequest]:
    return [BatchRequest.model_validate_json(line) for line in data.splitlines() if line.strip()]


class JobStore:
    """Create, read, list and cancel batches; the runner (runner.py) moves them along."""

    def __init__(self, state: StateStore, files: FileStore) -> None:
        self.state = state
        self.files = files

    async def load(self, batch_id: str) -> Job | None:
        fields = await self.state.hgetall(batch_key(batch_id)) if BATCH_ID_RE.match(batch_id) else {}
        if "doc" not in fields:
            return None
        return Job(json.loads(fields.pop("doc")), fields)

    async def get(self, owner: str, batch_id: str) -> Job:
        job = await self.load(batch_id)
        if job is None or job.owner != owner:
            shown = batch_id if BATCH_ID_RE.match(batch_id) else "(bad id)"
            raise BatchNotFound(f"No such Batch object: {shown}", param="batch_id")
        return job

    async def create(self, who: Principal, body: BatchCreate, max_lines: int, max_per_key: int) -> Job:
        owner = who.name
        file = await self.files.get(owner, body.input_file_id)
        if file.purpose != "batch":
            raise InvalidRequest(f"File {file.id} has purpose `{file.purpose}`; a batch needs a file uploaded with "
                                 "purpose `batch`.", param="input_file_id")
        active = await self.state.zrange(active_index(owner), limit=max_per_key)
        if len(active) >= max_per_key:
            raise BatchLimitExceeded(f"Key `{owner}` has {len(active)} batches not finished, the limit of "
                                     f"{max_per_key} (HUBSERVE_BATCH_MAX_PER_KEY); retry once one finishes.",
                                     retry_after=60)
        data = await self.files.content(owner, file.id)
        requests, errors = await asyncio.to_thread(validate_input, data, body.endpoint, max_lines)
        now = time.time()
        batch_id = f"batch_{secrets.token_hex(12)}"
        models = {r.model for r in requests}
        doc = {"id": batch_id, "endpoint": body.endpoint, "input_file_id": file.id, "completion_window": "24h",
               "created_at": int(now), "expires_at": int(now) + COMPLETION_WINDOW_S, "metadata": body.metadata,
               "output_ttl_s": body.output_expires_after.seconds if body.output_expires_after else None,
               "model": models.pop() if len(models) == 1 else None, "owner": owner, "score": now,
               "total": 0 if errors else len(requests),
               "principal": {"name": who.name, "models": sorted(who.models) if who.models is not None else None,
                             "rpm": who.rpm, "tpm": who.tpm}}
        fields = {"doc": json.dumps(doc).encode(), "status": b"validating"}
        if errors:
            fields |= {"status": b"failed", "failed_at": str(int(now)).encode(),
                       "errors": BatchErrors(data=errors).model_dump_json().encode()}
        else:
            await self.state.put_blob(input_blob(batch_id), await asyncio.to_thread(encode_requests, requests))
        await self.state.hset(batch_key(batch_id), fields)
        await self.state.zadd(ALL, batch_id, now)
        await self.state.zadd(owner_index(owner), batch_id, now)
        if not errors:  # queued last: a runner never sees a batch whose record is not written
            await self.state.zadd(active_index(owner), batch_id, now)
            await self.state.zadd(ACTIVE, batch_id, now)
        return Job(doc, {k: v for k, v in fields.items() if k != "doc"})

    async def cancel(self, owner: str, batch_id: str) -> Job:
        job = await self.get(owner, batch_id)
        if job.stored_status in TERMINAL or job.stored_status == "finalizing":
            raise BatchConflict(f"Batch {batch_id} is {job.stored_status}; only a batch that is not finishing "
                                "or finished can be cancelled.", param="batch_id")
        await self.state.hsetnx(batch_key(batch_id), "cancelling_at", str(int(time.time())).encode())
        return await self.get(owner, batch_id)

    async def list(self, owner: str | None, after: str | None, limit: int) -> Page:
        """Newest first; ``owner`` None: every key's (``hubserve batches``)."""

        async def score_of(batch_id: str) -> float | None:
            job = await self.load(batch_id)
            return float(job.doc["score"]) if job is not None and owner in (None, job.owner) else None

        async def load(batch_id: str) -> Any:
            job = await self.load(batch_id)
            return job if job is not None else None

        index = ALL if owner is None else owner_index(owner)
        return await page_index(self.state, index, after, limit, True, score_of, load)

    async def finished_lines(self, batch_id: str) -> dict[int, dict[str, Any]]:
        """Index → the stored result of every finished line."""
        raw = await self.state.hgetall(lines_key(batch_id))
        return {int(k): json.loads(v) for k, v in raw.items()}

    async def recount(self, batch_id: str, done: dict[int, dict[str, Any]]) -> None:
        """Set the counters from the finished lines (after a crash between a line's write and its count)."""
        ok = sum(1 for r in done.values() if r["ok"])
        counts = {"completed": ok, "failed": len(done) - ok, "tokens_in": sum(r["tokens_in"] for r in done.values()),
                  "tokens_out": sum(r["tokens_out"] for r in done.values())}
        await self.state.hset(batch_key(batch_id), {k: str(v).encode() for k, v in counts.items()})

    async def record_line(self, batch_id: str, index: int, result: dict[str, Any]) -> bool:
        """Write one finished line durably, then count it; False when it was written already (never twice)."""
        if not await self.state.hsetnx(lines_key(batch_id), str(index), json.dumps(result).encode()):
            return False
        key = batch_key(batch_id)
        await self.state.hincr(key, "completed" if result["ok"] else "failed")
        for name in ("tokens_in", "tokens_out"):
            if result[name]:
                await self.state.hincr(key, name, result[name])
        return True

    async def set_status(self, job: Job, status: str, **extra: str) -> None:
        fields = {"status": status.encode(), **{k: v.encode() for k, v in extra.items()}}
        at = f"{status}_at"
        if at in TIMES:
            fields[at] = str(int(time.time())).encode()
        await self.state.hset(batch_key(job.id), fields)
        job.fields.update(fields)

    async def retire(self, job: Job) -> None:
        """Out of the queues once final; its input copy is no longer needed."""
        await self.state.zrem(ACTIVE, job.id)
        await self.state.zrem(active_index(job.owner), job.id)
        await self.state.delete_blob(input_blob(job.id))


def check_create(payload: object) -> BatchCreate:
    """The POST /v1/batches body, or InvalidRequest naming the field."""
    from server.errors import validation_problem

    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return BatchCreate.model_validate(payload)
    except ValidationError as e:
        message, param = validation_problem(e)
        raise InvalidRequest(message, param=param) from e
