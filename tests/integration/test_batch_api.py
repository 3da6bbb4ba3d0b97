"""The OpenAI Batch API (/v1/files, /v1/batches) with the stock ``openai`` SDK against the real gateway on
loopback over scripted engines: create, poll, download, error files, cancel, pages, the per-key bounds, two
gateways on one state, a revision swap mid-batch, and a kill -9 of a gateway process mid-batch."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from server.app import create_app
from server.batch.files import FileStore
from server.batch.jobs import JobStore
from server.cli import app as cli_app
from server.engines.base import ModelInfo
from server.registry import Registry
from server.settings import Settings, hash_key
from server.state.sqlite_store import SQLiteStore
from tests.fixtures.gateway_app import FLAT_KEY, EngineScript, Keys, build_app, served
from tests.fixtures.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAST = {"batch_poll_s": 0.05, "batch_lease_s": 1.0, "batch_retry_max_s": 0.2}
COMMIT_A, COMMIT_B = "c" * 40, "d" * 40


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def chat_lines(n: int, model: str = "gen", start: int = 0) -> list[dict[str, Any]]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"line {i}"}]}}
            for i in range(start, start + n)]


def upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id


def wait_for(client: openai.OpenAI, batch_id: str, until: Callable[[Any], bool], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.05)


def done(batch: Any) -> bool:
    return batch.status in ("completed", "failed", "cancelled", "expired")


def output(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).content.splitlines()]


@contextlib.contextmanager
def sdk(tmp_path: Path, script: EngineScript, key: str = FLAT_KEY, **settings: Any) -> Any:
    app, _ = build_app(tmp_path, script, **(FAST | settings))
    with served(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_files_and_a_batch_with_the_openai_sdk(tmp_path: Path, script: EngineScript) -> None:
    with sdk(tmp_path, script) as client:
        lines = chat_lines(3)
        lines.insert(1, {**chat_lines(1, model="nope")[0], "custom_id": "bad-model"})  # a 404: an error line
        file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        assert (file.object, file.purpose, file.bytes, file.filename) == ("file", "batch", len(jsonl(lines)),
                                                                          "in.jsonl")
        assert client.files.retrieve(file.id).id == file.id
        assert client.files.content(file.id).content == jsonl(lines)
        assert [f.id for f in client.files.list()] == [file.id]

        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"job": "nightly"})
        assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
        batch = wait_for(client, batch.id, done)
        assert batch.status == "completed" and batch.completed_at and batch.in_progress_at
        counts = batch.request_counts
        assert (counts.total, counts.completed, counts.failed) == (4, 3, 1)
        assert batch.usage is not None and batch.usage.total_tokens == 3 * 7  # each answer's usage, summed

        out = output(client, batch.output_file_id)
        assert [x["custom_id"] for x in out] == ["req-0", "req-1", "req-2"]  # input order
        first = out[0]
        assert first["response"]["status_code"] == 200 and first["error"] is None
        assert first["response"]["body"]["choices"][0]["message"]["content"] == "Paris"
        assert (first["model"], first["commit"]) == ("gen", COMMIT_A)  # what answered, per line
        assert first["response"]["request_id"] == f"{batch.id}-0" and first["id"].startswith("batch_req_")
        errors = output(client, batch.error_file_id)
        assert [x["custom_id"] for x in errors] == ["bad-model"]
        assert errors[0]["response"]["status_code"] == 404
        assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"

        assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
        cli = CliRunner()
        listed = cli.invoke(cli_app, ["batches", "--json", "--state-url", f"sqlite://{tmp_path / 'state.db'}"])
        assert listed.exit_code == 0, listed.output
        row = json.loads(listed.stdout)[0]
        assert (row["id"], row["status"], row["key"], row["request_counts"]["completed"]) == (
            batch.id, "completed", f"key-{hash_key(FLAT_KEY)[:8]}", 3)
        table = cli.invoke(cli_app, ["batches", "--config", str(tmp_path / "models.toml")], env={"COLUMNS": "200"})
        assert table.exit_code == 0 and batch.id in table.stdout and "/v1/chat/completions" in table.stdout
        bad = cli.invoke(cli_app, ["batches", "--state-url", "ftp://nowhere"])
        assert bad.exit_code != 0 and "HUBSERVE_STATE_URL" in bad.output and "Traceback" not in bad.output
        assert client.files.delete(file.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(file.id)


def test_files_expire_by_their_policy_or_after_30_days(tmp_path: Path, script: EngineScript) -> None:
    with sdk(tmp_path, script) as client:
        default = client.files.create(file=("a.jsonl", io.BytesIO(jsonl(chat_lines(1)))), purpose="batch")
        assert default.expires_at == default.created_at + 30 * 24 * 3600  # OpenAI's default for batch files
        hour = client.files.create(file=("b.jsonl", io.BytesIO(jsonl(chat_lines(1)))), purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": 3600})
        assert hour.expires_at == hour.created_at + 3600
        assert client.files.retrieve(hour.id).expires_at == hour.expires_at
        for policy in ({"anchor": "created_at", "seconds": 60}, {"anchor": "last_active_at", "seconds": 3600}):
            with pytest.raises(openai.BadRequestError) as bad:
                client.files.create(file=("c.jsonl", io.BytesIO(b"{}")), purpose="batch",
                                    expires_after=policy)  # type: ignore[arg-type]
            assert bad.value.body["param"] == "expires_after" and "3600" in bad.value.body["message"]  # type: ignore[index]
        batch = client.batches.create(input_file_id=hour.id, endpoint="/v1/chat/completions", completion_window="24h",
                                      output_expires_after={"anchor": "created_at", "seconds": 7200})
        batch = wait_for(client, batch.id, done)
        out = client.files.retrieve(batch.output_file_id)
        assert out.expires_at == out.created_at + 7200


def test_an_expired_file_is_gone_bytes_and_all(tmp_path: Path, script: EngineScript) -> None:
    blobs = tmp_path / "state.db.files"
    with sdk(tmp_path, script, batch_file_ttl_s=3.0) as client:  # time to upload and submit first
        first, second = (upload(client, chat_lines(1)) for _ in range(2))
        batch = client.batches.create(input_file_id=first, endpoint="/v1/chat/completions", completion_window="24h")
        assert {first, second} <= {p.name for p in blobs.rglob("*")}
        deadline = time.monotonic() + 15
        while {first, second} & {p.name for p in blobs.rglob("*")}:  # the runner's sweep deletes them unasked
            assert time.monotonic() < deadline, "expired files were not deleted"
            time.sleep(0.1)
        for gone in (first, second):
            with pytest.raises(openai.NotFoundError):
                client.files.retrieve(gone)
            with pytest.raises(openai.NotFoundError):
                client.files.content(gone)
        assert not {first, second} & {f.id for f in client.files.list()}
        assert wait_for(client, batch.id, done).status == "completed"  # its input was copied when it was created


def test_a_bad_input_file_fails_the_batch_and_bad_requests_are_400(tmp_path: Path, script: EngineScript) -> None:
    with sdk(tmp_path, script, batch_max_lines=5, batch_max_file_bytes=4096) as client:
        with pytest.raises(openai.APIStatusError, match="HUBSERVE_BATCH_MAX_FILE_BYTES") as too_big:
            client.files.create(file=("big.jsonl", io.BytesIO(b" " * 5000)), purpose="batch")
        assert too_big.value.status_code == 413
        lines = chat_lines(3)
        lines[1]["custom_id"] = "req-0"  # duplicate
        lines[2]["url"] = "/v1/embeddings"
        bad = jsonl(lines) + b"{not json\n"
        file_id = client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.errors is not None and batch.errors.data is not None
        assert [(e.code, e.line) for e in batch.errors.data] == [
            ("duplicate_custom_id", 2), ("invalid_url", 3), ("invalid_json_line", 4)]
        assert batch.request_counts is not None and batch.request_counts.total == 0

        with pytest.raises(openai.BadRequestError, match="endpoint"):
            client.batches.create(input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="HUBSERVE_BATCH_MAX_LINES"):
            client.batches.create(input_file_id=upload(client, chat_lines(6)), endpoint="/v1/chat/completions",
                                  completion_window="24h")
        with pytest.raises(openai.NotFoundError, match="No such File"):
            client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            client.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="assistants")
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nope")


def test_files_and_batches_belong_to_their_key(tmp_path: Path, script: EngineScript, keys: Keys) -> None:
    app, _ = build_app(tmp_path, script, **FAST, batch_max_per_key=1)
    with served(app) as url:
        mine = openai.OpenAI(base_url=f"{url}/v1", api_key=keys.all, max_retries=0)
        other = openai.OpenAI(base_url=f"{url}/v1", api_key=keys.gen_only, max_retries=0)
        file_id = upload(mine, chat_lines(1))
        with pytest.raises(openai.NotFoundError):
            other.files.content(file_id)
        assert list(other.files.list()) == []
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).files.list()
        # the per-key bound counts batches not finished: this one's line stays in flight until the gateway stops
        slow = [{**chat_lines(1)[0], "body": {"model": "gen", "messages": [{"role": "user", "content": "slow"}]}}]
        mine.batches.create(input_file_id=upload(mine, slow), endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.RateLimitError, match="HUBSERVE_BATCH_MAX_PER_KEY"):
            mine.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        # a key's model list holds for its batch lines: `gen` is not allowed to emb-only, so it reads as unknown
        emb_only = openai.OpenAI(base_url=f"{url}/v1", api_key=keys.emb_only, max_retries=0)
        batch = emb_only.batches.create(input_file_id=upload(emb_only, chat_lines(1)),
                                        endpoint="/v1/chat/completions", completion_window="24h")
        assert [b.id for b in other.batches.list()] == []
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
        batch = wait_for(emb_only, batch.id, done)
        assert batch.request_counts is not None and batch.request_counts.failed == 1
        assert output(emb_only, batch.error_file_id)[0]["response"]["status_code"] == 404


def test_cancel_finishes_the_lines_in_flight_and_keeps_the_finished_ones(tmp_path: Path) -> None:
    script = EngineScript(pause_s=0.1)
    with sdk(tmp_path, script, batch_concurrency=1) as client:
        batch = client.batches.create(input_file_id=upload(client, chat_lines(40)), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 2)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
        batch = wait_for(client, batch.id, done)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        finished = batch.request_counts.completed
        assert 2 <= finished < 40
        out = output(client, batch.output_file_id)
        assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(finished)]  # partial, in order
        assert script.finished == finished and script.cancelled == 0  # in flight at the cancel: finished
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch.id)


def test_embeddings_responses_and_hub_task_batches(tmp_path: Path, script: EngineScript) -> None:
    cases = [
        ("/v1/embeddings", {"model": "emb", "input": ["a", "b"]}, lambda body: len(body["data"]) == 2),
        ("/v1/responses", {"model": "gen", "input": "hi"}, lambda body: body["object"] == "response"),
        ("/models/org/emb", {"inputs": "hello"}, lambda body: isinstance(body, list)),  # the Hub task route
    ]
    with sdk(tmp_path, script) as client:
        for endpoint, body, check in cases:
            lines = [{"custom_id": "x", "method": "POST", "url": endpoint, "body": body}]
            batch = client.batches.create(input_file_id=upload(client, lines), endpoint=endpoint,  # type: ignore[arg-type]
                                          completion_window="24h")
            batch = wait_for(client, batch.id, done)
            assert (batch.status, batch.request_counts.completed) == ("completed", 1), (endpoint, batch)
            result = output(client, batch.output_file_id)[0]
            assert check(result["response"]["body"]) and result["commit"] == COMMIT_A, (endpoint, result)


def test_lines_refused_by_admission_are_retried_never_errors(tmp_path: Path) -> None:
    script = EngineScript(pause_s=0.05)
    with sdk(tmp_path, script, batch_concurrency=3, max_concurrent_requests=1, queue_timeout_s=0) as client:
        batch = client.batches.create(input_file_id=upload(client, chat_lines(6)), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        batch = wait_for(client, batch.id, done)
        metrics = httpx.get(f"{client.base_url}".removesuffix("v1/") + "metrics",
                            headers={"Authorization": f"Bearer {FLAT_KEY}"}).text
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 6, 0)
    assert batch.error_file_id is None and script.finished == 6
    refused = [ln for ln in metrics.splitlines()
               if ln.startswith("hubserve_requests_total{") and 'status="429"' in ln and "chat/completions" in ln]
    assert refused and float(refused[0].split()[-1]) >= 1  # lines were refused at admission, then ran


def test_list_pages_newest_first(tmp_path: Path, script: EngineScript) -> None:
    with sdk(tmp_path, script) as client:
        file_id = upload(client, chat_lines(1))
        ids = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(3)]
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
        assert [b.id for b in client.batches.list(limit=2, after=page.data[-1].id).data] == [ids[0]]
        assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the SDK follows the pages itself
        assert [f.id for f in client.files.list(purpose="batch", limit=1)] == [file_id]
        auth = {"Authorization": f"Bearer {FLAT_KEY}"}
        raw = httpx.get(f"{client.base_url}batches", params={"limit": 2}, headers=auth)
        assert raw.json()["first_id"] == ids[2] and raw.json()["last_id"] == ids[1]


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """The app behind uvicorn on a loopback port in this test's event loop (so the test can drive its registry)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


