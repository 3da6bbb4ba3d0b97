"""The pure parts of Idempotency-Key and the response cache: the header rule, body normalization, record scope,
which requests are cacheable, the cache key, the record format and stream checks; the models.toml fields."""

from __future__ import annotations

import hashlib

import pytest

from server.errors import InvalidIdempotencyKey
from server.ops.cache import cache_key, cacheable, route_kind
from server.ops.idempotency import check_key, digest_body, fingerprint, identity, normalize_body, record_key
from server.ops.replay import Answer, decode_record, ends_in_error, sse_events
from sync.errors import ConfigError
from sync.manifest import parse_manifest

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"


def test_the_key_header_is_1_to_255_printable_ascii() -> None:
    assert check_key(None) is None and check_key("order 42/a:b") == "order 42/a:b" and check_key("x" * 255)
    for bad in ("", "x" * 256, "a\nb", "caf\u00e9", "tab\there"):
        with pytest.raises(InvalidIdempotencyKey):
            check_key(bad)


def test_bodies_are_compared_as_canonical_json_or_with_the_multipart_boundary_blanked() -> None:
    a, payload = normalize_body(b'{"b": 1, "a": [1, 2]}', "application/json")
    b, _ = normalize_body(b'{"a":[1,2],"b":1}', "application/json")
    assert a == b == b'{"a":[1,2],"b":1}' and payload == {"a": [1, 2], "b": 1}
    assert normalize_body(b"not json {", "application/json") == (b"not json {", None)
    one = normalize_body(b"--xyz\r\nfile\r\n--xyz--", "multipart/form-data; boundary=xyz")[0]
    two = normalize_body(b"--q1w2\r\nfile\r\n--q1w2--", 'multipart/form-data; boundary="q1w2"')[0]
    assert one == two
    assert normalize_body(b"\x89PNG", "image/png") == (b"\x89PNG", None)
    assert digest_body(b'{"b":1,"a":2}', "application/json")[0] == digest_body(b'{"a": 2, "b": 1}', "")[0]
    assert fingerprint("gen", "d") != fingerprint("emb", "d")  # the same body to another model is another request


def test_records_are_scoped_to_the_key_the_route_and_the_header() -> None:
    flat = "flat-key-1"
    digest = hashlib.sha256(flat.encode()).hexdigest()
    assert identity(f"key-{digest[:8]}", flat) == f"flat:{digest}"  # the whole digest, not the 8-hex log name
    assert identity("alice", "hs_x_y") == "named:alice" and identity("-", None) == "named:-"
    base = record_key("named:alice", CHAT, "k")
    assert len({base, record_key("named:bob", CHAT, "k"), record_key("named:alice", "/v1/completions", "k"),
                record_key("named:alice", CHAT, "k2")}) == 4
    assert base == record_key("named:alice", CHAT, "k")


@pytest.mark.parametrize(("route", "task", "body", "expected"), [
    (CHAT, "text-generation", {"temperature": 0}, True),
    (CHAT, "text-generation", {"temperature": 0.0, "n": 1}, True),
    (CHAT, "text-generation", {"seed": 3, "temperature": 1.2}, True),
    (CHAT, "text-generation", {}, False),  # vLLM samples by default
    (CHAT, "text-generation", {"temperature": 0.7}, False),
    (CHAT, "text-generation", {"temperature": 0, "n": 2}, False),
    (CHAT, "text-generation", {"seed": True}, False),
    ("/models/{repo_id:path}/v1/chat/completions", "text-generation", {"temperature": 0}, True),
    ("/v1/messages", "text-generation", {"temperature": 0}, True),
    ("/v1/messages", "text-generation", {}, False),  # Anthropic's default temperature is 1
    ("/v1/completions", "text-generation", {"temperature": 0, "best_of": 2}, False),
    ("/v1/embeddings", "feature-extraction", {"input": "x"}, True),
    ("/rerank", "text-ranking", {}, True),
    ("/v1/score", "feature-extraction", {}, True),
    ("/generate", "text-generation", {"inputs": "x"}, True),  # TGI decodes greedily by default
    ("/generate", "text-generation", {"parameters": {"do_sample": True}}, False),
    ("/generate", "text-generation", {"parameters": {"temperature": 0.5}}, False),
    ("/generate", "text-generation", {"parameters": {"do_sample": True, "seed": 1}}, True),
    ("/models/{repo_id:path}", "text-classification", {"inputs": "x"}, True),
    ("/models/{repo_id:path}", "token-classification", {"inputs": "x"}, True),
    ("/", "fill-mask", {"inputs": "x"}, True),
    ("/models/{repo_id:path}", "image-classification", None, True),  # raw image bytes
    ("/models/{repo_id:path}", "text-generation", {"inputs": "x"}, True),
    ("/models/{repo_id:path}", "summarization", {"inputs": "x"}, False),  # the model's generation config may sample
    ("/models/{repo_id:path}", "summarization", {"parameters": {"generate_parameters": {"do_sample": False}}}, True),
    ("/models/{repo_id:path}", "text-to-image", {"inputs": "x", "parameters": {"seed": 5}}, True),
    ("/models/{repo_id:path}", "text-to-image", {"inputs": "x"}, False),
    ("/v1/responses", "text-generation", {"temperature": 0}, False),  # stateful: each answer is a stored object
    ("/v1/audio/transcriptions", "automatic-speech-recognition", None, False),
    (CHAT, "text-generation", None, False),  # not JSON
])
def test_what_is_cacheable(route: str, task: str, body: object, expected: bool) -> None:
    assert cacheable(route, task, body) is expected


