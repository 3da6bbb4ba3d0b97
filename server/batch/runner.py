"""The batch runner: one per gateway, started in the app's lifespan. It leases batches from the shared queue and
runs their lines through the gateway itself (inproc.py), behind interactive traffic.

- One owner per batch at a time: ``StateStore.lease`` (renewed while it runs; lost: its lines in flight are
  cancelled, unrecorded, and the new owner runs them). A crashed gateway's batches are resumed by any gateway
  once their lease expires, skipping the lines already recorded.
- A line is recorded (``JobStore.record_line``: ``hsetnx``, then counted) before it counts as done, so a kill -9
  loses no finished line and no line lands twice.
- Lower priority: at most HUBSERVE_BATCH_CONCURRENCY lines in flight per gateway, and no line starts while
  interactive requests wait for its model (``Registry.waiting_for``). A line answered 429 or 503 (overloaded,
  loading, rate-limited) is retried after Retry-After (at most HUBSERVE_BATCH_RETRY_MAX_S) until the batch's
  completion window ends; it never becomes an error line for that.
- A batch runs with its submitter's key as it is now: a key revoked (or no longer accepted) stops the batch,
  ``failed`` with ``api_key_revoked`` in its errors; a key's changed model list or limits apply to the next line.
- Each line records the model and the commit that answered it (``model`` / ``commit`` on its output line): a
  batch that spans a revision swap shows both commits, line by line.
- Each poll also deletes the files whose expiry has passed (files.py: ``FileStore.sweep_expired``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from typing import Any

from fastapi import FastAPI

from server.batch import inproc
from server.batch.files import FileStore
from server.batch.jobs import ACTIVE, Job, JobStore, batch_key, decode_requests, input_blob, lease_key
from server.batch.protocol import TERMINAL, BatchError, BatchErrors, BatchRequest
from server.ops.auth import principal_of
from server.ops.context import ANONYMOUS, Principal
from server.ops.keys import read_keys
from server.settings import Settings
from server.state import StateStore

log = logging.getLogger("hubserve.batch")

MAX_BATCHES = 4  # batches one gateway runs at once (their lines share HUBSERVE_BATCH_CONCURRENCY)
YIELD_CHECK_S = 0.05  # how often a line waiting behind interactive requests looks again
RETRY_STATUSES = frozenset({429, 503})


class BatchRunner:
    def __init__(self, app: FastAPI, state: StateStore, settings: Settings) -> None:
        self.app = app
        self.state = state
        self.settings = settings
        self.files = FileStore(state)
        self.jobs = JobStore(state, self.files)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.stopping = False
        self._slots = asyncio.Semaphore(settings.batch_concurrency)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name="batch-runner")

    def wake(self) -> None:
        """Look for work now (a batch was created or cancelled)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop at once: lines in flight are cancelled unrecorded and leases released, so a restarted gateway (or
        another one) resumes the batches without waiting for the leases to expire."""
        self.stopping = True
        tasks = [t for t in (self._loop_task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self._claim()
                swept = await self.files.sweep_expired()
                if swept:
                    log.info("batch runner: deleted %d expired files", swept)
            except Exception as e:  # the state may be briefly unreachable: try again at the next poll
                log.warning("batch runner: cannot look for work: %s", e)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.batch_poll_s)

    async def _claim(self) -> None:
        for batch_id, _ in await self.state.zrange(ACTIVE, limit=64):
            if len(self._running) >= MAX_BATCHES:
                return
            if batch_id in self._running:
                continue
            if await self.state.lease(lease_key(batch_id), self.owner, self.settings.batch_lease_s):
                task = asyncio.create_task(self._run(batch_id), name=f"batch-{batch_id}")
                self._running[batch_id] = task
                task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        for batch_id, t in list(self._running.items()):
            if t is task:
                del self._running[batch_id]

    async def _run(self, batch_id: str) -> None:
        try:
            job = await self.jobs.load(batch_id)
            if job is None:
                await self.state.zrem(ACTIVE, batch_id)
            elif job.stored_status in TERMINAL:
                await self.jobs.retire(job)
            else:
                await _BatchRun(self, job).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: the runner failed; it is retried at the next poll", batch_id)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.state.release(lease_key(batch_id), self.owner))
            self.wake()


class _BatchRun:
    """One lease of one batch: run its unfinished lines, then finalize it (unless the lease was lost)."""

    def __init__(self, runner: BatchRunner, job: Job) -> None:
        self.runner = runner
        self.job = job
        self.settings = runner.settings
        self.lost = False
        self.principal: Principal | None = job.principal
        self._keys_stamp: tuple[int, int] | None = None
        self.lines: set[asyncio.Task[None]] = set()

    def should_stop(self) -> bool:
        return (self.lost or self.runner.stopping or self.job.cancel_requested or self.principal is None
                or self.expired())

    async def _check_key(self) -> None:
        """Re-read the submitter's key when the keys file changed: None once it is no longer accepted."""
        checker = self.runner.app.state.key_checker
        path = checker.ring.path if checker.ring is not None else None
        try:
            st = path.stat() if path is not None else None
            stamp = (st.st_mtime_ns, st.st_size) if st is not None else None
        except OSError:
            stamp = None
        if stamp == self._keys_stamp and self.principal is not None and self._keys_stamp is not None:
            return
        self._keys_stamp = stamp
        self.principal = await asyncio.to_thread(current_principal, self.job.principal, checker.enabled,
                                                 self.settings.all_key_digests, path if stamp else None)

    def expired(self) -> bool:
        return time.time() > self.job.doc["expires_at"]

    async def run(self) -> None:
        jobs, job = self.runner.jobs, self.job
        data = await self.runner.state.get_blob(input_blob(job.id))
        if data is None:
            log.error("batch %s: its input copy is gone; failing it", job.id)
            await jobs.set_status(job, "failed")
            await jobs.retire(job)
            return
        requests = await asyncio.to_thread(decode_requests, data)
        await self._check_key()
        done = await jobs.finished_lines(job.id)
        await jobs.recount(job.id, done)  # a kill between a line's write and its count leaves them apart
        if job.stored_status == "validating" and not job.cancel_requested:
            await jobs.set_status(job, "in_progress")
        keeper = asyncio.create_task(self._keep_lease())
        try:
            await self._run_lines([(i, r) for i, r in enumerate(requests) if i not in done])
        finally:
            keeper.cancel()
        if not self.lost and not self.runner.stopping:
            await self._finalize(requests)

    async def _run_lines(self, pending: list[tuple[int, BatchRequest]]) -> None:
        slots = self.runner._slots
        try:
            for index, request in pending:
                await slots.acquire()
                try:
                    await self._yield_to(request.model)
                except BaseException:
                    slots.release()
                    raise
                if self.should_stop():
                    slots.release()
                    break
                task = asyncio.create_task(self._line(index, request, self.principal))  # type: ignore[arg-type]
                self.lines.add(task)
                task.add_done_callback(self.lines.discard)
        finally:
            if self.lines:  # the lines in flight finish (cancel: "finish in-flight"); stop() cancels them
                await asyncio.gather(*list(self.lines), return_exceptions=True)

    async def _yield_to(self, model: str | None) -> None:
        registry = self.runner.app.state.registry
        while registry is not None and registry.waiting_for(model) > 0 and not self.should_stop():
            await asyncio.sleep(YIELD_CHECK_S)

    async def _line(self, index: int, request: BatchRequest, who: Principal) -> None:
        try:
            while True:
                answer = await inproc.call(self.runner.app, request.url, request.body, who, f"{self.job.id}-{index}")
                if answer.status not in RETRY_STATUSES:
                    break
                if self.should_stop():
                    return  # left unfinished: resumed, or an expired line of the error file
                await asyncio.sleep(min(_retry_after(answer.headers), self.settings.batch_retry_max_s))
                await self._yield_to(request.model)
            await self.runner.jobs.record_line(self.job.id, index, line_result(request, answer))
        except Exception as e:  # unrecorded: it runs again under the next lease
            log.warning("batch %s line %d: not recorded: %s", self.job.id, index, e)
        finally:
            self.runner._slots.release()

    async def _keep_lease(self) -> None:
        """Renew the lease and notice a cancel; a lease lost (another gateway took the batch after a stall)
        cancels the lines in flight, so no line runs on two gateways at once past that point."""
        state, key = self.runner.state, lease_key(self.job.id)
        interval = min(self.settings.batch_lease_s / 3, self.settings.batch_poll_s)
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await state.lease(key, self.runner.owner, self.settings.batch_lease_s)
                cancel = await state.hget(batch_key(self.job.id), "cancelling_at")
            except Exception as e:
                log.warning("batch %s: cannot renew its lease: %s", self.job.id, e)
                ok, cancel = time.monotonic() - renewed < self.settings.batch_lease_s * 0.8, None
            else:
                renewed = time.monotonic() if ok else renewed
            if cancel is not None:
                self.job.fields["cancelling_at"] = cancel
            with contextlib.suppress(Exception):
                await self._check_key()
            if not ok:
                log.warning("batch %s: lease lost; another gateway resumes it", self.job.id)
                self.lost = True
                for task in list(self.lines):
                    task.cancel()
                return

    async def _finalize(self, requests: list[BatchRequest]) -> None:
        jobs, job = self.runner.jobs, self.job
        done = await jobs.finished_lines(job.id)
        extra: dict[str, str] = {}
        if job.cancel_requested:
            final = "cancelled"
        elif len(done) == len(requests):
            final = "completed"
        elif self.principal is None:
            final = "failed"
            error = BatchError(code="api_key_revoked", message="The API key that created this batch is no longer "
                               "accepted; its unfinished requests were not run.")
            extra["errors"] = BatchErrors(data=[error]).model_dump_json()
        elif self.expired():
            final = "expired"
        else:
            return  # a line could not be recorded (the state was unreachable): the next lease runs it
        await jobs.set_status(job, "finalizing")
        out, err = await asyncio.to_thread(assemble, requests, done, final == "expired")
        for kind, data in (("output", out), ("error", err)):
            if data:
                ttl_s = job.doc.get("output_ttl_s") or self.runner.settings.batch_file_ttl_s
                file = await self.runner.files.create(job.owner, f"{job.id}_{kind}.jsonl", "batch_output", data,
                                                      file_id=f"file-{job.id.removeprefix('batch_')}-{kind}",
                                                      ttl_s=ttl_s)
                extra[f"{kind}_file_id"] = file.id
        await jobs.recount(job.id, done)
        await jobs.set_status(job, final, **extra)
        await jobs.retire(job)
        log.info("batch %s %s: %d of %d lines", job.id, final, len(done), len(requests))