async def wait_async(client: openai.AsyncOpenAI, batch_id: str, until: Callable[[Any], bool]) -> Any:
    async with asyncio.timeout(20):
        while not until(batch := await client.batches.retrieve(batch_id)):
            await asyncio.sleep(0.05)
    return batch


async def test_lines_wait_while_interactive_requests_wait_for_their_model(tmp_path: Path) -> None:
    script = EngineScript()
    app, registry = build_app(tmp_path, script, **FAST, max_concurrent_requests=1, queue_timeout_s=20)
    async with serving(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=FLAT_KEY, max_retries=0)
        held = await registry.admit("gen")  # the only slot: what comes next waits in the queue
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {FLAT_KEY}"}) as http:
            interactive = asyncio.create_task(http.post("/v1/completions", json={"model": "gen", "prompt": "me first"},
                                                        timeout=20))
            while registry.served["gen"].queued == 0:
                await asyncio.sleep(0.01)
            file = await client.files.create(file=("in.jsonl", jsonl(chat_lines(3))), purpose="batch")
            batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
            await wait_async(client, batch.id, lambda b: b.status == "in_progress")
            await asyncio.sleep(0.3)
            assert registry.served["gen"].queued == 1  # the interactive request only: no line joined the queue
            held.release()
            assert (await interactive).status_code == 200
            batch = await wait_async(client, batch.id, done)
        assert batch.status == "completed" and batch.request_counts.completed == 3
        assert b"me first" in script.seen[0].content  # the engine saw the interactive request before any line


