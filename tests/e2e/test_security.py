"""Security, limits and observability against the real server (vLLM CPU build): named keys and 403, a client
leaving aborts the generation inside vLLM, the request log and metrics, and a schemathesis fuzz of the whole
HTTP API from its own OpenAPI schema (0 5xx, 0 answers that break the schema)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import CANARY, HubserveServer, log_leaks

pytestmark = pytest.mark.e2e


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_named_key_limited_to_one_model(hubserve_server: HubserveServer) -> None:
    key = hubserve_server.named_keys["e2e-minilm"]
    with httpx.Client(base_url=hubserve_server.url, headers={"x-api-key": key}, timeout=60) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["minilm"]
        r = http.post("/v1/embeddings", json={"model": "minilm", "input": CANARY})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        r = http.post("/v1/completions", json={"model": "smollm2", "prompt": CANARY, "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # as if it did not exist
        r = http.post("/generate", json={"inputs": CANARY})  # the default model is smollm2
        assert r.status_code == 404 and r.json()["error_type"] == "not_found" and "smollm2" not in r.text
        assert http.get("/v1/models", headers={"x-api-key": "hs_nope"}).status_code == 401


def _vllm_running(server: HubserveServer, metric: str = "vllm:num_requests_running") -> float:
    """A metric of the smollm2 engine (summed over labels), read from vLLM's own /metrics on its private socket."""
    pid = httpx.get(f"{server.url}/health").json()["models"]["smollm2"]["pid"]
    cmdline = psutil.Process(pid).cmdline()
    uds = cmdline[cmdline.index("--uds") + 1]
    with httpx.Client(transport=httpx.HTTPTransport(uds=uds), base_url="http://engine") as engine:
        text = engine.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith(metric + "{") or line.startswith(metric + " ")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_client_leaving_a_non_streamed_generation_aborts_it_in_vllm(hubserve_server: HubserveServer) -> None:
    assert _vllm_running(hubserve_server) == 0
    body = json.dumps({"model": "smollm2", "prompt": CANARY, "max_tokens": 2000, "ignore_eos": True}).encode()
    host, port = hubserve_server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {hubserve_server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as client:  # a client we can hang up at will
        client.sendall(head + body)
        deadline = time.monotonic() + 120
        while _vllm_running(hubserve_server) != 1:
            assert time.monotonic() < deadline, "the generation never showed in vLLM's metrics"
            time.sleep(0.2)
    # the client hung up: 2000 tokens take minutes on this CPU; vLLM must drop the request at once
    deadline = time.monotonic() + 15
    while _vllm_running(hubserve_server) != 0:
        assert time.monotonic() < deadline, "vLLM kept generating for a client that left"
        time.sleep(0.2)
    generated = _vllm_running(hubserve_server, "vllm:generation_tokens_total")
    time.sleep(2)
    assert _vllm_running(hubserve_server, "vllm:generation_tokens_total") == generated  # no engine time spent
    deadline = time.monotonic() + 10
    while httpx.get(f"{hubserve_server.url}/health").json()["models"]["smollm2"]["in_flight"] != 0:
        assert time.monotonic() < deadline, "the gateway kept the slot of a client that left"
        time.sleep(0.2)


def test_request_log_and_metrics(hubserve_server: HubserveServer) -> None:
    headers = {**hubserve_server.headers, "X-Request-Id": "e2e-log-1"}
    r = httpx.post(
        f"{hubserve_server.url}/generate",
        json={"inputs": CANARY, "parameters": {"max_new_tokens": 3}},
        headers=headers,
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-log-1"
    with httpx.stream(
        "POST",
        f"{hubserve_server.url}/models/smollm2",
        headers=hubserve_server.headers,
        timeout=120,
        json={"inputs": CANARY, "parameters": {"max_new_tokens": 3}, "stream": True},
    ) as s:
        assert s.status_code == 200 and 1 <= len([ln for ln in s.iter_lines() if ln.startswith("data:")]) <= 3
    time.sleep(0.5)
    lines = [json.loads(line) for line in hubserve_server.log_path.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "e2e-log-1"]
    assert len(mine) == 1, mine
    line = mine[0]
    assert line["logger"] == "hubserve.access" and line["route"] == "/generate" and line["status"] == 200
    assert line["model"] == "smollm2" and line["commit"] == hubserve_server.commits["smollm2"]
    assert line["key"].startswith("key-") and 1 <= line["tokens_out"] <= 3 and line["tokens_in"] > 0
    assert line["latency_s"] > 0 and line["queue_s"] >= 0
    assert not log_leaks(hubserve_server)
    metrics = httpx.get(f"{hubserve_server.url}/metrics", headers=hubserve_server.headers).text
    assert 'hubserve_requests_total{model="smollm2",route="/generate",status="200"}' in metrics
    assert 'hubserve_requests_total{model="smollm2",route="/models/{repo_id}",status="200"}' in metrics
    assert 'hubserve_tokens_out_total{model="smollm2"}' in metrics
    assert 'hubserve_time_to_first_token_seconds_count{model="smollm2",route="/models/{repo_id}"} ' in metrics
    assert 'hubserve_inter_token_latency_seconds_count{model="smollm2"}' in metrics
    assert 'hubserve_queue_seconds_count{model="smollm2"}' in metrics
    assert 'hubserve_queue_depth{model="smollm2"} 0.0' in metrics
    assert 'hubserve_key_requests_total{key="' in metrics


def test_schemathesis_fuzz_finds_no_5xx_and_no_schema_violation(
    hubserve_server: HubserveServer, tmp_path: Path
) -> None:
    """Every operation of /openapi.json, with the key: coverage, fuzzing and stateful phases, fixed seed."""
    report = tmp_path / "schemathesis.xml"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{hubserve_server.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {hubserve_server.api_key}",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "5",
            "--max-time",
            "60",
            "--seed",
            "8",
            "--warnings",
            "off",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # its cache folder goes there, not into the repo
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout and "generated" in run.stdout
