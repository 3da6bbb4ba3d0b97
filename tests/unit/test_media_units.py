"""server/media.py's pure part (finding media in each family's JSON) and the usage accounting of each family's
stream shape (server/ops/context.py)."""

from __future__ import annotations

import json

import pytest

from server.errors import InvalidRequest
from server.media import find_media, may_hold_media, refuse_unsupported
from server.ops import context
from server.ops.context import RequestContext, StreamUsage

pytestmark = pytest.mark.unit


def test_find_media_in_every_family_shape() -> None:
    chat = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
        {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
    ]}]}
    responses = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}
    anthropic = {"system": "s", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]},
    ]}]}
    refs = find_media(chat)
    assert [(r.kind, r.where) for r in refs] == [
        ("image", "messages[0].content[1]"), ("audio", "messages[0].content[2]"),
    ]
    assert refs[0].url == "data:image/png;base64,AA==" and refs[1].media_type == "audio/wav"
    assert [r.url for r in find_media(responses)] == ["https://x/y.png"]
    nested = find_media(anthropic)
    assert nested[0].where == "messages[0].content[0].content[0]" and nested[0].data == "AA=="
    assert find_media({"messages": [{"role": "user", "content": "no images here"}]}) == []
    tools = {"messages": [], "tools": [{"type": "function", "function": {"parameters": {"type": "image"}}}]}
    assert find_media(tools) == []  # only messages / input / system are walked
    assert may_hold_media(json.dumps(chat).encode()) and not may_hold_media(b'{"messages": "plain text"}')
    escaped = json.dumps(chat).replace('"image', '"\\u0069mage').replace('"input_audio', '"\\u0069nput_audio').encode()
    assert b'"image' not in escaped and b'"input_audio' not in escaped  # the same JSON, no marker spelled out
    assert may_hold_media(escaped) and len(find_media(json.loads(escaped))) == 2
    with pytest.raises(InvalidRequest, match="image_embeds parts are not accepted"):
        find_media({"messages": [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": "AA"}]}]})


def test_text_only_model_refuses_images_naming_it() -> None:
    refs = find_media({"input": [{"type": "input_image", "image_url": "data:image/png;base64,AA=="}]})
    with pytest.raises(InvalidRequest, match="Model `smol` takes text input only; it cannot read the image"):
        refuse_unsupported(refs, "smol", ("text",))
    refuse_unsupported(refs, "vlm", ("text", "image"))
    with pytest.raises(InvalidRequest, match="needs its image"):
        find_media({"messages": [{"content": [{"type": "image_url"}]}]})


@pytest.mark.parametrize(
    ("events", "tokens"),
    [
        ([{"choices": [{"delta": {"content": "a"}}]}, {"choices": [], "usage": {"prompt_tokens": 5,
          "completion_tokens": 2}}], (5, 2)),
        ([{"type": "response.created", "response": {"object": "response", "usage": None}},
          {"type": "response.output_text.delta", "delta": "a"},
          {"type": "response.completed", "response": {"usage": {"input_tokens": 6, "output_tokens": 3}}}], (6, 3)),
        ([{"type": "message_start", "message": {"usage": {"input_tokens": 7, "output_tokens": 1}}},
          {"type": "content_block_delta", "delta": {"text": "a"}},
          {"type": "message_delta", "usage": {"output_tokens": 4}}], (7, 4)),
        ([{"type": "content_block_delta", "delta": {"text": "a"}}] * 3, (None, 3)),  # no usage: one per event
    ],
)
def test_stream_usage_in_each_family_shape(events: list[dict[str, object]], tokens: tuple[int | None, int]) -> None:
    ctx = RequestContext("r", "r")
    token = context.begin(ctx)
    try:
        usage = StreamUsage()
        for event in events:
            usage.feed(f"event: x\ndata: {json.dumps(event)}\n\n".encode())
        usage.close()
    finally:
        context.end(token)
    assert (ctx.tokens_in, ctx.tokens_out) == tokens