async def test_a_batch_spanning_a_swap_records_both_commits(tmp_path: Path) -> None:
    import dataclasses

    script = EngineScript(pause_s=0.05)
    settings = Settings.model_validate({"keys_file": tmp_path / "keys.toml", "rollout": "blue-green",
                                        "batch_concurrency": 1, **FAST})
    info = ModelInfo(name="gen", repo="org/gen", commit=COMMIT_A, task="text-generation", snapshot=str(tmp_path))
    registry = Registry([ScriptedEngine(info, script.handle)], settings=settings,  # type: ignore[arg-type]
                        factory=lambda i, _s: ScriptedEngine(i, script.handle))  # type: ignore[arg-type]
    async with serving(create_app(settings, registry, start_engines=False)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        file = await client.files.create(file=("in.jsonl", jsonl(chat_lines(30))), purpose="batch")
        batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        await wait_async(client, batch.id, lambda b: b.request_counts.completed >= 3)
        await registry.apply([dataclasses.replace(info, commit=COMMIT_B)])  # blue/green: the new commit serves
        assert registry.get("gen").info.commit == COMMIT_B
        batch = await wait_async(client, batch.id, done)
        assert batch.status == "completed" and batch.request_counts.completed == 30
        lines = [json.loads(x) for x in (await client.files.content(batch.output_file_id)).content.splitlines()]
    commits = [x["commit"] for x in lines]
    assert commits[0] == COMMIT_A and commits[-1] == COMMIT_B  # each line names the commit that answered it
    assert commits == sorted(commits) and {x["model"] for x in lines} == {"gen"}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_gateways_on_one_state_share_batches_and_run_each_line_once(tmp_path: Path, backend: str,
                                                                        request: pytest.FixtureRequest) -> None:
    script = EngineScript(pause_s=0.02)
    with contextlib.ExitStack() as stack:
        redis = request.getfixturevalue("redis_server") if backend == "redis" else None
        shared = {"state_url": redis.url_for("batch")} if redis is not None else {}
        app_a, _ = build_app(tmp_path, script, **FAST, **shared, batch_concurrency=2)
        app_b, _ = build_app(tmp_path, script, **FAST, **shared, batch_concurrency=2)  # sqlite: the same state.db
        url_a, url_b = stack.enter_context(served(app_a)), stack.enter_context(served(app_b))
        a = openai.OpenAI(base_url=f"{url_a}/v1", api_key=FLAT_KEY, max_retries=0)
        b = openai.OpenAI(base_url=f"{url_b}/v1", api_key=FLAT_KEY, max_retries=0)
        ids = [a.batches.create(input_file_id=upload(a, chat_lines(8, start=10 * k)), endpoint="/v1/chat/completions",
                                completion_window="24h").id for k in range(3)]
        assert [x.id for x in b.batches.list()] == ids[::-1]  # submitted to A, seen on B
        batches = [wait_for(b, i, done) for i in ids]
        assert [x.status for x in batches] == ["completed"] * 3
        for k, x in enumerate(batches):
            assert [y["custom_id"] for y in output(b, x.output_file_id)] == [f"req-{10 * k + i}" for i in range(8)]
    assert script.finished == 24  # the engine answered each line once: one runner held each batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gateway_process(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HUBSERVE_TEST_PAUSE_S": "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.fixtures.batch_gateway", str(folder), str(port)],
                            cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)


