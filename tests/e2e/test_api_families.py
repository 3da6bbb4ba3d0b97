"""Every API family clients speak, on real engines of the session server, through the stock SDKs: OpenAI
Responses, Anthropic Messages, images in chats (the answer equals transformers' in-process), audio
transcription (equal to transformers' greedy decoding), vLLM's tokenize/detokenize and score, and each
family's 401/403/404/429 as its own SDK's exception classes."""

from __future__ import annotations

import base64
import io
import json
import math
import wave
from typing import Any

import anthropic
import httpx
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from PIL import Image

from tests.e2e.conftest import CANARY, HubserveServer
from tests.fixtures.tiny import minilm_dir
from tests.fixtures.vision import tiny_vlm_dir
from tests.fixtures.whisper import tiny_whisper_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

GREEDY = {"temperature": 0}
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def oai(hubserve_server: HubserveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hubserve_server.url}/v1", api_key=hubserve_server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def claude(hubserve_server: HubserveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=hubserve_server.url, api_key=hubserve_server.api_key, max_retries=0)


def access_lines(server: HubserveServer, route: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in server.log_path.read_text(errors="replace").splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("logger") == "hubserve.access" and x.get("route") == route]


# ---- OpenAI Responses ----------------------------------------------------------------------------------------


def test_responses_create_retrieve_and_continue(oai: openai.OpenAI, hubserve_server: HubserveServer) -> None:
    first = oai.responses.create(model="smollm2", input="What is the capital of France?",
                                 instructions="Answer in one short sentence.", max_output_tokens=24, temperature=0)
    assert first.status == "completed" and "Paris" in first.output_text
    assert first.instructions == "Answer in one short sentence." and first.usage is not None
    again = oai.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    follow = oai.responses.create(model="smollm2", input="And of Italy?", previous_response_id=first.id,
                                  max_output_tokens=24, temperature=0)
    assert "Rome" in follow.output_text and follow.previous_response_id == first.id
    line = access_lines(hubserve_server, "/v1/responses")[-1]
    assert line["tokens_in"] == follow.usage.input_tokens and line["tokens_out"] == follow.usage.output_tokens  # type: ignore[union-attr]
    assert line["commit"] == hubserve_server.commits["smollm2"]
    by_path = openai.OpenAI(base_url=f"{hubserve_server.url}/models/HuggingFaceTB/SmolLM2-135M-Instruct/v1",
                            api_key=hubserve_server.api_key, max_retries=0)
    assert by_path.responses.retrieve(first.id).output_text == first.output_text


def test_responses_token_cap_ends_incomplete(oai: openai.OpenAI) -> None:
    out = oai.responses.create(model="smollm2", input="Tell me a long story about a dragon.", max_output_tokens=8)
    assert out.status == "incomplete" and out.incomplete_details is not None
    assert out.incomplete_details.reason == "max_output_tokens"


def test_responses_stream(oai: openai.OpenAI, hubserve_server: HubserveServer) -> None:
    with oai.responses.stream(model="smollm2", input=f"Say hi to {CANARY}.", max_output_tokens=16,
                              temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == final.output_text and final.output_text
    assert oai.responses.retrieve(final.id).output_text == final.output_text  # remembered from the stream
    line = access_lines(hubserve_server, "/v1/responses")[-1]
    assert line["tokens_out"] == final.usage.output_tokens and line["ttft_s"] is not None  # type: ignore[union-attr]


def test_responses_function_call_round_trip(oai: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "The weather of a city.",
            "parameters": WEATHER_SCHEMA}
    call = oai.responses.create(model="smollm2", input="What is the weather in Paris?", tools=[tool],  # type: ignore[list-item]
                                tool_choice="required", max_output_tokens=64, temperature=0)
    calls = [item for item in call.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    answer = oai.responses.create(
        model="smollm2", previous_response_id=call.id, max_output_tokens=24, temperature=0, tools=[tool],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}],
    )
    assert answer.status in ("completed", "incomplete") and answer.output_text


def test_responses_background_cancel(oai: openai.OpenAI) -> None:
    queued = oai.responses.create(model="smollm2", input="Tell me a long story.", background=True, store=True,
                                  max_output_tokens=200)
    assert queued.status in ("queued", "in_progress")
    assert oai.responses.cancel(queued.id).status == "cancelled"
    assert oai.responses.retrieve(queued.id).status == "cancelled"


# ---- Anthropic Messages ----------------------------------------------------------------------------------------


