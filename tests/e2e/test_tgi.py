"""The TGI routes of a real ``hubserve serve`` (vLLM CPU build, SmolLM2 as the default model): exact shapes
with raw httpx, and the real ``huggingface_hub`` clients with ``base_url=<server>``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient, TextGenerationInputGrammarType
from huggingface_hub.errors import ValidationError as HfValidationError

from tests.e2e.conftest import HubserveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# SmolLM2 is an instruct model and TGI routes apply no chat template: the prompt carries SmolLM2's ChatML.
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
GREEDY: dict[str, Any] = {"max_new_tokens": 20, "do_sample": False}


@pytest.fixture(scope="module")
def http(hubserve_server: HubserveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hubserve_server.url, headers=hubserve_server.headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(hubserve_server: HubserveServer) -> InferenceClient:
    return InferenceClient(base_url=hubserve_server.url, api_key=hubserve_server.api_key, timeout=120)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The data events of a TGI stream; fails on a [DONE] terminator (TGI sends none)."""
    events = []
    for line in response.iter_lines():
        if not line.startswith("data:"):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data:") :].strip()
        assert data != "[DONE]", "TGI streams end without [DONE]"
        events.append(json.loads(data))
    return events


# ---- raw shapes --------------------------------------------------------------------------------------------


def test_generate_answers_paris_with_details(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {**GREEDY, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["generated_text"]
    details = body["details"]
    assert details["finish_reason"] == "eos_token"
    assert details["generated_tokens"] == len(details["tokens"]) > 1
    assert details["prefill"] == []
    assert "".join(t["text"] for t in details["tokens"] if not t["special"]) == body["generated_text"]
    assert all(isinstance(t["id"], int) and t["logprob"] <= 0 for t in details["tokens"])
    assert details["tokens"][-1]["special"] is True  # the EOS token


def test_generate_without_details_is_only_text(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": GREEDY})
    assert r.json() == {"generated_text": "The capital of France is Paris."}


def test_generate_stream_shape(http: httpx.Client) -> None:
    payload = {"inputs": PROMPT, "parameters": {**GREEDY, "details": True}}
    with http.stream("POST", "/generate_stream", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert len(events) > 3
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    for e in events[:-1]:
        assert e["generated_text"] is None and e["details"] is None
        assert set(e["token"]) == {"id", "text", "logprob", "special"}
    last = events[-1]
    assert "Paris" in last["generated_text"]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert last["details"]["finish_reason"] == "eos_token"
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["input_length"] > 10


def test_compat_root_route_list_and_stream(http: httpx.Client) -> None:
    r = http.post("/", json={"inputs": PROMPT, "parameters": GREEDY})
    assert r.status_code == 200
    assert isinstance(r.json(), list) and "Paris" in r.json()[0]["generated_text"]
    with http.stream("POST", "/", json={"inputs": PROMPT, "parameters": GREEDY, "stream": True}) as s:
        events = sse_events(s)
    assert "Paris" in events[-1]["generated_text"]


def test_stop_sequence_ends_the_text(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {**GREEDY, "stop": [" Paris"], "details": True}})
    body = r.json()
    assert body["generated_text"].endswith(" Paris")
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_length_finish_reason_and_return_full_text(http: httpx.Client) -> None:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}})
    assert r.json()["details"]["finish_reason"] == "length"
    assert r.json()["details"]["generated_tokens"] == 2
    full = http.post("/generate", json={"inputs": PROMPT, "parameters": {**GREEDY, "return_full_text": True}})
    assert full.json()["generated_text"].startswith(PROMPT)


def test_decoder_input_details_and_top_tokens(http: httpx.Client) -> None:
    params = {"max_new_tokens": 3, "details": True, "decoder_input_details": True, "top_n_tokens": 2}
    body = http.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    tokens = http.post("/tokenize", json={"inputs": PROMPT}).json()
    prefill = body["details"]["prefill"]
    assert [p["id"] for p in prefill] == [t["id"] for t in tokens]
    assert prefill[0]["logprob"] is None and all(p["logprob"] <= 0 for p in prefill[1:])
    top = body["details"]["top_tokens"]
    assert len(top) == 3 and all(1 <= len(step) <= 2 for step in top)
    assert top[0][0]["id"] == body["details"]["tokens"][0]["id"]  # greedy: the chosen token is the top one


def test_seeded_sampling_is_reproducible(http: httpx.Client) -> None:
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 42, "details": True}
    a = http.post("/generate", json={"inputs": "Once upon a time", "parameters": params}).json()
    b = http.post("/generate", json={"inputs": "Once upon a time", "parameters": params}).json()
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 42


def test_best_of_returns_the_other_sequences(http: httpx.Client) -> None:
    params = {"max_new_tokens": 5, "best_of": 2, "do_sample": True, "details": True}
    body = http.post("/generate", json={"inputs": "Once upon a time", "parameters": params}).json()
    others = body["details"]["best_of_sequences"]
    assert len(others) == 1 and {"generated_text", "finish_reason", "tokens"} <= set(others[0])


def test_grammar_regex(http: httpx.Client) -> None:
    params = {"max_new_tokens": 8, "grammar": {"type": "regex", "value": "[0-9]{4}"}}
    r = http.post("/generate", json={"inputs": "The year the Eiffel tower was built:", "parameters": params})
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"].isdigit() and len(r.json()["generated_text"]) == 4


