"""vLLM's ``/tokenize`` and ``/detokenize`` for every served model: vLLM engines answer them themselves; for a
model on the transformers engine the gateway answers from the snapshot's tokenizer.json, in a worker thread
(a big input must not stall the event loop), in vLLM's shape."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from server.engines.base import Engine
from server.errors import Family, InvalidRequest
from server.proxy import forward
from server.tasks.tokenizer import check_input_size, for_snapshot, has_fast_tokenizer, off_loop


def is_engine_tokenize(payload: object) -> bool:
    """vLLM's tokenize body (``prompt`` or ``messages``), as opposed to TGI's ``{"inputs"}``."""
    return isinstance(payload, dict) and "inputs" not in payload and ("prompt" in payload or "messages" in payload)


def _tokenize_locally(engine: Engine, payload: dict[str, Any]) -> dict[str, Any]:
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest(f"Model `{engine.info.name}` is served by the transformers engine, which tokenizes a "
                             "`prompt` string only (no chat template for `messages`).", param="prompt")
    tokenizer = for_snapshot(engine.info.snapshot)
    encoding = tokenizer.encode(prompt, add_special_tokens=bool(payload.get("add_special_tokens", True)))
    out: dict[str, Any] = {"count": len(encoding.ids), "max_model_len": engine.max_model_len,
                           "tokens": list(encoding.ids), "token_strs": None}
    if payload.get("return_token_strs"):
        out["token_strs"] = list(encoding.tokens)
    return out


def _detokenize_locally(engine: Engine, payload: dict[str, Any]) -> dict[str, Any]:
    tokens = payload.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidRequest("`tokens` must be a list of token ids.", param="tokens")
    return {"prompt": for_snapshot(engine.info.snapshot).decode(tokens)}


async def tokenize_on_engine(request: Request, path: str, payload: object) -> Response:
    """``path`` is ``/tokenize`` or ``/detokenize``; the body names the model (or the default one serves)."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    registry = request.app.state.registry
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("`model` must be a string.", param="model")
    engine = registry.get(request.path_params.get("repo_id") or model)
    messages = payload.get("messages")
    texts = [payload.get("prompt"), *(m.get("content") for m in messages if isinstance(m, dict))] if isinstance(
        messages, list) else [payload.get("prompt")]
    check_input_size(texts, registry.settings.max_tokenize_chars)
    request.state.model = engine.info.name
    if engine.backend != "transformers":  # vLLM answers itself
        body = json.dumps({**payload, "model": engine.model_id}).encode()
        return await forward(registry, engine, path, body, request.headers, Family.OPENAI)
    if not has_fast_tokenizer(engine.info.snapshot):
        raise InvalidRequest(f"Model `{engine.info.name}` has no tokenizer.json to tokenize with.", param="model")
    local = _tokenize_locally if path == "/tokenize" else _detokenize_locally
    return JSONResponse(await off_loop(local, engine, payload))
