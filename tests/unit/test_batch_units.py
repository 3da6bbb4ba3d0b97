"""The Batch API's pure parts: input-file validation (OpenAI's error codes), result files in input order, the
create body's bounds, and which key a batch runs as once keys change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.batch.jobs import decode_requests, encode_requests, validate_input
from server.batch.protocol import BatchCreate, BatchRequest, allowed_endpoint
from server.batch.runner import assemble, current_principal
from server.errors import InvalidRequest
from server.ops.context import ANONYMOUS, Principal
from server.settings import hash_key

pytestmark = pytest.mark.unit
CHAT = "/v1/chat/completions"


def line(custom_id: str = "a", **over: object) -> bytes:
    obj = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {"model": "m", "messages": []}} | over
    return json.dumps(obj).encode() + b"\n"


def test_a_good_file_gives_its_requests_and_they_round_trip() -> None:
    requests, errors = validate_input(line("a") + b"\n" + line("b"), CHAT, 10)  # blank lines are skipped
    assert errors == [] and [r.custom_id for r in requests] == ["a", "b"] and requests[0].model == "m"
    assert decode_requests(encode_requests(requests)) == requests


@pytest.mark.parametrize(("data", "code", "param"), [
    (line("a") + line("a"), "duplicate_custom_id", "custom_id"),
    (b"[1]\n", "invalid_json_line", None),
    (b"{nope\n", "invalid_json_line", None),
    (line(""), "missing_required_parameter", "custom_id"),
    (line(method="GET"), "invalid_method", "method"),
    (line(url="/v1/embeddings"), "invalid_url", "url"),
    (line(body=[1]), "invalid_request", "body"),
    (line(body={"model": "m", "stream": True}), "invalid_request", "body.stream"),
    (b"", "empty_file", None),
    (b"\xff\xfe", "invalid_file_format", None),
])
def test_each_bad_line_is_named_with_openais_code(data: bytes, code: str, param: str | None) -> None:
    _, errors = validate_input(data, CHAT, 10)
    assert [(e.code, e.param) for e in errors][-1:] == [(code, param)]
    assert all(e.line is None or e.line >= 1 for e in errors)


def test_too_many_lines_is_a_400_naming_the_setting() -> None:
    with pytest.raises(InvalidRequest, match="HUBSERVE_BATCH_MAX_LINES"):
        validate_input(line("a") + line("b"), CHAT, 1)


def test_endpoints_and_the_create_body() -> None:
    assert allowed_endpoint("/v1/responses") and allowed_endpoint("/models/org/emb")
    assert not allowed_endpoint("/v1/moderations") and not allowed_endpoint("/models/../x")
    assert not allowed_endpoint("/models/a/b/c")
    with pytest.raises(ValueError, match="metadata"):
        BatchCreate(input_file_id="file-x", endpoint=CHAT, completion_window="24h",
                    metadata={str(i): "v" for i in range(17)})
    assert BatchRequest(custom_id="x", url="/models/org/emb", body={}).model == "org/emb"


def test_result_files_are_in_input_order_and_expired_lines_are_errors() -> None:
    requests = [BatchRequest(custom_id=c, url=CHAT, body={}) for c in "abc"]
    done = {2: {"ok": True, "line": {"custom_id": "c"}}, 0: {"ok": False, "line": {"custom_id": "a"}}}
    out, err = assemble(requests, done, expired=False)
    assert out == b'{"custom_id": "c"}\n' and err == b'{"custom_id": "a"}\n'
    _, err = assemble(requests, done, expired=True)
    rows = [json.loads(x) for x in err.splitlines()]
    assert [r["custom_id"] for r in rows] == ["a", "b"] and rows[1]["error"]["code"] == "batch_expired"


def test_a_batch_runs_as_its_key_is_now(tmp_path: Path) -> None:
    from server.ops.keys import new_key, write_keys

    path = tmp_path / "keys.toml"
    _, record = new_key("team", ("m",), 5, None)
    write_keys(path, {record.id: record})
    team = Principal("team")
    assert current_principal(team, True, frozenset, path) == Principal("team", frozenset({"m"}), 5, None)
    write_keys(path, {})
    assert current_principal(team, True, frozenset, path) is None  # revoked
    flat = Principal(f"key-{hash_key('k')[:8]}")
    assert current_principal(flat, True, lambda: frozenset({hash_key("k")}), None) == flat
    assert current_principal(flat, True, frozenset, None) is None
    assert current_principal(ANONYMOUS, True, frozenset, None) is None  # submitted with auth off, keys now on
    assert current_principal(team, False, frozenset, None) == team
