"""The Responses, Messages, tokenize and media paths of the real app over scripted engines: what the gateway
itself decides (error shapes through the stock SDKs' exception classes, media limits, which revision holds a
stored response, token accounting). Real engines answer the same routes in tests/e2e/test_api_families.py."""

from __future__ import annotations

import base64
import io
import json
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from PIL import Image

from server.registry import Registry
from tests.fixtures.gateway_app import FLAT_KEY, EngineScript, Keys, asgi_client, build_app, served
from tests.fixtures.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi"}]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def png(width: int = 8, height: int = 8, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_chat(*urls: str, model: str = "vis") -> dict[str, object]:
    parts: list[dict[str, object]] = [{"type": "text", "text": "what is it?"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png())
    return folder


@pytest.fixture
def built(tmp_path: Path, keys: Keys, script: EngineScript, media_dir: Path) -> tuple[object, Registry]:
    return build_app(tmp_path, script, vision=True, audio=True, max_images_per_request=2, max_image_bytes=20_000,
                     max_image_pixels=64 * 64, allowed_local_media_path=media_dir, max_audio_bytes=200_000,
                     max_audio_seconds=2)


@pytest.fixture
async def client(built: tuple[object, Registry]) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(built[0]) as c:  # type: ignore[arg-type]
        yield c


@pytest.fixture
def url(built: tuple[object, Registry]) -> Iterator[str]:
    with served(built[0]) as base:  # type: ignore[arg-type]
        yield base


# ---- Anthropic: every error through the SDK's own classes ---------------------------------------------------


def test_anthropic_errors_are_the_sdks_classes(url: str, keys: Keys) -> None:
    def sdk(key: str | None) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=url, api_key=key or "", max_retries=0)

    ok = sdk(keys.all).messages.create(model="gen", max_tokens=2, messages=HI)  # type: ignore[arg-type]
    assert ok.content[0].text == "Paris" and ok.usage.output_tokens == 4  # type: ignore[union-attr]
    cases: list[tuple[str | None, str, type[anthropic.APIStatusError], str]] = [
        ("nope", "gen", anthropic.AuthenticationError, "authentication_error"),
        (keys.emb_only, "gen", anthropic.NotFoundError, "not_found_error"),  # may not use it: as if unknown
        (keys.all, "no-such-model", anthropic.NotFoundError, "not_found_error"),
        (keys.all, "emb", anthropic.BadRequestError, "invalid_request_error"),  # not a chat model
    ]
    for key, model, error, kind in cases:
        with pytest.raises(error) as caught:
            sdk(key).messages.create(model=model, max_tokens=2, messages=HI)  # type: ignore[arg-type]
        body = caught.value.body
        assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == kind, body
    limited = sdk(keys.limited)  # rpm 2
    for _ in range(2):
        limited.messages.count_tokens(model="gen", messages=HI)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError) as rate:
        limited.messages.count_tokens(model="gen", messages=HI)  # type: ignore[arg-type]
    assert rate.value.response.headers["retry-after"]


async def test_anthropic_overload_is_529(tmp_path: Path, keys: Keys, script: EngineScript) -> None:
    app, registry = build_app(tmp_path, script, max_concurrent_requests=1, max_queued_requests=0)
    slot = await registry.admit("gen")  # the one slot is taken
    try:
        async with asgi_client(app) as c:
            r = await c.post("/v1/messages", json={"model": "gen", "max_tokens": 2, "messages": HI},
                             headers={"x-api-key": keys.all, "anthropic-version": "2023-06-01"})
    finally:
        slot.release()
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error" and r.headers["retry-after"]