def test_messages_create_with_system(claude: anthropic.Anthropic, hubserve_server: HubserveServer) -> None:
    asked: list[anthropic.types.MessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
    system = "Answer in one short sentence."
    out = claude.messages.create(model="smollm2", max_tokens=24, system=system, messages=asked, extra_body=GREEDY)
    text = "".join(b.text for b in out.content if b.type == "text")
    assert "Paris" in text and out.role == "assistant" and out.stop_reason in ("end_turn", "max_tokens")
    counted = claude.messages.count_tokens(model="smollm2", system=system, messages=asked)
    assert counted.input_tokens == out.usage.input_tokens
    line = access_lines(hubserve_server, "/v1/messages")[-1]
    assert (line["tokens_in"], line["tokens_out"]) == (out.usage.input_tokens, out.usage.output_tokens)


def test_messages_stream(claude: anthropic.Anthropic, hubserve_server: HubserveServer) -> None:
    with claude.messages.stream(model="smollm2", max_tokens=12, extra_body=GREEDY,
                                messages=[{"role": "user", "content": f"Say hi to {CANARY}."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == "".join(b.text for b in final.content if b.type == "text")
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    line = access_lines(hubserve_server, "/v1/messages")[-1]
    assert line["tokens_out"] == 12 and line["tokens_in"] == final.usage.input_tokens


def test_messages_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    """The client's tool_use block and its tool_result reach the model, which answers from the result."""
    tools: list[anthropic.types.ToolParam] = [
        {"name": "get_weather", "description": "The weather of a city.", "input_schema": WEATHER_SCHEMA}
    ]
    turns: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "Sunny, 21 C"}]},
    ]
    out = claude.messages.create(model="smollm2", max_tokens=24, tools=tools, messages=turns, extra_body=GREEDY)
    assert out.content and out.content[0].type in ("text", "tool_use") and out.usage.input_tokens > 30


# ---- images: the answer equals transformers' for the same model and input ---------------------------------------