def test_tokenize_offsets(http: httpx.Client) -> None:
    text = "Hello wörld, how are you?"
    tokens = http.post("/tokenize", json={"inputs": text}).json()
    assert len(tokens) > 3
    for t in tokens:
        assert set(t) == {"id", "text", "start", "stop"}
        assert t["text"] == text[t["start"] : t["stop"]]
    assert "".join(t["text"] for t in tokens) == text


def test_info(http: httpx.Client, hubserve_server: HubserveServer) -> None:
    info = http.get("/info").json()
    assert info["model_id"] == hubserve_server.repos["smollm2"]
    assert info["model_sha"] == hubserve_server.commits["smollm2"]
    assert info["model_pipeline_tag"] == "text-generation"
    assert info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2047
    assert info["max_stop_sequences"] == 4 and info["max_best_of"] == 2
    assert info["router"] == "hubserve" and info["version"]
    for key in ("max_concurrent_requests", "validation_workers", "max_client_batch_size", "sha", "docker_label"):
        assert key in info


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"max_new_tokens": 5000}, "`inputs` tokens + `max_new_tokens` must be <= 2048"),
    ],
)
def test_validation_errors(http: httpx.Client, parameters: dict[str, Any], message: str) -> None:
    for route in ("/generate", "/generate_stream", "/"):
        r = http.post(route, json={"inputs": "hi", "parameters": parameters})
        assert r.status_code == 422, (route, r.text)
        assert r.json()["error_type"] == "validation"
        assert message in r.json()["error"]


def test_invalid_json_and_missing_inputs_are_4xx(http: httpx.Client) -> None:
    bad = http.post("/generate", content=b'{"inputs": "hi"', headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
    missing = http.post("/generate", json={"parameters": {}})
    assert missing.status_code == 422 and "inputs" in missing.json()["error"]
    empty = http.post("/generate", json={"inputs": ""})
    assert empty.status_code == 422 and empty.json()["error"] == "`inputs` cannot be empty"


def test_unknown_parameters_and_legacy_options_are_accepted(http: httpx.Client) -> None:
    body = {"inputs": PROMPT, "parameters": {**GREEDY, "new_knob": 1}, "options": {"wait_for_model": True}}
    r = http.post("/generate", json=body)
    assert r.status_code == 200 and "Paris" in r.json()["generated_text"]


def test_auth_required(hubserve_server: HubserveServer) -> None:
    r = httpx.post(f"{hubserve_server.url}/generate", json={"inputs": "hi"})
    assert r.status_code == 401
    assert r.json()["error_type"] == "authentication"


# ---- InferenceClient(base_url=<server>) --------------------------------------------------------------------


def test_client_text_generation(client: InferenceClient) -> None:
    assert "Paris" in client.text_generation(PROMPT, max_new_tokens=20, do_sample=False)


def test_client_text_generation_details(client: InferenceClient) -> None:
    out = client.text_generation(PROMPT, max_new_tokens=20, details=True, decoder_input_details=True)
    assert "Paris" in out.generated_text
    assert out.details is not None
    assert out.details.finish_reason == "eos_token"
    assert out.details.tokens and all(isinstance(t.id, int) and t.logprob <= 0 for t in out.details.tokens)
    assert len(out.details.prefill) > 10


def test_client_text_generation_stream(client: InferenceClient) -> None:
    pieces = list(client.text_generation(PROMPT, max_new_tokens=20, stream=True))
    assert len(pieces) > 3 and "Paris" in "".join(pieces)


def test_client_text_generation_stream_details(client: InferenceClient) -> None:
    events = list(client.text_generation(PROMPT, max_new_tokens=20, stream=True, details=True))
    assert all(e.token.id is not None for e in events)
    assert events[-1].generated_text and "Paris" in events[-1].generated_text
    assert events[-1].details is not None and events[-1].details.generated_tokens == len(events)


def test_client_json_grammar(client: InferenceClient) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    out = client.text_generation(
        PROMPT, max_new_tokens=40, grammar=TextGenerationInputGrammarType(type="json", value=schema)
    )
    assert isinstance(json.loads(out)["city"], str)


def test_client_typed_validation_error(client: InferenceClient) -> None:
    with pytest.raises(HfValidationError, match="top_p"):
        client.text_generation("hi", top_p=1.0)
    with pytest.raises(HfValidationError, match="stop"):
        client.text_generation("hi", stop=["a", "b", "c", "d", "e"], stream=True)


def test_client_endpoint_info_and_health(hubserve_server: HubserveServer) -> None:
    # huggingface_hub allows these two calls only with the hf-inference provider named explicitly.
    client = InferenceClient(base_url=hubserve_server.url, api_key=hubserve_server.api_key, provider="hf-inference")
    assert client.get_endpoint_info()["model_id"] == hubserve_server.repos["smollm2"]
    assert client.health_check() is True


async def test_async_client_text_generation(hubserve_server: HubserveServer) -> None:
    client = AsyncInferenceClient(base_url=hubserve_server.url, api_key=hubserve_server.api_key, timeout=120)
    assert "Paris" in await client.text_generation(PROMPT, max_new_tokens=20)
    stream = await client.text_generation(PROMPT, max_new_tokens=20, stream=True, details=True)
    events = [e async for e in stream]
    assert events[-1].generated_text is not None and "Paris" in events[-1].generated_text
    with pytest.raises(HfValidationError):
        await client.text_generation("hi", temperature=0.0)
