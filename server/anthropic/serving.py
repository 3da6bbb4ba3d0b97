"""Anthropic family logic: route by the body's ``model`` (or the ``/models/{repo_id}/v1`` path), check media
(``image`` blocks), pass bytes through to the model's vLLM server, whose Messages API answers; token usage
(input/output_tokens) is read from the answer for limits, logs and metrics."""

from __future__ import annotations

import json

from fastapi import Request, Response

from server.anthropic.protocol import check_version, parse_messages
from server.engines.client import read_json_body
from server.errors import Family, InvalidRequest
from server.media import check_request_media
from server.proxy import forward
from server.registry import Registry
from server.tasks.catalog import GENERATIVE_TASKS


async def proxy_messages(request: Request, registry: Registry, path: str) -> Response:
    """``path``: ``/v1/messages`` or ``/v1/messages/count_tokens`` on the engine of the named model."""
    check_version(request.headers.get("anthropic-version"))
    body, payload = await read_json_body(request)
    fields = parse_messages(payload)
    engine = registry.get(request.path_params.get("repo_id") or fields.model)
    request.state.model = engine.info.name
    if engine.info.task not in GENERATIVE_TASKS or engine.backend == "transformers":
        raise InvalidRequest(f"Model `{engine.info.name}` ({engine.info.task}) does not chat; Messages needs a "
                             "text-generation model.", param="model")
    await check_request_media(body, payload, engine.info.name, engine.info.snapshot, registry.settings)
    if not engine.accepts_model(fields.model):
        payload = {**payload, "model": engine.model_id}
        body = json.dumps(payload).encode()
    return await forward(registry, engine, path, body, request.headers, Family.ANTHROPIC, payload=payload)
