"""The Batch API on real engines of the session server, through the stock ``openai`` SDK: a JSONL of chat and
embeddings lines is uploaded, run in the background, polled to completion and downloaded; each line's answer
equals the same request made directly (greedy decoding; the same embedding), and names the commit that answered.
A second batch is cancelled. (Gateway behaviour in depth: tests/integration/test_batch_api.py.)"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any

import openai
import pytest

from tests.e2e.conftest import HubserveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def oai(hubserve_server: HubserveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hubserve_server.url}/v1", api_key=hubserve_server.api_key, max_retries=0)


def _jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))


def _wait(oai: openai.OpenAI, batch_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch not finished after {timeout} s: {batch}"
        time.sleep(0.5)


CHATS = {
    "capital": "What is the capital of France?",
    "colour": "Name one colour of the rainbow.",
}
TEXTS = {"emb-a": "The cat sat on the mat.", "emb-b": "Pinned revisions, served offline."}


def test_a_batch_of_chats_and_embeddings_equals_direct_answers(oai: openai.OpenAI,
                                                                hubserve_server: HubserveServer) -> None:
    chat_lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": 12,
                            "temperature": 0}} for cid, text in CHATS.items()]
    emb_lines = [{"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "minilm", "input": text}} for cid, text in TEXTS.items()]
    chat_file = oai.files.create(file=("chats.jsonl", _jsonl(chat_lines)), purpose="batch")
    emb_file = oai.files.create(file=("emb.jsonl", _jsonl(emb_lines)), purpose="batch")
    assert chat_file.purpose == "batch" and chat_file.bytes > 0
    chats = oai.batches.create(input_file_id=chat_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    embs = oai.batches.create(input_file_id=emb_file.id, endpoint="/v1/embeddings", completion_window="24h")
    assert chats.status in ("validating", "in_progress")

    for batch, commit in ((_wait(oai, chats.id), hubserve_server.commits["smollm2"]),
                          (_wait(oai, embs.id), hubserve_server.commits["minilm"])):
        assert batch.status == "completed", batch
        assert batch.request_counts is not None and batch.request_counts.failed == 0
        assert batch.error_file_id is None or not oai.files.content(batch.error_file_id).content.strip()
        assert batch.output_file_id is not None
        out = [json.loads(x) for x in oai.files.content(batch.output_file_id).content.splitlines()]
        assert batch.request_counts.completed == len(out) == 2
        for line in out:
            assert line["response"]["status_code"] == 200 and line["error"] is None
            assert line["commit"] == commit  # the commit that answered, per line
            body = line["response"]["body"]
            cid = line["custom_id"]
            if cid in CHATS:
                direct = oai.chat.completions.create(model="smollm2", max_tokens=12, temperature=0,
                                                     messages=[{"role": "user", "content": CHATS[cid]}])
                assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
            else:
                direct_emb = oai.embeddings.create(model="minilm", input=TEXTS[cid]).data[0].embedding
                got = body["data"][0]["embedding"]
                assert len(got) == len(direct_emb)
                assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(got, direct_emb, strict=True))
    listed = [b.id for b in oai.batches.list(limit=10).data]
    assert chats.id in listed and embs.id in listed


def test_a_cancelled_batch_ends_cancelled_with_its_finished_lines(oai: openai.OpenAI) -> None:
    lines = [{"custom_id": f"n{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "smollm2", "prompt": f"Count to {i}:", "max_tokens": 16, "temperature": 0}}
             for i in range(40)]
    file = oai.files.create(file=("many.jsonl", _jsonl(lines)), purpose="batch")
    batch = oai.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    final = _wait(oai, batch.id, timeout=120)
    assert final.status == "cancelled" and final.cancelled_at is not None
    assert final.request_counts is not None and final.request_counts.completed < len(lines)
    done = [] if final.output_file_id is None else oai.files.content(final.output_file_id).content.splitlines()
    assert len(done) == final.request_counts.completed
    assert all(json.loads(x)["response"]["status_code"] == 200 for x in done)
