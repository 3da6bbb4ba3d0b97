"""A key's ``max_input_tokens``, refused before the request runs.

The gateway relays most bodies unparsed and learns token counts from the engine's ``usage``, after the fact;
a cap must refuse *before* anything runs. So, for a key with a cap and only then, the gateway asks the model's
own engine to count the input with vLLM's ``/tokenize``: the tokenizer and chat template (``messages`` with
``add_generation_prompt``) that the generation itself will use, so the count is exact, not an estimate. The
engine must be up to count: it is admitted first, as the request would be (loaded on demand, waited for through
a swap), and holds its slot only while counting. Cost: one loopback call per request of a capped key.

Models on the transformers engine (Hub tasks) count with the snapshot's tokenizer.json in the tokenizer pool:
the tokenizer their worker uses (no chat templates there). Token-id inputs count as their length. Inputs
without text (audio uploads, raw image bytes) are not capped.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from server.engines.base import Engine
from server.engines.client import post_engine, read_json_body
from server.errors import GenerationError, InputTooLong, InvalidRequest
from server.ops.context import Principal
from server.tasks.catalog import TASKS
from server.tasks.tokenizer import check_input_size, for_snapshot, has_fast_tokenizer, off_loop

TEXT_FIELDS = ("prompt", "input", "inputs", "text", "text_1", "text_2", "query", "documents")


async def check_input_tokens(request: Request, who: Principal) -> None:
    """InputTooLong (400 in the route's family shape) when the request's input is over ``who.max_input_tokens``."""
    limit = who.max_input_tokens
    if limit is None or request.method != "POST" or "json" not in request.headers.get("content-type", "json"):
        return
    try:
        _, payload = await read_json_body(request)  # cached on the request: the route reads it again for free
    except InvalidRequest:
        return  # the route answers the malformed body in its own words
    if not isinstance(payload, dict):
        return
    query, known = tokenize_query(payload)
    if query is None and known <= limit:
        return
    registry = request.app.state.registry
    if query is not None:
        check_input_size(_texts(query), registry.settings.max_tokenize_chars)
    model = request.path_params.get("repo_id") or payload.get("model")
    if not isinstance(model, str) or (model == "dummy" and model not in registry.engines):
        model = None
    engine: Engine = registry.get(model)  # authorizes it: a key learns nothing of models it may not use
    task = TASKS.get(engine.info.task)
    if task is not None and task.input in ("image", "audio"):
        return
    count = known + (await _count(registry, engine, query) if query is not None else 0)
    if count > limit:
        raise InputTooLong(f"The input has {count} tokens, over the limit of {limit} (max_input_tokens) of API key "
                           f"`{who.name}`.")


def tokenize_query(payload: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
    """(a vLLM /tokenize body for the request's input, tokens given as ids), from any family's body. Pure."""
    messages = payload.get("messages")
    items = payload.get("input")
    if not isinstance(messages, list) and isinstance(items, list) and any(
            isinstance(i, dict) and "role" in i for i in items):
        messages = items  # Responses: input items are messages
    if isinstance(messages, list):
        chat = [{"role": str(m.get("role") or "user"), "content": _joined(m.get("content"))}
                for m in messages if isinstance(m, dict)]
        system = payload.get("system") or payload.get("instructions")  # Anthropic, Responses
        if system:
            chat.insert(0, {"role": "system", "content": _joined(system)})
        query: dict[str, Any] = {"messages": chat, "add_generation_prompt": True}
        if isinstance(payload.get("tools"), list):
            query["tools"] = payload["tools"]
        return query, 0
    texts: list[str] = []
    ids = 0
    for field in TEXT_FIELDS:
        ids += _collect(payload.get(field), texts)
    if not texts:
        return None, ids
    return {"prompt": "\n".join(texts)}, ids


def _collect(value: object, texts: list[str]) -> int:
    """Append the strings in ``value`` to ``texts``; return the count of token ids it holds."""
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)
        return sum(_collect(v, texts) for v in value)
    elif isinstance(value, dict):
        return sum(_collect(v, texts) for k, v in value.items() if k in ("text", "content", "question", "context",
                                                                          "source_sentence", "sentences", "query"))
    return 0


def _joined(content: object) -> str:
    texts: list[str] = []
    _collect(content, texts)
    return "\n".join(texts)


def _texts(query: dict[str, Any]) -> list[str]:
    return [query.get("prompt") or "", *(m["content"] for m in query.get("messages") or [])]


async def _count(registry: Any, engine: Engine, query: dict[str, Any]) -> int:
    if engine.backend == "transformers":
        if not has_fast_tokenizer(engine.info.snapshot):
            raise GenerationError(f"Model `{engine.info.name}` has no tokenizer.json to count the input tokens "
                                  "against the API key's max_input_tokens with.")
        text = query.get("prompt") or "\n".join(m["content"] for m in query.get("messages") or [])
        return await off_loop(lambda: len(for_snapshot(engine.info.snapshot).encode(text).ids))
    slot = await registry.admit(engine)
    try:
        response = await post_engine(slot.engine, "/tokenize", {"model": slot.engine.model_id, **query})
    finally:
        slot.release()
    try:
        data = json.loads(response.content)
        return int(data["count"] if "count" in data else len(data["tokens"]))
    except (ValueError, TypeError, KeyError, AttributeError):  # fail closed: a cap that cannot count refuses
        raise GenerationError(f"Model `{engine.info.name}`: its engine did not count the input tokens.") from None
