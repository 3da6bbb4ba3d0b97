"""The Hub Inference API routes of a real ``hubserve serve``: ``huggingface_hub.InferenceClient`` and
``AsyncInferenceClient`` with ``model=<server>/models/<repo>``, ``base_url=<server>`` and ``base_url=<server>/v1``,
plus raw httpx for the exact error shapes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import httpx
import pytest
from huggingface_hub import (
    AsyncInferenceClient,
    ChatCompletionInputJSONSchema,
    ChatCompletionInputResponseFormatJSONSchema,
    InferenceClient,
)
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.errors import ValidationError as HfValidationError

from tests.e2e.conftest import HubserveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def model_url(server: HubserveServer, name: str) -> str:
    return f"{server.url}/models/{server.repos[name]}"


@pytest.fixture(scope="module")
def smollm(hubserve_server: HubserveServer) -> InferenceClient:
    return InferenceClient(model=model_url(hubserve_server, "smollm2"), token=hubserve_server.api_key, timeout=120)


@pytest.fixture(scope="module")
def minilm(hubserve_server: HubserveServer) -> InferenceClient:
    return InferenceClient(model=model_url(hubserve_server, "minilm"), token=hubserve_server.api_key, timeout=120)


@pytest.fixture(scope="module")
def http(hubserve_server: HubserveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hubserve_server.url, headers=hubserve_server.headers, timeout=120) as client:
        yield client


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ---- text generation ---------------------------------------------------------------------------------------


def test_text_generation_by_model_url(smollm: InferenceClient) -> None:
    assert "Paris" in smollm.text_generation(PROMPT, max_new_tokens=20, do_sample=False)


def test_text_generation_by_served_name_raw(http: httpx.Client) -> None:
    r = http.post("/models/smollm2", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 20}})
    assert r.status_code == 200
    assert isinstance(r.json(), list) and "Paris" in r.json()[0]["generated_text"]


def test_text_generation_stream_and_details_by_model_url(smollm: InferenceClient) -> None:
    pieces = list(smollm.text_generation(PROMPT, max_new_tokens=20, stream=True))
    assert "Paris" in "".join(pieces)
    out = smollm.text_generation(PROMPT, max_new_tokens=20, details=True)
    assert out.details is not None and out.details.tokens and out.details.finish_reason == "eos_token"
    events = list(smollm.text_generation(PROMPT, max_new_tokens=20, stream=True, details=True))
    assert events[-1].details is not None and events[-1].generated_text is not None


def test_text_generation_base_url_v1(hubserve_server: HubserveServer) -> None:
    client = InferenceClient(base_url=f"{hubserve_server.url}/v1", api_key=hubserve_server.api_key, timeout=120)
    assert "Paris" in client.text_generation(PROMPT, max_new_tokens=20)


def test_model_url_ending_in_v1(hubserve_server: HubserveServer) -> None:
    url = f"{model_url(hubserve_server, 'smollm2')}/v1"
    client = InferenceClient(base_url=url, api_key=hubserve_server.api_key, timeout=120)
    assert "Paris" in client.text_generation(PROMPT, max_new_tokens=20)
    assert "Paris" in (client.chat_completion(QUESTION, max_tokens=20, temperature=0).choices[0].message.content or "")


def test_typed_validation_error_by_model_url(smollm: InferenceClient) -> None:
    with pytest.raises(HfValidationError, match="top_p"):
        smollm.text_generation("hi", top_p=1.0)


def test_legacy_options_are_accepted(http: httpx.Client) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 20}, "options": {"wait_for_model": True, "use_cache": 0}}
    r = http.post("/models/smollm2", json=body)
    assert r.status_code == 200 and "Paris" in r.json()[0]["generated_text"]


# ---- chat ---------------------------------------------------------------------------------------------------


def test_chat_completion_by_model_url(smollm: InferenceClient) -> None:
    out = smollm.chat_completion(QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in (out.choices[0].message.content or "")
    stream = smollm.chat_completion(QUESTION, max_tokens=20, temperature=0, stream=True)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


JSON_SCHEMA = {
    "type": "object",
    "properties": {"capital": {"type": "string", "maxLength": 12}},
    "required": ["capital"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("target", ["model_url", "base_url"])
def test_chat_json_schema(hubserve_server: HubserveServer, target: str) -> None:
    """InferenceClient sends json_schema as TGI's {"type": "json_object", "value": schema}; vLLM gets json_schema,
    both on /models/{repo}/v1/chat/completions and on /v1/chat/completions (base_url)."""
    if target == "base_url":
        client = InferenceClient(base_url=hubserve_server.url, api_key=hubserve_server.api_key, timeout=120)
    else:
        url = model_url(hubserve_server, "smollm2")
        client = InferenceClient(model=url, token=hubserve_server.api_key, timeout=120)
    out = client.chat_completion(
        QUESTION,
        max_tokens=40,
        temperature=0,
        response_format=ChatCompletionInputResponseFormatJSONSchema(
            type="json_schema", json_schema=ChatCompletionInputJSONSchema(name="answer", schema=JSON_SCHEMA)
        ),
    )
    assert set(json.loads(out.choices[0].message.content or "")) == {"capital"}


def test_chat_completion_base_url(hubserve_server: HubserveServer) -> None:
    client = InferenceClient(base_url=hubserve_server.url, api_key=hubserve_server.api_key, timeout=120)
    out = client.chat_completion(QUESTION, max_tokens=20, temperature=0)  # posts "model": "dummy"
    assert "Paris" in (out.choices[0].message.content or "")
    stream = client.chat_completion(QUESTION, max_tokens=20, temperature=0, stream=True)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


async def test_async_chat_and_generation(hubserve_server: HubserveServer) -> None:
    client = AsyncInferenceClient(
        model=model_url(hubserve_server, "smollm2"), token=hubserve_server.api_key, timeout=120
    )
    out = await client.chat_completion(QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in (out.choices[0].message.content or "")
    stream = await client.chat_completion(QUESTION, max_tokens=20, temperature=0, stream=True)
    assert "Paris" in "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "Paris" in await client.text_generation(PROMPT, max_new_tokens=20)


# ---- feature extraction ------------------------------------------------------------------------------------


def test_feature_extraction_shape_and_similarity(minilm: InferenceClient) -> None:
    cat = minilm.feature_extraction("A cat sits on the mat.")
    assert cat.shape == (1, 384)
    assert abs(float((cat[0] ** 2).sum()) - 1.0) < 1e-3  # normalized by default, like TEI
    kitten = minilm.feature_extraction("A kitten is sitting on a rug.")[0].tolist()
    market = minilm.feature_extraction("The stock market fell sharply today.")[0].tolist()
    assert cosine(cat[0].tolist(), kitten) > cosine(cat[0].tolist(), market) + 0.2


async def test_async_feature_extraction(hubserve_server: HubserveServer) -> None:
    client = AsyncInferenceClient(model=model_url(hubserve_server, "minilm"), token=hubserve_server.api_key)
    vector = await client.feature_extraction("hello", normalize=False)
    assert vector.shape == (1, 384)
    assert abs(float((vector[0] ** 2).sum()) - 1.0) > 1e-2


def test_sentence_similarity(minilm: InferenceClient) -> None:
    scores = minilm.sentence_similarity(
        "A cat sits on the mat.", other_sentences=["A kitten is sitting on a rug.", "The stock market fell today."]
    )
    assert len(scores) == 2 and scores[0] > scores[1] + 0.2


def test_feature_extraction_raw_batch(http: httpx.Client) -> None:
    r = http.post("/models/minilm", json={"inputs": ["a", "b", "c"], "options": {"wait_for_model": True}})
    assert r.status_code == 200
    vectors = r.json()
    assert len(vectors) == 3 and all(len(v) == 384 and isinstance(v[0], float) for v in vectors)


# ---- endpoint info, health, errors -------------------------------------------------------------------------


def test_endpoint_info_and_health_by_model_url(hubserve_server: HubserveServer) -> None:
    # huggingface_hub allows these two calls only with the hf-inference provider named explicitly.
    smollm, minilm = (
        InferenceClient(model=model_url(hubserve_server, name), token=hubserve_server.api_key, provider="hf-inference")
        for name in ("smollm2", "minilm")
    )
    assert smollm.get_endpoint_info()["model_id"] == hubserve_server.repos["smollm2"]
    info = minilm.get_endpoint_info()
    assert info["model_pipeline_tag"] == "feature-extraction"
    assert info["model_sha"] == hubserve_server.commits["minilm"]
    assert smollm.health_check() is True and minilm.health_check() is True


def test_unknown_model_is_404_in_hub_shape(http: httpx.Client, hubserve_server: HubserveServer) -> None:
    r = http.post("/models/acme/nope", json={"inputs": "hi"})
    assert r.status_code == 404
    assert r.headers["x-error-code"] == "RepoNotFound"
    assert "smollm2" in r.json()["error"] and "minilm" in r.json()["error"]
    assert r.headers["x-error-message"]
    client = InferenceClient(model=f"{hubserve_server.url}/models/acme/nope", token=hubserve_server.api_key)
    with pytest.raises(HfHubHTTPError):
        client.text_generation("hi")


def test_invalid_json_is_4xx(http: httpx.Client) -> None:
    for route in ("/models/smollm2", "/models/minilm", "/v1", "/"):
        r = http.post(route, content=b"{not json", headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text)
        assert "JSON" in r.json()["error"]


def test_auth_required(hubserve_server: HubserveServer) -> None:
    r = httpx.post(f"{hubserve_server.url}/models/smollm2", json={"inputs": "hi"})
    assert r.status_code == 401 and r.headers["x-error-code"] == "Unauthorized"


def test_every_route_frees_its_in_flight_slot(http: httpx.Client) -> None:
    """Whole answers, finished streams and streams the client leaves early all give their slot back."""
    http.post("/models/smollm2", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    http.post("/models/minilm", json={"inputs": "hi"})
    http.post("/models/smollm2/v1/chat/completions", json={"model": "dummy", "messages": QUESTION, "max_tokens": 2})
    http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    with http.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}) as r:
        r.read()
    with http.stream(
        "POST", "/generate_stream", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 200}}
    ) as r:
        next(r.iter_lines())  # leave after the first event
    deadline = time.monotonic() + 10
    while True:
        models = http.get("/health").json()["models"]
        in_flight = {name: m["in_flight"] for name, m in models.items()}
        if not any(in_flight.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert in_flight == {"smollm2": 0, "minilm": 0, "vlm": 0, "whisper": 0}