async def test_anthropic_request_shape_is_checked(client: httpx.AsyncClient, keys: Keys) -> None:
    h = {"x-api-key": keys.all}
    r = await client.post("/v1/messages", json={"model": "gen"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in r.json()["error"]["message"]
    r = await client.post("/v1/messages", json={"model": "gen", "messages": HI, "max_tokens": 1},
                          headers={**h, "anthropic-version": "june"})
    assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
    r = await client.post("/v1/messages", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["type"] == "error"


async def test_messages_and_responses_usage_counts_for_tpm(client: httpx.AsyncClient, keys: Keys) -> None:
    """The thrifty key (5 tokens/min): one Messages stream reports 3 in + 4 out = 7, so the next call is 429,
    in each family's shape."""
    h = bearer(keys.thrifty)
    body = {"model": "gen", "max_tokens": 2, "messages": HI, "stream": True}
    async with client.stream("POST", "/v1/messages", json=body, headers=h) as r:
        events = [line async for line in r.aiter_lines() if line.startswith("event:")]
    assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
    r = await client.post("/v1/messages", json={**body, "stream": False}, headers=h)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    r = await client.post("/v1/responses", json={"model": "gen", "input": "hi"}, headers=h)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


# ---- Responses: ids are remembered with their revision and key -----------------------------------------------


async def test_responses_retrieve_only_on_the_revision_and_key_that_stored_them(
    built: tuple[object, Registry], client: httpx.AsyncClient, keys: Keys, script: EngineScript
) -> None:
    _, registry = built
    h = bearer(keys.all)
    created = (await client.post("/v1/responses", json={"model": "gen", "input": "hi"}, headers=h)).json()
    async with client.stream("POST", "/v1/responses", json={"model": "org/gen", "input": "hi", "stream": True},
                             headers=h) as r:
        streamed = [json.loads(line[5:]) async for line in r.aiter_lines() if line.startswith("data:")]
    ids = [created["id"], streamed[0]["response"]["id"]]
    for rid in ids:  # by the key that made it, on the engine that holds it
        r = await client.get(f"/v1/responses/{rid}", headers=h)
        assert r.status_code == 200 and r.json()["id"] == rid
        assert script.seen[-1].url.path == f"/v1/responses/{rid}"
    r = await client.post("/v1/responses", json={"input": "more", "previous_response_id": ids[0]}, headers=h)
    assert r.status_code == 200 and json.loads(script.seen[-1].content)["model"] == "gen"  # model from the id
    elsewhere = await client.get(f"/models/org/emb/v1/responses/{ids[0]}", headers=h)  # another model's path
    assert elsewhere.status_code == 404 and (await client.get(f"/models/org/gen/v1/responses/{ids[0]}",
                                                              headers=h)).status_code == 200
    other = await client.get(f"/v1/responses/{ids[0]}", headers=bearer(FLAT_KEY))
    assert other.status_code == 404 and other.json()["error"]["code"] == "response_not_found"
    unknown = await client.get("/v1/responses/resp_never", headers=h)
    assert unknown.status_code == 404
    bad = await client.get("/v1/responses/bad%0d%0aid", headers=h)
    assert bad.status_code == 400
    # a swap to a new commit: what the old engine stored is gone, and the answer says so
    registry._factory = lambda info, settings: ScriptedEngine(info, script.handle)  # type: ignore[arg-type,assignment,return-value]
    await registry.apply([e.info.__class__(**{**e.info.__dict__, "commit": "d" * 40})
                          for e in registry.engines.values()])
    assert registry.get("gen").info.commit == "d" * 40
    seen = len(script.seen)
    sdk = openai.AsyncOpenAI(base_url="http://hubserve/v1", api_key=keys.all, http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as gone:
        await sdk.responses.retrieve(ids[0])
    assert "swapped out" in gone.value.message and "c" * 12 in gone.value.message
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.create(model="gen", input="again", previous_response_id=ids[1])
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.cancel(ids[1])
    assert len(script.seen) == seen, "a request for a swapped-out response reached the new engine"


# ---- media: limits and offline rules, in each family's shape --------------------------------------------------


async def test_image_limits(client: httpx.AsyncClient, keys: Keys, script: EngineScript, media_dir: Path) -> None:
    h = bearer(keys.all)
    ok = await client.post("/v1/chat/completions", json=image_chat(data_uri(png())), headers=h)
    assert ok.status_code == 200, ok.text
    local = await client.post("/v1/chat/completions", json=image_chat((media_dir / "ok.png").as_uri()), headers=h)
    assert local.status_code == 200, local.text
    refused = {
        "too many": (image_chat(*[data_uri(png())] * 3), 400, "HUBSERVE_MAX_IMAGES_PER_REQUEST"),
        "too many bytes": (image_chat(data_uri(b"\x89PNG" + b"0" * 30_000)), 413, "HUBSERVE_MAX_IMAGE_BYTES"),
        "too many pixels": (image_chat(data_uri(png(100, 100))), 400, "HUBSERVE_MAX_IMAGE_PIXELS"),
        "not allowed type": (image_chat(data_uri(png(fmt="BMP"), "image/bmp")), 400, "not accepted"),
        "type mismatch": (image_chat(data_uri(png(), "image/jpeg")), 400, "declared image/jpeg"),
        "not an image": (image_chat(data_uri(b"hello world")), 400, "not an image"),
        "bad base64": (image_chat("data:image/png;base64,@@@"), 400, "base64"),
        "remote": (image_chat("https://example.com/cat.png"), 400, "offline"),
        "outside the media dir": (image_chat(Path("/etc/hostname").as_uri()), 400, "allowed local media"),
        "text-only model": (image_chat(data_uri(png()), model="gen"), 400, "Model `gen` takes text input only"),
    }
    before = len(script.seen)
    for what, (body, status, says) in refused.items():
        r = await client.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == status and says in r.json()["error"]["message"], (what, r.status_code, r.text)
        assert r.json()["error"]["param"].startswith("messages[0].content["), what
    assert len(script.seen) == before, "a refused image reached the engine"


async def test_images_in_responses_and_messages(client: httpx.AsyncClient, keys: Keys, script: EngineScript) -> None:
    h = bearer(keys.all)
    image = {"type": "input_image", "image_url": data_uri(png())}
    body = {"model": "vis", "input": [{"role": "user", "content": [{"type": "input_text", "text": "?"}, image]}]}
    assert (await client.post("/v1/responses", json=body, headers=h)).status_code == 200
    r = await client.post("/v1/responses", json={**body, "model": "gen"}, headers=h)
    assert r.status_code == 400 and "Model `gen`" in r.json()["error"]["message"]
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    for data, status in ((base64.b64encode(png()).decode(), 200), (base64.b64encode(png(100, 100)).decode(), 400)):
        block["source"]["data"] = data  # type: ignore[index]
        msg = {"model": "vis", "max_tokens": 2, "messages": [{"role": "user", "content": [block]}]}
        r = await client.post("/v1/messages", json=msg, headers=h)
        assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and "pixels" in r.json()["error"]["message"]
    r = await client.post("/v1/messages", json={**msg, "model": "gen"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# ---- audio uploads ------------------------------------------------------------------------------------------


def wav(seconds: float, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x01" * int(seconds * rate))
    return out.getvalue()


def test_audio_uploads_through_the_sdk(url: str, keys: Keys, script: EngineScript) -> None:
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=keys.all, max_retries=0)
    out = sdk.audio.transcriptions.create(model="org/asr", file=("my\r\nname.wav", wav(1.0), "audio/wav"),
                                          language="en", timestamp_granularities=["word", "segment"],
                                          response_format="verbose_json")
    assert out.text == "hello"
    sent = script.seen[-1]
    assert sent.url.path == "/v1/audio/transcriptions" and sent.headers["content-type"].startswith("multipart/")
    assert b'name="model"\r\n\r\nasr\r\n' in sent.content and wav(1.0) in sent.content  # routed name, same bytes
    assert sent.content.count(b'name="timestamp_granularities[]"') == 2 and b"my\r\nname" not in sent.content
    assert sdk.audio.translations.create(model="asr", file=("a.wav", wav(0.5), "audio/wav")).text == "hello"
    before = len(script.seen)
    refused: list[tuple[str, bytes, type[openai.APIStatusError], str]] = [
        ("asr", wav(3.0), openai.BadRequestError, "HUBSERVE_MAX_AUDIO_SECONDS"),
        ("asr", wav(20.0), openai.APIStatusError, "HUBSERVE_MAX_AUDIO_BYTES"),
        ("asr", b"no audio here", openai.BadRequestError, "not audio this server reads"),
        ("gen", wav(1.0), openai.BadRequestError, "does not take audio"),
    ]
    for model, data, error, says in refused:
        with pytest.raises(error, match=says) as caught:
            sdk.audio.transcriptions.create(model=model, file=("a.wav", data, "audio/wav"))
        assert caught.value.status_code in (400, 413)
    assert len(script.seen) == before, "a refused upload reached the engine"
    r = httpx.post(f"{url}/v1/audio/transcriptions", json={"model": "asr"}, headers=bearer(keys.all))
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]


# ---- tokenize, unknown routes -------------------------------------------------------------------------------


async def test_tokenize_dispatches_on_the_body(client: httpx.AsyncClient, keys: Keys, script: EngineScript) -> None:
    h = bearer(keys.all)
    r = await client.post("/tokenize", json={"model": "emb", "prompt": "hello"}, headers=h)
    assert r.status_code == 200 and r.json()["tokens"] == [1, 2]  # vLLM's shape, from the named model's engine
    assert script.seen[-1].url.path == "/tokenize" and json.loads(script.seen[-1].content)["model"] == "emb"
    r = await client.post("/tokenize", json={"model": "nope", "prompt": "hello"}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # OpenAI's shape
    r = await client.post("/tokenize", json={"inputs": "hello"}, headers=h)
    assert r.status_code == 200 and isinstance(r.json(), list)  # TGI's shape


async def test_unknown_route_says_what_was_asked(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.post("/v1/nothing-here", json={}, headers=bearer(keys.all))
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "This server has no route POST /v1/nothing-here; see /docs for the " \
        "routes it serves."


async def test_every_path_parameter_is_declared_in_the_schema(client: httpx.AsyncClient) -> None:
    """Schema-driven clients and fuzzers (schemathesis) need each ``{param}`` of a path declared; the
    ``/models/{repo_id}/v1/...`` routers declare theirs with a dependency."""
    import re

    schema = (await client.get("/openapi.json", headers={"Authorization": f"Bearer {FLAT_KEY}"})).json()
    missing = []
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            missing += [f"{method.upper()} {path}: {name}" for name in re.findall(r"\{(\w+)", path)
                        if name not in declared]
    assert not missing


async def test_max_new_tokens_cap_on_responses_and_messages(tmp_path: Path, keys: Keys, script: EngineScript) -> None:
    """HUBSERVE_MAX_NEW_TOKENS reads each family's own field from the body the route parsed (rewritten or not)."""
    app, _ = build_app(tmp_path, script, max_new_tokens=64)
    h = bearer(keys.all)
    async with asgi_client(app) as c:
        r = await c.post("/v1/responses", json={"model": "gen", "input": "hi", "max_output_tokens": 65}, headers=h)
        assert r.status_code == 400 and "`max_output_tokens` must be <= 64" in r.json()["error"]["message"]
        r = await c.post("/v1/messages", json={"model": "gen", "max_tokens": 65, "messages": HI}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert (await c.post("/v1/responses", json={"input": "hi"}, headers=h)).status_code == 200  # the default
        sent = json.loads(script.seen[-1].content)
        assert sent["max_output_tokens"] == 64 and sent["model"] == "gen"  # capped and renamed in one body