def line_result(request: BatchRequest, answer: inproc.Answer) -> dict[str, Any]:
    """A finished line as stored: its output line (OpenAI's shape, plus the model and commit that answered)."""
    ctx = answer.context
    line = {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": request.custom_id,
        "response": {"status_code": answer.status, "request_id": answer.headers.get("x-request-id"),
                     "body": answer.json_body()},
        "error": None,
        "model": ctx.model if ctx is not None else None,
        "commit": ctx.commit if ctx is not None else None,
    }
    return {"ok": 200 <= answer.status < 300, "tokens_in": (ctx.tokens_in or 0) if ctx else 0,
            "tokens_out": (ctx.tokens_out or 0) if ctx else 0, "line": line}


def assemble(requests: list[BatchRequest], done: dict[int, dict[str, Any]], expired: bool) -> tuple[bytes, bytes]:
    """The output and error files in input order; ``expired``: unfinished lines are ``batch_expired`` errors."""
    import json

    out: list[bytes] = []
    err: list[bytes] = []
    for index, request in enumerate(requests):
        result = done.get(index)
        if result is not None:
            (out if result["ok"] else err).append(json.dumps(result["line"]).encode())
        elif expired:
            err.append(json.dumps({
                "id": f"batch_req_{secrets.token_hex(12)}", "custom_id": request.custom_id, "response": None,
                "error": {"code": "batch_expired",
                          "message": "This request could not be executed before the completion window expired."},
            }).encode())
    return b"".join(x + b"\n" for x in out), b"".join(x + b"\n" for x in err)


def _retry_after(headers: dict[str, str]) -> float:
    try:
        return max(0.05, float(headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def current_principal(
    who: Principal, auth_on: bool, flat_digests: Any, keys_file: Any
) -> Principal | None:
    """``who`` as the keys are now: its named key's current models, limits, budgets and scopes; unchanged for a
    flat key that is still configured (or anyone while auth is off); None when no longer accepted (revoked,
    expired, or no longer allowed batches). The lines of a batch run as inference requests of its key: a key
    with the ``batch`` scope may run them without the ``inference`` scope. Reads files: run in a thread."""
    if not auth_on:
        return who
    if who.name == ANONYMOUS.name:
        return None  # submitted while auth was off: it does not run once keys exist
    if who.name.startswith("key-") and any(d.startswith(who.name[4:]) for d in flat_digests()):
        return who
    try:
        records = read_keys(keys_file) if keys_file is not None else {}
    except Exception:  # a bad edit: the server keeps the previous keys too (KeyRing)
        return who
    record = next((r for r in records.values() if r.name == who.name), None)
    if record is None or record.expired() or "batch" not in record.scopes:
        return None
    current = principal_of(record)
    return dataclasses.replace(current, scopes=current.scopes | {"inference"})
