"""The OpenAI routes of a real ``hubserve serve`` with vLLM's CPU build, driven by the real ``openai`` client.

The engine-crash test is last in this file on purpose (it is slow) and waits until the engine is back.
"""

from __future__ import annotations

import math
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.e2e.conftest import HubserveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(hubserve_server: HubserveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hubserve_server.url}/v1", api_key=hubserve_server.api_key, max_retries=0)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ---- models ----------------------------------------------------------------------------------------------


def test_models_list_has_repo_and_commit(client: openai.OpenAI, hubserve_server: HubserveServer) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2", "minilm", "vlm", "whisper"}
    for name, card in models.items():
        extra = card.model_extra or {}
        assert card.owned_by == "hubserve"
        assert extra["repo"] == hubserve_server.repos[name]
        assert extra["commit"] == hubserve_server.commits[name]
    assert (models["smollm2"].model_extra or {})["task"] == "text-generation"
    assert (models["minilm"].model_extra or {})["task"] == "feature-extraction"
    accepts = {name: (card.model_extra or {})["input_modalities"] for name, card in models.items()}
    assert accepts == {"smollm2": ["text"], "minilm": ["text"], "vlm": ["text", "image"], "whisper": ["audio"]}
    assert client.models.retrieve("smollm2").id == "smollm2"


# ---- chat and completions --------------------------------------------------------------------------------


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in (out.choices[0].message.content or "")
    assert out.model == "smollm2"


def test_chat_by_repo_id(client: openai.OpenAI, hubserve_server: HubserveServer) -> None:
    repo = hubserve_server.repos["smollm2"]
    out = client.chat.completions.create(model=repo, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in (out.choices[0].message.content or "")


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        temperature=0,
        max_tokens=20,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3
    assert "Paris" in "".join(pieces)


def test_stream_is_not_buffered(hubserve_server: HubserveServer) -> None:
    """Chunks reach the client as vLLM produces them, not all at once at the end."""
    body = {
        "model": "smollm2",
        "prompt": "Once upon a time",
        "max_tokens": 96,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    arrivals = []
    start = time.perf_counter()
    with httpx.stream(
        "POST", f"{hubserve_server.url}/v1/completions", json=body, headers=hubserve_server.headers, timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter() - start)
    assert len(arrivals) >= 90
    # Generating 96 tokens takes a while on CPU; a buffering gateway would deliver every chunk at once.
    assert arrivals[-1] - arrivals[0] > 0.1, arrivals[:3] + arrivals[-3:]


def _in_flight(server: HubserveServer, model: str) -> int:
    return int(httpx.get(f"{server.url}/health").json()["models"][model]["in_flight"])


def test_client_leaving_mid_stream_frees_its_slot(hubserve_server: HubserveServer) -> None:
    assert _in_flight(hubserve_server, "smollm2") == 0, "a slot leaked before this test"
    body = {"model": "smollm2", "prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    url = f"{hubserve_server.url}/v1/completions"
    with httpx.stream("POST", url, json=body, headers=hubserve_server.headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert _in_flight(hubserve_server, "smollm2") == 1
                break  # leave after the first chunk; closing the response drops the connection
    deadline = time.monotonic() + 10  # far less than generating 1000 tokens on CPU
    while time.monotonic() < deadline:
        if _in_flight(hubserve_server, "smollm2") == 0:
            return
        time.sleep(0.2)
    pytest.fail("the slot of a request whose client left was never freed")


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.choices[0].text.strip()
    assert out.usage is not None and out.usage.completion_tokens > 0


def test_completions_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text.strip()


def test_n_2(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        n=2,
        temperature=1.0,
        seed=1234,
        max_tokens=10,
    )
    assert sorted(c.index for c in out.choices) == [0, 1]


def test_seed_is_reproducible(client: openai.OpenAI) -> None:
    def sample() -> str:
        out = client.completions.create(model="smollm2", prompt="My favourite", max_tokens=12, temperature=1.0, seed=7)
        return out.choices[0].text

    assert sample() == sample()


def test_stop(client: openai.OpenAI) -> None:
    out = client.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0, stop=[" 8"])
    choice = out.choices[0]
    assert " 8" not in choice.text
    assert choice.finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
    )
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in logprobs.content)
    comp = client.completions.create(model="smollm2", prompt="Hello", max_tokens=3, temperature=0, logprobs=1)
    assert comp.choices[0].logprobs is not None and comp.choices[0].logprobs.token_logprobs


def test_response_format_json(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give a JSON object with a key 'city' for the capital of France."}],
        temperature=0,
        max_tokens=30,
        response_format={"type": "json_object"},
    )
    import json

    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)


