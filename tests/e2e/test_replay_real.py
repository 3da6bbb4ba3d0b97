"""Idempotency-Key replays and the response cache on real engines of the session server: a streamed greedy chat
on vLLM replayed byte for byte (the engine is not asked again: the replay is instant and says so), and repeated
embeddings of a model with ``cache = true`` answered from the cache, equal to the engine's answer.
(Gateway behaviour in depth: tests/integration/test_replay_app.py.)"""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.e2e.conftest import HubserveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_a_streamed_chat_with_an_idempotency_key_is_replayed_byte_for_byte(hubserve_server: HubserveServer) -> None:
    key = f"e2e-{uuid.uuid4()}"
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12,
            "temperature": 0, "stream": True}
    headers = {**hubserve_server.headers, "Idempotency-Key": key}
    with httpx.Client(base_url=hubserve_server.url, timeout=120) as http:
        first = http.post("/v1/chat/completions", json=body, headers=headers)
        again = http.post("/v1/chat/completions", json=body, headers=headers)
        other = http.post("/v1/chat/completions", json={**body, "max_tokens": 3}, headers=headers)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    assert first.text.count("data: ") > 3 and first.text.rstrip().endswith("data: [DONE]")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content  # the recorded event stream, not a new generation
    assert again.headers["x-hubserve-commit"] == hubserve_server.commits["smollm2"]
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_repeated_embeddings_come_from_the_cache(hubserve_server: HubserveServer) -> None:
    body = {"model": "minilm", "input": f"cached sentence {uuid.uuid4()}"}
    with httpx.Client(base_url=hubserve_server.url, headers=hubserve_server.headers, timeout=60) as http:
        miss = http.post("/v1/embeddings", json=body)
        hit = http.post("/v1/embeddings", json=body)
        metrics = http.get("/metrics").text
    assert miss.status_code == hit.status_code == 200
    assert (miss.headers["x-hubserve-cache"], hit.headers["x-hubserve-cache"]) == ("miss", "hit")
    assert hit.json()["data"] == miss.json()["data"]
    assert hit.headers["x-hubserve-commit"] == miss.headers["x-hubserve-commit"] == hubserve_server.commits["minilm"]
    assert 'hubserve_cache_requests_total{model="minilm",result="hit"}' in metrics
