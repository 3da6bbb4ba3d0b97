"""OpenAI family logic: route by the body's `model`, pass bytes through to that model's vLLM server."""

from __future__ import annotations

import json

from fastapi import Request, Response
from pydantic import ValidationError

from server.engines.base import Engine
from server.errors import Family, InvalidRequest
from server.hub.serving import chat_payload
from server.openai.protocol import ModelCard, ModelList, RoutingFields
from server.ops.auth import may_see
from server.proxy import forward
from server.registry import Registry

RERANK_TASKS = frozenset({"text-ranking"})


def model_card(engine: Engine, started: float) -> ModelCard:
    info = engine.info
    return ModelCard(
        id=info.name,
        created=int(started),
        root=info.repo,
        repo=info.repo,
        commit=info.commit,
        task=info.task,
        backend=engine.backend,
        state=engine.state.value,
        max_model_len=engine.max_model_len,
        aliases=[n for n in info.served_names if n != info.name],
    )


def list_models(registry: Registry, started: float) -> ModelList:
    """Every served model the current request's key may use (the others are hidden)."""
    return ModelList(data=[model_card(e, started) for e in registry.engines.values() if may_see(e.info)])


def parse_body(body: bytes) -> tuple[dict[str, object], RoutingFields]:
    """The JSON object of an OpenAI request and its routing fields; InvalidRequest (400) otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.") from e
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        fields = RoutingFields.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{param}: {first['msg']}.", param=param) from e
    return payload, fields


def _is_tgi_response_format(fmt: object) -> bool:
    return isinstance(fmt, dict) and fmt.get("type") == "json_object" and isinstance(fmt.get("value"), dict)


async def proxy_openai(
    request: Request, registry: Registry, path: str, tasks: frozenset[str] | None = None
) -> Response:
    """Forward one OpenAI request to the engine its `model` names; vLLM's answer comes back unchanged.
    ``tasks``: the route serves only models of these tasks (else 400)."""
    body = await request.body()
    payload, fields = parse_body(body)
    model = fields.model
    if model == "dummy" and model not in registry.engines:  # InferenceClient(base_url=...) sends "dummy":
        model = None  # it means the default model (added with the TGI/Hub families)
    engine = registry.get(model)
    request.state.model = engine.info.name
    if tasks is None and engine.backend == "transformers":
        raise InvalidRequest(f"Model `{engine.info.name}` ({engine.info.task}) is served on the Inference API "
                             f"routes: POST /models/{engine.info.repo}.", param="model")
    if tasks is not None and engine.info.task not in tasks:
        raise InvalidRequest(f"Model `{engine.info.name}` serves {engine.info.task}; {path} needs a model of "
                             f"{', '.join(sorted(tasks))}.", param="model")
    tgi_format = _is_tgi_response_format(payload.get("response_format"))
    if fields.model not in engine.info.served_names or tgi_format:  # omitted/"dummy": name the model
        # InferenceClient(base_url=...).chat_completion sends json schemas TGI's way; vLLM wants json_schema.
        payload = chat_payload(payload, engine.info.name) if tgi_format else {**payload, "model": engine.info.name}
        body = json.dumps(payload).encode()
    return await forward(registry, engine, path, body, request.headers, Family.OPENAI)