def striped_png() -> bytes:
    image = Image.new("RGB", (48, 40), (200, 30, 60))
    for x in range(0, 48, 6):
        for y in range(40):
            image.putpixel((x, y), (20, 220, 90))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def vlm_reference() -> dict[str, Any]:
    """transformers in-process on the same snapshot: prompt length and 8 greedy tokens, image after the text."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = tiny_vlm_dir()
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    image = Image.open(io.BytesIO(striped_png())).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                             {"type": "image", "image": image}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "ids": new,
            "text": processor.tokenizer.decode(new, skip_special_tokens=True)}


def image_content(uri: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": uri}}]


def test_chat_with_an_image_equals_transformers(oai: openai.OpenAI, hubserve_server: HubserveServer,
                                                vlm_reference: dict[str, Any]) -> None:
    uri = "data:image/png;base64," + base64.b64encode(striped_png()).decode()
    out = oai.chat.completions.create(model="vlm", max_tokens=8, temperature=0,
                                      messages=[{"role": "user", "content": image_content(uri)}],  # type: ignore[typeddict-item]
                                      extra_body={"return_token_ids": True})
    assert out.usage is not None and out.usage.prompt_tokens == vlm_reference["prompt_tokens"]
    assert (out.choices[0].model_extra or {}).get("token_ids") == vlm_reference["ids"]
    assert out.choices[0].message.content == vlm_reference["text"]
    client = InferenceClient(model=f"{hubserve_server.url}/models/vlm", token=hubserve_server.api_key, timeout=120)
    hub = client.chat_completion([{"role": "user", "content": image_content(uri)}], max_tokens=8, temperature=0)
    assert hub.choices[0].message.content == vlm_reference["text"]
    other = "data:image/png;base64," + base64.b64encode(_solid_png()).decode()
    changed = oai.chat.completions.create(model="vlm", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": image_content(other)}])  # type: ignore[typeddict-item]
    assert changed.choices[0].message.content != vlm_reference["text"], "the image did not reach the model"


def _solid_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(out, format="PNG")
    return out.getvalue()


def test_images_in_responses_and_messages(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    data = base64.b64encode(striped_png()).decode()
    chat = oai.chat.completions.create(  # image first: the order Responses and Messages use below
        model="vlm", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [image_content("data:image/png;base64," + data)[1],  # type: ignore[list-item]
                                               {"type": "text", "text": "What is in this picture?"}]}],
    )
    response = oai.responses.create(model="vlm", max_output_tokens=8, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64," + data,
                                     "detail": "auto"},
                                    {"type": "input_text", "text": "What is in this picture?"}]}])
    message = claude.messages.create(model="vlm", max_tokens=8, extra_body=GREEDY, messages=[{
        "role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": data}},
                                    {"type": "text", "text": "What is in this picture?"}]}])
    assert response.output_text == chat.choices[0].message.content
    assert message.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert message.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]


def test_text_only_model_given_an_image(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    uri = "data:image/png;base64," + base64.b64encode(striped_png()).decode()
    with pytest.raises(openai.BadRequestError, match="Model `smollm2` takes text input only"):
        oai.chat.completions.create(model="smollm2", max_tokens=2,
                                    messages=[{"role": "user", "content": image_content(uri)}])  # type: ignore[typeddict-item]
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": uri.split(",")[1]}}
    with pytest.raises(anthropic.BadRequestError, match="Model `smollm2` takes text input only"):
        claude.messages.create(model="smollm2", max_tokens=2, messages=[{"role": "user", "content": [block]}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="offline"):
        oai.chat.completions.create(model="vlm", max_tokens=2,
                                    messages=[{"role": "user", "content": image_content("https://example.com/x.png")}])  # type: ignore[typeddict-item]


# ---- audio: transcription equals transformers' greedy decoding ---------------------------------------------------


def tone_wav(seconds: float = 1.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).normal(0, 0.05, t.shape)
    samples = np.clip(0.4 * np.sin(2 * math.pi * 440 * t) + noise, -1, 1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return out.getvalue()


def whisper_reference(wav: bytes, task: str) -> str:
    import soundfile
    import torch
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    folder = tiny_whisper_dir()
    processor = AutoProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
    with torch.inference_mode():
        out = model.generate(features, language="en", task=task, max_new_tokens=8)
    return str(processor.batch_decode(out, skip_special_tokens=True)[0])


@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_audio_equals_transformers(oai: openai.OpenAI, task: str) -> None:
    wav = tone_wav()
    cap = {"max_completion_tokens": 8}  # the tiny random model never ends on its own
    if task == "transcribe":
        out = oai.audio.transcriptions.create(model="whisper", file=("tone.wav", wav, "audio/wav"), language="en",
                                              temperature=0, extra_body=cap)
    else:
        out = oai.audio.translations.create(model="whisper", file=("tone.wav", wav, "audio/wav"), temperature=0,
                                            extra_body={**cap, "language": "en"})
    assert out.text == whisper_reference(wav, task) and out.text


def test_audio_refusals(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not audio this server reads"):
        oai.audio.transcriptions.create(model="whisper", file=("x.wav", b"not audio at all", "audio/wav"))
    with pytest.raises(openai.BadRequestError, match="does not take audio"):
        oai.audio.transcriptions.create(model="smollm2", file=("tone.wav", tone_wav(0.2), "audio/wav"))


# ---- tokenize, detokenize, score ---------------------------------------------------------------------------------


def test_tokenize_every_model(hubserve_server: HubserveServer) -> None:
    from transformers import AutoTokenizer

    http = httpx.Client(base_url=hubserve_server.url, headers=hubserve_server.headers, timeout=60)
    minilm = http.post("/tokenize", json={"model": "minilm", "prompt": "hello world"}).json()
    assert minilm["tokens"] == AutoTokenizer.from_pretrained(minilm_dir())("hello world")["input_ids"]
    smol = http.post("/v1/tokenize", json={"model": "smollm2", "prompt": "hello world"}).json()
    assert http.post("/detokenize", json={"model": "smollm2", "tokens": smol["tokens"]}).json()["prompt"] == \
        "hello world"
    chat = http.post("/tokenize", json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > smol["count"]  # the chat template's tokens
    tgi = http.post("/tokenize", json={"inputs": "hello world"}).json()
    assert [t["id"] for t in tgi] == smol["tokens"]
    missing = http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_score_is_the_cosine_of_the_embeddings(oai: openai.OpenAI, hubserve_server: HubserveServer) -> None:
    texts = ["a cat sat on the mat", "a kitten on a rug", "quarterly stock prices"]
    r = httpx.post(f"{hubserve_server.url}/v1/score", headers=hubserve_server.headers, timeout=60,
                   json={"model": "minilm", "text_1": texts[0], "text_2": texts[1:]})
    scores = [d["score"] for d in r.json()["data"]]
    vectors = [e.embedding for e in oai.embeddings.create(model="minilm", input=texts).data]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert scores == pytest.approx([cos(vectors[0], v) for v in vectors[1:]], abs=1e-4)


# ---- each family's 401/403/404/429 through its SDK ---------------------------------------------------------------


def test_each_family_errors_are_its_sdks_classes(hubserve_server: HubserveServer) -> None:
    url, keys = hubserve_server.url, hubserve_server.named_keys
    hi: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]

    def o(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

    def a(key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)

    for error, key, model in ((openai.AuthenticationError, "wrong", "smollm2"),
                              (openai.NotFoundError, keys["e2e-minilm"], "smollm2"),  # not allowed: as if unknown
                              (openai.NotFoundError, hubserve_server.api_key, "no-such-model")):
        with pytest.raises(error):
            o(key).responses.create(model=model, input="hi", max_output_tokens=2)
    for a_error, key, model in ((anthropic.AuthenticationError, "wrong", "smollm2"),
                                (anthropic.NotFoundError, keys["e2e-minilm"], "smollm2"),
                                (anthropic.NotFoundError, hubserve_server.api_key, "no-such-model")):
        with pytest.raises(a_error) as caught:
            a(key).messages.create(model=model, max_tokens=2, messages=hi)
        assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "error"
    one = keys["e2e-one-rpm"]  # one request a minute
    o(one).responses.create(model="smollm2", input="hi", max_output_tokens=2)
    with pytest.raises(openai.RateLimitError):
        o(one).responses.create(model="smollm2", input="hi", max_output_tokens=2)
    with pytest.raises(anthropic.RateLimitError) as limited:
        a(one).messages.create(model="smollm2", max_tokens=2, messages=hi)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