def test_tools(client: openai.OpenAI) -> None:
    tool: ChatCompletionToolParam = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        temperature=0,
        max_tokens=60,
        tools=[tool],
        tool_choice="required",
    )
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather"


# ---- embeddings ------------------------------------------------------------------------------------------


def test_embeddings_are_sensible(client: openai.OpenAI) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    out = client.embeddings.create(model="minilm", input=texts)
    vectors = [d.embedding for d in out.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.2


def test_embeddings_by_repo_id(client: openai.OpenAI, hubserve_server: HubserveServer) -> None:
    out = client.embeddings.create(model=hubserve_server.repos["minilm"], input="hello")
    assert len(out.data[0].embedding) == 384


# ---- errors ----------------------------------------------------------------------------------------------


def test_unknown_model_is_404_listing_names(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "smollm2" in error["message"] and "minilm" in error["message"]


def test_auth_required(hubserve_server: HubserveServer) -> None:
    wrong = openai.OpenAI(base_url=f"{hubserve_server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(f"{hubserve_server.url}/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_invalid_json_is_400(hubserve_server: HubserveServer) -> None:
    r = httpx.post(
        f"{hubserve_server.url}/v1/chat/completions",
        content=b'{"model": "smollm2", "messages": [',
        headers={**hubserve_server.headers, "content-type": "application/json"},
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_wrong_types_are_4xx_not_500(hubserve_server: HubserveServer) -> None:
    url = f"{hubserve_server.url}/v1/chat/completions"
    for body in ({"model": 5, "messages": QUESTION}, {"model": "smollm2", "messages": "hi"}, [1, 2]):
        r = httpx.post(url, json=body, headers=hubserve_server.headers, timeout=30)
        assert r.status_code in (400, 422), (body, r.status_code, r.text)
        assert "message" in r.json()["error"]


def test_over_the_context_is_400_and_the_server_keeps_serving(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=100_000)
    assert "max_tokens" in str(info.value)
    long_prompt = "hello " * 5000  # far beyond max_model_len (2048 on CPU)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt=long_prompt, max_tokens=5)
    out = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in (out.choices[0].message.content or "")


# ---- ops -------------------------------------------------------------------------------------------------


def test_health_ready_metrics(hubserve_server: HubserveServer, client: openai.OpenAI) -> None:
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    health = httpx.get(f"{hubserve_server.url}/health")  # open, no key
    assert health.status_code == 200
    models = health.json()["models"]
    assert {m["state"] for m in models.values()} == {"ready"}
    assert models["smollm2"]["commit"] == hubserve_server.commits["smollm2"]
    assert httpx.get(f"{hubserve_server.url}/ready").status_code == 200
    metrics = httpx.get(f"{hubserve_server.url}/metrics", headers=hubserve_server.headers)  # closed once keys exist
    assert metrics.status_code == 200
    text = metrics.text
    assert 'hubserve_requests_total{model="smollm2",route="/v1/completions",status="200"}' in text
    assert "hubserve_time_to_first_byte_seconds_bucket" in text
    assert 'hubserve_engine_state{model="minilm",state="ready"} 1.0' in text
    assert 'hubserve_queue_size{model="smollm2"}' in text
