"""TGI and Hub Inference API families, pure parts: TGI's validation rules, the translation to vLLM's
/v1/completions and /v1/embeddings bodies, and vLLM's answers (whole and streamed) back to TGI's shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi.responses import StreamingResponse

from server.engines.base import ModelInfo
from server.engines.client import engine_error
from server.errors import EngineUnavailable, GenerationError, InvalidRequest, Overloaded
from server.hub.serving import embed, embeddings_body, similarity
from server.openai.serving import chat_payload
from server.registry import Registry
from server.tasks.requests import parse_embed, parse_similarity
from server.tgi.protocol import GenerateRequest, parse_generate, parse_tokenize
from server.tgi.serving import TGIService, dump_event, dump_generate
from server.tgi.tokens import TokenTexts
from server.tgi.translate import StreamTranslator, completion_body, finish_reason, generate_response
from tests.fixtures.scripted_engine import Handler, ScriptedEngine

pytestmark = pytest.mark.unit

VOCAB = TokenTexts(frozenset({1, 2}))  # no tokenizer: texts come from vLLM


def req(**parameters: Any) -> GenerateRequest:
    return parse_generate({"inputs": "What is the capital of France?", "parameters": parameters})


# ---- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"temperature": -1.0}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 0}, "`truncate` must be strictly positive. Given: 0"),
    ],
)
def test_tgi_validation_rules(parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        req(**parameters)
    assert err.value.message == message
    assert err.value.tgi_type == "validation"


def test_inputs_must_not_be_empty_and_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="`inputs` cannot be empty"):
        parse_generate({"inputs": ""})
    with pytest.raises(InvalidRequest, match="inputs"):
        parse_generate({"parameters": {}})
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_generate(["not", "an", "object"])
    with pytest.raises(InvalidRequest, match=r"parameters\.max_new_tokens"):
        parse_generate({"inputs": "x", "parameters": {"max_new_tokens": "many"}})


def test_unknown_fields_and_legacy_options_are_accepted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="hubserve.tgi")
    r = parse_generate(
        {
            "inputs": "hi",
            "parameters": {"max_new_tokens": 3, "future_knob": 1},
            "options": {"wait_for_model": True, "use_cache": False},
            "extra": True,
        }
    )
    assert r.parameters.max_new_tokens == 3
    assert "parameters.future_knob" in caplog.text and "extra" in caplog.text


def test_valid_limits_pass() -> None:
    r = req(temperature=0.5, top_p=0.99, top_k=1, repetition_penalty=1.2, frequency_penalty=-2, stop=list("abcd"))
    assert r.parameters.sampling
    assert parse_tokenize({"inputs": "hello"}).inputs == "hello"


# ---- request translation -----------------------------------------------------------------------------------


def test_greedy_by_default_and_every_knob_explicit() -> None:
    body = completion_body(req(max_new_tokens=20), "smollm2", 20, stream=False)
    assert body["temperature"] == 0.0  # do_sample false, no warper: greedy (overrides generation_config.json)
    assert body["top_p"] == 1.0 and body["top_k"] == 0 and body["repetition_penalty"] == 1.0
    assert body["max_tokens"] == 20 and body["model"] == "smollm2" and body["n"] == 1
    assert body["return_token_ids"] is True and body["logprobs"] == 0
    assert body["include_stop_str_in_output"] is True
    assert "seed" not in body and "prompt_logprobs" not in body and "structured_outputs" not in body


def test_sampling_parameters_map_through() -> None:
    body = completion_body(
        req(do_sample=True, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=["\n"]), "m", 5, stream=True
    )
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (0.7, 0.9, 40, 7)
    assert body["stop"] == ["\n"] and body["stream"] is True
    assert completion_body(req(do_sample=True), "m", 5, False)["temperature"] == 1.0
    assert completion_body(req(temperature=0.3), "m", 5, False)["temperature"] == 0.3  # a warper means sampling


def test_details_top_tokens_truncate_best_of() -> None:
    body = completion_body(req(decoder_input_details=True, details=True, top_n_tokens=3, truncate=10), "m", 5, False)
    assert body["prompt_logprobs"] == 0
    assert body["logprobs"] == 3 and body["return_tokens_as_token_ids"] is True
    assert body["truncate_prompt_tokens"] == 10 and body["truncation_side"] == "left"
    assert completion_body(req(best_of=2, do_sample=True), "m", 5, False)["n"] == 2


@pytest.mark.parametrize(
    ("grammar", "expected"),
    [
        ({"type": "json", "value": {"type": "object"}}, {"json": {"type": "object"}}),
        ({"type": "json_schema", "value": {"name": "x", "schema": {"type": "object"}}}, {"json": {"type": "object"}}),
        ({"type": "regex", "value": "[0-9]+"}, {"regex": "[0-9]+"}),
    ],
)
def test_grammar_becomes_structured_outputs(grammar: dict[str, Any], expected: dict[str, Any]) -> None:
    assert completion_body(req(grammar=grammar), "m", 5, False)["structured_outputs"] == expected


def test_bad_grammar_is_a_validation_error() -> None:
    with pytest.raises(InvalidRequest):
        req(grammar={"type": "xml", "value": "<a/>"})
    with pytest.raises(InvalidRequest):
        req(grammar={"type": "regex", "value": {"not": "a string"}})


@pytest.mark.parametrize(
    ("reason", "stop_reason", "expected"),
    [
        ("length", None, "length"),
        ("stop", None, "eos_token"),
        ("stop", 2, "eos_token"),
        ("stop", "\n", "stop_sequence"),
    ],
)
def test_finish_reason(reason: str, stop_reason: object, expected: str) -> None:
    assert finish_reason(reason, stop_reason) == expected


# ---- answers -----------------------------------------------------------------------------------------------

# Trimmed from a real vLLM 0.32 answer (SmolLM2, logprobs=0, return_token_ids, prompt_logprobs=0).
COMPLETION = {
    "choices": [
        {
            "index": 0,
            "text": "Paris.",
            "logprobs": {
                "tokens": [" Paris", ".", "<|im_end|>"],
                "token_logprobs": [-0.03, -0.19, -0.35],
                "top_logprobs": [{" Paris": -0.03}, {".": -0.19}, {"<|im_end|>": -0.35}],
                "text_offset": [0, 6, 7],
            },
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": [7042, 30, 2],
            "prompt_token_ids": [1, 4093, 198],
            "prompt_logprobs": [
                None,
                {"4093": {"logprob": -13.9, "rank": 11259, "decoded_token": "user"}},
                {"198": {"logprob": -3.3, "rank": 1, "decoded_token": "\n"}},
            ],
        }
    ]
}


def test_generate_response_with_details_and_prefill() -> None:
    r = generate_response(req(details=True, decoder_input_details=True), COMPLETION, VOCAB)
    assert r.generated_text == "Paris."
    assert r.details is not None
    d = r.details
    assert (d.finish_reason, d.generated_tokens, d.seed) == ("eos_token", 3, None)
    assert [(t.id, t.text, t.special) for t in d.tokens] == [
        (7042, " Paris", False),
        (30, ".", False),
        (2, "<|im_end|>", True),
    ]
    assert d.tokens[0].logprob == pytest.approx(-0.03)
    assert [(p.id, p.text, p.logprob) for p in d.prefill] == [(1, "", None), (4093, "user", -13.9), (198, "\n", -3.3)]
    data = dump_generate(r)
    assert "top_tokens" not in data["details"] and "best_of_sequences" not in data["details"]
    assert data["details"]["prefill"][0]["logprob"] is None


def test_generate_response_plain_and_full_text() -> None:
    assert dump_generate(generate_response(req(), COMPLETION, VOCAB)) == {"generated_text": "Paris."}
    full = generate_response(req(return_full_text=True), COMPLETION, VOCAB)
    assert full.generated_text == "What is the capital of France?Paris."


def test_best_of_picks_the_most_likely_sequence() -> None:
    worse = json.loads(json.dumps(COMPLETION["choices"][0]))
    worse |= {"index": 1, "text": "Lyon", "token_ids": [9], "finish_reason": "length"}
    worse["logprobs"] = {"tokens": ["Lyon"], "token_logprobs": [-9.0], "top_logprobs": [{"Lyon": -9.0}]}
    completion = {"choices": [worse, COMPLETION["choices"][0]]}
    r = generate_response(req(best_of=2, do_sample=True, details=True), completion, VOCAB)
    assert r.generated_text == "Paris."
    assert r.details is not None and r.details.best_of_sequences is not None
    assert [s.generated_text for s in r.details.best_of_sequences] == ["Lyon"]


def test_top_tokens_from_token_id_form() -> None:
    class Texts(TokenTexts):
        def decode(self, token_id: int) -> str:
            return {7042: " Paris", 11: " Lyon"}.get(token_id, "?")

    choice = {
        "text": " Paris",
        "token_ids": [7042],
        "finish_reason": "length",
        "logprobs": {
            "tokens": ["token_id:7042"],
            "token_logprobs": [-0.1],
            "top_logprobs": [{"token_id:7042": -0.1, "token_id:11": -2.5}],
        },
    }
    r = generate_response(req(details=True, top_n_tokens=2), {"choices": [choice]}, Texts(frozenset()))
    assert r.details is not None and r.details.top_tokens is not None
    assert r.details.tokens[0].text == " Paris"
    assert [(t.id, t.text) for t in r.details.top_tokens[0]] == [(7042, " Paris"), (11, " Lyon")]


# ---- streams -----------------------------------------------------------------------------------------------


def chunk(text: str, ids: list[int], reason: str | None = None, stop: object = None, **extra: Any) -> dict[str, Any]:
    logprobs = {"tokens": [text] if ids else [], "token_logprobs": [-0.5] * len(ids), "top_logprobs": []}
    choice = {"index": 0, "text": text, "token_ids": ids, "logprobs": logprobs, "finish_reason": reason}
    return {"choices": [choice | {"stop_reason": stop} | extra]}


def test_stream_events_one_per_token_last_one_carries_the_text() -> None:
    t = StreamTranslator(req(details=True, stop=[" Paris"]), VOCAB)
    events = [
        *t.feed(chunk("The", [504], prompt_token_ids=[1, 2, 3, 4])),
        *t.feed(chunk(" capital", [3575])),
        *t.feed(chunk(" Paris", [7042], "stop", " Paris")),
    ]
    assert [e.index for e in events] == [1, 2, 3]
    assert [e.generated_text for e in events] == [None, None, "The capital Paris"]
    assert events[0].details is None and events[2].details is not None
    assert events[2].details.model_dump() == {
        "finish_reason": "stop_sequence",
        "generated_tokens": 3,
        "input_length": 4,
        "seed": None,
    }
    assert t.finished
    first = json.loads(dump_event(events[0])[len(b"data:") :])
    assert first == {
        "index": 1,
        "token": {"id": 504, "text": "The", "logprob": -0.5, "special": False},
        "generated_text": None,
        "details": None,
    }
    assert dump_event(events[0]).endswith(b"\n\n") and dump_event(events[0]).startswith(b"data:{")


def test_stream_finish_in_a_chunk_without_tokens() -> None:
    t = StreamTranslator(req(details=True), VOCAB)
    events = [*t.feed(chunk("Hi", [5])), *t.feed(chunk("", [], "length"))]
    assert [e.token.text for e in events] == ["Hi", ""]
    assert events[-1].generated_text == "Hi" and events[-1].token.special
    assert events[-1].details is not None and events[-1].details.generated_tokens == 1


# ---- engine errors -----------------------------------------------------------------------------------------


def test_engine_errors_map_to_hubserve_exceptions() -> None:
    body = json.dumps({"error": {"message": "max_tokens=5000 cannot be greater than max_model_len=2048."}}).encode()
    err = engine_error(400, body)
    assert isinstance(err, InvalidRequest) and "max_model_len" in err.message
    assert isinstance(engine_error(429, b"{}"), Overloaded)
    assert isinstance(engine_error(503, b"busy"), EngineUnavailable)
    boom = engine_error(500, b"not json")
    assert isinstance(boom, GenerationError) and boom.tgi_type == "generation" and boom.message == "not json"


# ---- Hub Inference API -------------------------------------------------------------------------------------


def test_embed_request_defaults_and_body() -> None:
    r = parse_embed({"inputs": "hello", "options": {"wait_for_model": True}})
    assert r.texts == ["hello"] and r.normalize
    body = embeddings_body(r, "minilm")
    assert body == {"model": "minilm", "input": ["hello"], "encoding_format": "float", "use_activation": True}
    r = parse_embed({"inputs": ["a", "b"], "normalize": False, "truncate": True, "truncation_direction": "Left"})
    body = embeddings_body(r, "minilm", prompt="query: ")
    assert body["input"] == ["query: a", "query: b"] and body["use_activation"] is False
    assert body["truncate_prompt_tokens"] == -1 and body["truncation_side"] == "left"


def test_embed_request_legacy_parameters_and_errors() -> None:
    assert parse_embed({"inputs": "x", "parameters": {"normalize": False}}).normalize is False
    with pytest.raises(InvalidRequest, match="`inputs` cannot be empty"):
        parse_embed({"inputs": []})
    with pytest.raises(InvalidRequest, match="dimensions"):
        parse_embed({"inputs": "x", "dimensions": 0})


def test_chat_payload_rewrites_model_and_tgi_json_format() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    out = chat_payload(
        {"model": "dummy", "messages": [], "response_format": {"type": "json_object", "value": schema}}, "smollm2"
    )
    assert out["model"] == "smollm2"
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
    assert chat_payload({"model": "dummy", "response_format": {"type": "json_object"}}, "m")["response_format"] == {
        "type": "json_object"
    }


# ---- token tables ------------------------------------------------------------------------------------------


def test_token_texts_from_a_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<s>": 0, "hello": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    texts = TokenTexts.from_snapshot(tmp_path)
    assert texts.has_tokenizer and texts.is_special(0) and not texts.is_special(1)
    assert texts.decode(2) == "world"
    assert texts.offsets("hello world") == [(1, 0, 5), (2, 6, 11)]
    bare = TokenTexts.from_snapshot(tmp_path / "missing")
    assert not bare.has_tokenizer and bare.decode(1) == "" and bare.offsets("x") is None


# ---- serving against a fake engine (httpx.MockTransport: in memory, no sockets) ----------------------------


def fake_engine(handler: Handler, task: str = "text-generation") -> ScriptedEngine:
    info = ModelInfo(name="m", repo="org/m", commit="c" * 40, task=task, snapshot="/nonexistent")
    return ScriptedEngine(info, handler, max_model_len=64)


def sse_body(*chunks: object) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else json.dumps(c).encode()) + b"\n\n" for c in chunks)


def engine_with(answers: dict[str, httpx.Response], task: str = "text-generation") -> ScriptedEngine:
    def handler(request: httpx.Request) -> httpx.Response:
        engine.requests.append({"path": request.url.path, **json.loads(request.content)})
        return answers[request.url.path]

    engine = fake_engine(handler, task)
    return engine


def service_for(engine: ScriptedEngine) -> TGIService:
    """A TGIService over a registry that serves just ``engine``."""
    return TGIService(Registry([engine]))


async def collect(response: StreamingResponse) -> list[dict[str, Any]]:
    return [json.loads(cast(bytes, part)[len(b"data:") :]) async for part in response.body_iterator]


async def test_stream_error_after_start_is_one_event_and_the_slot_is_released() -> None:
    body = sse_body(chunk("Hi", [5]), {"error": {"message": "engine blew up", "code": 500}})
    engine = engine_with(
        {"/v1/completions": httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})}
    )
    events = await collect(await service_for(engine).open_stream(engine, req(max_new_tokens=5)))
    assert events[0]["token"]["text"] == "Hi"
    assert events[-1] == {"error": "engine blew up", "error_type": "generation"}
    assert engine.in_flight == 0


async def test_stream_cut_before_the_finish_is_an_error_event() -> None:
    body = sse_body(chunk("Hi", [5]), b"[DONE]")
    engine = engine_with({"/v1/completions": httpx.Response(200, content=body)})
    events = await collect(await service_for(engine).open_stream(engine, req(max_new_tokens=5)))
    assert events[-1]["error_type"] == "incomplete_generation"
    assert "before the generation finished" in events[-1]["error"]


async def test_stream_refusals_are_http_errors_before_the_stream() -> None:
    refusal = httpx.Response(400, json={"error": {"message": "bad prompt"}})
    engine = engine_with({"/v1/completions": refusal})
    with pytest.raises(InvalidRequest, match="bad prompt"):
        await service_for(engine).open_stream(engine, req(max_new_tokens=5))
    assert engine.in_flight == 0
    with pytest.raises(InvalidRequest, match="not allowed for this endpoint"):
        await service_for(engine).open_stream(engine, req(best_of=2, do_sample=True))
    with pytest.raises(InvalidRequest, match="not supported when streaming"):
        await service_for(engine).open_stream(engine, req(decoder_input_details=True))


async def test_generate_fills_the_context_when_max_new_tokens_is_unset() -> None:
    engine = engine_with(
        {
            "/tokenize": httpx.Response(200, json={"count": 10, "max_model_len": 64, "tokens": list(range(10))}),
            "/v1/completions": httpx.Response(200, json=COMPLETION),
        }
    )
    out = await service_for(engine).generate(engine, req())
    assert out.generated_text == "Paris."
    assert engine.requests[-1]["max_tokens"] == 54 and engine.requests[-1]["model"] == "m"


async def test_generate_too_long_and_engine_failures() -> None:
    tokenize = httpx.Response(200, json={"count": 10, "max_model_len": 64})
    engine = engine_with({"/tokenize": tokenize, "/v1/completions": httpx.Response(500, json={"error": "oom"})})
    with pytest.raises(InvalidRequest) as err:
        await service_for(engine).generate(engine, req(max_new_tokens=64))
    assert (
        err.value.message
        == "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 10 `inputs` tokens and 64 `max_new_tokens`"
    )
    with pytest.raises(GenerationError, match="oom"):
        await service_for(engine).generate(engine, req(max_new_tokens=5))
    assert engine.in_flight == 0


async def test_generate_on_an_embedding_model_is_refused() -> None:
    engine = engine_with({}, task="feature-extraction")
    with pytest.raises(InvalidRequest, match="does not generate text"):
        await service_for(engine).generate(engine, req(max_new_tokens=5))


async def test_embed_and_sentence_similarity() -> None:
    vectors = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]}

    def answer(request: httpx.Request) -> httpx.Response:
        texts = json.loads(request.content)["input"]
        return httpx.Response(200, json={"data": [{"index": i, "embedding": vectors[t]} for i, t in enumerate(texts)]})

    engine = fake_engine(answer, task="feature-extraction")
    assert await embed(Registry([engine]), engine, parse_embed({"inputs": "c"})) == [[1.0, 1.0]]
    scores = await similarity(
        Registry([engine]), engine, parse_similarity({"inputs": {"source_sentence": "a", "sentences": ["a", "b", "c"]}})
    )
    assert scores == pytest.approx([1.0, 0.0, 2**-0.5])