def test_route_kinds() -> None:
    assert route_kind("/models/{repo_id:path}/v1/embeddings") == "always"
    assert route_kind("/models/{repo_id:path}/pipeline/{task}") == "hub"
    assert route_kind("/v1/tokenize") == "never"


def test_the_cache_key_changes_with_everything_that_changes_the_answer() -> None:
    args = ("gen", "a" * 40, None, CHAT, "", "d1", None)
    key = cache_key(*args)
    assert key == cache_key(*args) and key.startswith("cache:")
    variants = [("gen2",), ("gen", "b" * 40), ("gen", "a" * 40, "c" * 40), ("gen", "a" * 40, None, "/x"),
                ("gen", "a" * 40, None, CHAT, "text/event-stream"), ("gen", "a" * 40, None, CHAT, "", "d2"),
                ("gen", "a" * 40, None, CHAT, "", "d1", 16)]
    others = {cache_key(*(v + args[len(v):])) for v in variants}  # type: ignore[arg-type]
    assert key not in others and len(others) == len(variants)


def test_records_round_trip_and_markers_are_not_answers() -> None:
    answer = Answer(200, [(b"content-type", b"text/event-stream")], b"data: 1\n\ndata: 2\n\n", "gen", "a" * 40)
    meta, back = decode_record(answer.encode(fp="f", done=True))
    assert back == answer and back.stream and meta["fp"] == "f"
    assert decode_record(b'{"fp": "f", "done": false}\n') == ({"fp": "f", "done": False}, None)
    assert decode_record(b"garbage")[1] is None


def test_streams_are_cut_at_event_boundaries_and_error_endings_are_seen() -> None:
    body = b"data: a\n\nevent: x\ndata: b\n\ndata: [DONE]\n\n"
    assert sse_events(body) == [b"data: a\n\n", b"event: x\ndata: b\n\n", b"data: [DONE]\n\n"]
    assert b"".join(sse_events(body + b"tail")) == body + b"tail"
    assert not ends_in_error(body)
    assert ends_in_error(b'data: {"choices": []}\n\ndata: {"error": {"message": "engine died"}}\n\n')
    assert ends_in_error(b'data:{"error":"boom","error_type":"generation"}\n\n')  # TGI
    assert ends_in_error(b'event: error\ndata: {"type": "error", "error": {}}\n\n')  # Anthropic
    assert not ends_in_error(b'data:{"token": {}, "generated_text": "x", "details": null}\n\n')


MODEL = '[[models]]\nname = "m"\nrepo = "org/m"\nrevision = "' + "a" * 40 + '"\n'


def test_models_toml_cache_fields() -> None:
    spec = parse_manifest(MODEL + "cache = true\ncache_ttl_s = 60\n").models[0]
    assert spec.cache and spec.cache_ttl_s == 60
    assert parse_manifest(MODEL).models[0].cache is False
    with pytest.raises(ConfigError, match="cache_ttl_s is set but cache is not"):
        parse_manifest(MODEL + "cache_ttl_s = 60\n")
    with pytest.raises(ConfigError, match="cache_ttl_s"):
        parse_manifest(MODEL + "cache = true\ncache_ttl_s = 0\n")