def test_a_kill_9_mid_batch_loses_no_finished_line_and_a_restart_finishes_the_rest(tmp_path: Path) -> None:
    first, url = _gateway_process(tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=FLAT_KEY, max_retries=0)
        batch = client.batches.create(input_file_id=upload(client, chat_lines(40)), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 4)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()

    async def finished() -> dict[int, dict[str, Any]]:
        store = SQLiteStore(tmp_path / "state.db")
        try:
            return await JobStore(store, FileStore(store)).finished_lines(batch.id)
        finally:
            await store.close()

    before = asyncio.run(finished())
    assert 4 <= len(before) < 40  # killed mid-batch, with lines recorded
    script = EngineScript(pause_s=0.02)
    app, _ = build_app(tmp_path, script, **FAST)  # the restarted gateway (in this process: no second start-up)
    with served(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=FLAT_KEY, max_retries=0)
        batch = wait_for(client, batch.id, done)  # resumed once the dead gateway's lease expired
        assert batch.status == "completed" and batch.request_counts.completed == 40
        lines = output(client, batch.output_file_id)
    assert [x["custom_id"] for x in lines] == [f"req-{i}" for i in range(40)]  # each line once, in order
    for index, result in before.items():
        assert lines[index] == result["line"]  # recorded before the kill: kept as is, not run again
    assert script.finished == 40 - len(before)  # the rest ran once each


def test_a_revoked_key_stops_its_batch(tmp_path: Path, keys: Keys) -> None:
    from server.ops.keys import update_keys

    async def stored(batch_id: str) -> Any:  # the key is gone: read what the gateway wrote
        store = SQLiteStore(tmp_path / "state.db")
        try:
            job = await JobStore(store, FileStore(store)).load(batch_id)
            assert job is not None
            return job.to_batch()
        finally:
            await store.close()

    script = EngineScript(pause_s=0.1)
    with sdk(tmp_path, script, key=keys.all, batch_concurrency=1) as client:
        batch = client.batches.create(input_file_id=upload(client, chat_lines(20)), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 1)
        update_keys(keys.path, lambda records: {i: r for i, r in records.items() if r.name != "all"})
        ran = script.finished
        deadline = time.monotonic() + 10
        while (batch := asyncio.run(stored(batch.id))).status != "failed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.05)
    assert batch.errors is not None and batch.errors.data[0].code == "api_key_revoked"
    assert batch.request_counts.completed < 20 and script.finished <= ran + 1  # at most the line in flight
