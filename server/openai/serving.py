"""OpenAI family logic: route by the body's `model` (or the ``/models/{repo_id}/v1`` path), check media, pass
bytes through to that model's vLLM server. Responses are remembered by id (which model revision answered
them, for whom) so that retrieve, cancel and ``previous_response_id`` reach the engine that holds them."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request, Response
from pydantic import ValidationError

from server.engines.base import Engine, EngineState
from server.engines.capabilities import task_modalities
from server.engines.client import read_json_body
from server.errors import Family, InvalidRequest, validation_problem
from server.media import check_request_media
from server.openai.protocol import ModelCard, ModelList, RoutingFields
from server.openai.responses import ResponseIndex, ResponseNotFound, check_response_id, response_index
from server.ops import context
from server.ops.auth import may_see
from server.proxy import forward
from server.registry import Registry

QUERY_RE = re.compile(r"^[A-Za-z0-9_.~%&=+-]{1,1000}$")  # GET /v1/responses/{id}?stream=true&starting_after=3


def model_card(engine: Engine, started: float, load_state: str | None = None) -> ModelCard:
    """``load_state``: loaded | loading | unloaded, for a model that loads on demand or unloads when idle (its
    ``state`` then says the same, unless the engine failed)."""
    info = engine.info
    state = engine.state.value
    if load_state is not None and engine.state not in (EngineState.FAILED, EngineState.RESTARTING):
        state = load_state
    return ModelCard(
        id=info.name,
        created=int(started),
        root=info.repo,
        repo=info.repo,
        commit=info.commit,
        task=info.task,
        backend=engine.backend,
        state=state,
        max_model_len=engine.max_model_len,
        aliases=[n for n in info.served_names if n != info.name],
        input_modalities=list(task_modalities(info.snapshot, info.task)),
        load="on-demand" if info.on_demand else "startup",
        load_state=load_state or ("loaded" if engine.state is EngineState.READY else "unloaded"),
        parent=None,
    )


def list_models(registry: Registry, started: float) -> ModelList:
    """Every served model and adapter the current request's key may use (the others are hidden)."""
    cards = []
    for served in registry.served.values():
        if may_see(served.info):
            cards.append(model_card(served.engine, started, served.load_state if served.unloadable else None))
        for adapter in served.adapters:
            view = registry.get_adapter(served, adapter)
            if may_see(view.info):
                card = model_card(view, started, served.load_state if served.unloadable else None)
                cards.append(card.model_copy(update={"parent": served.info.name}))
    return ModelList(data=cards)


def routing_fields(payload: object) -> RoutingFields:
    """The routing fields of an OpenAI request's JSON object; InvalidRequest (400) otherwise."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return RoutingFields.model_validate(payload)
    except ValidationError as e:
        message, param = validation_problem(e)
        raise InvalidRequest(message, param=param) from e


async def read_body(request: Request) -> tuple[bytes, dict[str, Any], RoutingFields]:
    body, payload = await read_json_body(request)
    return body, payload, routing_fields(payload)


def chat_payload(payload: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat body for ``model``: the routed model replaces ``model`` (InferenceClient sends "dummy"),
    and TGI's ``{"type": "json_object", "value": schema}`` becomes vLLM's json_schema response format. Pure."""
    out = {**payload, "model": model}
    fmt = out.get("response_format")
    if isinstance(fmt, dict) and _is_tgi_response_format(fmt):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "schema", "schema": fmt["value"]}}
    return out


def _is_tgi_response_format(fmt: object) -> bool:
    return isinstance(fmt, dict) and fmt.get("type") == "json_object" and isinstance(fmt.get("value"), dict)


def routed_engine(request: Request, registry: Registry, model: str | None) -> Engine:
    """The engine a request names: the ``/models/{repo_id}/v1`` path, else the body's model (omitted or
    InferenceClient's "dummy": the default model)."""
    path_model = request.path_params.get("repo_id")
    if path_model:
        model = path_model
    elif model == "dummy" and model not in registry.engines:
        model = None
    engine = registry.get(model)
    request.state.model = engine.info.name
    return engine


def _check_task(engine: Engine, path: str, tasks: frozenset[str] | None) -> None:
    if tasks is None and engine.backend == "transformers":
        raise InvalidRequest(f"Model `{engine.info.name}` ({engine.info.task}) is served on the Inference API "
                             f"routes: POST /models/{engine.info.repo}.", param="model")
    if path == "/v1/score" and engine.backend == "transformers":
        raise InvalidRequest(f"Model `{engine.info.name}` is served by the transformers engine; /v1/score needs a "
                             "model on vLLM (POST /v1/rerank serves both).", param="model")
    if tasks is not None and engine.info.task not in tasks:
        raise InvalidRequest(f"Model `{engine.info.name}` serves {engine.info.task}; {path} needs a model of "
                             f"{', '.join(sorted(tasks))}.", param="model")


async def proxy_openai(
    request: Request, registry: Registry, path: str, tasks: frozenset[str] | None = None
) -> Response:
    """Forward one OpenAI request to the engine its `model` names; vLLM's answer comes back unchanged.
    ``tasks``: the route serves only models of these tasks (else 400)."""
    body, payload, fields = await read_body(request)
    engine = routed_engine(request, registry, fields.model)
    _check_task(engine, path, tasks)
    await check_request_media(body, payload, engine.info.name, engine.info.snapshot, registry.settings)
    if not engine.accepts_model(fields.model) or _is_tgi_response_format(payload.get("response_format")):
        payload = chat_payload(payload, engine.model_id)
        body = json.dumps(payload).encode()
    return await forward(registry, engine, path, body, request.headers, Family.OPENAI, payload=payload)


# ---- Responses ---------------------------------------------------------------------------------------------


def _owner() -> str | None:
    ctx = context.current()
    return ctx.principal.name if ctx is not None and ctx.principal is not None else None


async def create_response(request: Request, registry: Registry) -> Response:
    """POST /v1/responses: on the engine of ``model``; with ``previous_response_id``, on the model revision that
    answered that response (404 when it was swapped out since: its state is gone with its engine)."""
    body, payload, fields = await read_body(request)
    index = response_index(request.app)
    owner = _owner()
    previous = payload.get("previous_response_id")
    model = fields.model
    stored = None
    if previous is not None:
        previous = check_response_id(previous, "previous_response_id")
        stored = index.lookup(previous, owner, "previous_response_id")
        model = model or stored.model
    engine = routed_engine(request, registry, model)
    _check_task(engine, "/v1/responses", None)
    if stored is not None and stored.model != engine.info.name:
        raise InvalidRequest(f"Response '{previous}' was answered by model `{stored.model}`, not "
                             f"`{engine.info.name}`.", param="previous_response_id")
    await check_request_media(body, payload, engine.info.name, engine.info.snapshot, registry.settings)
    if fields.model not in engine.info.served_names:
        payload = {**payload, "model": engine.info.name}
        body = json.dumps(payload).encode()
    name, served = engine.info.name, engine.info.commit

    def admitted(now: Engine) -> None:  # after a swap the request runs on the new revision: remember that one
        nonlocal served
        if stored is not None:
            index.require_commit(str(previous), now, stored.commit, "previous_response_id")
        served = now.info.commit

    def remember(event: dict[str, Any]) -> None:
        index.observe(event, name, served, owner)

    return await forward(registry, engine, "/v1/responses", body, request.headers, Family.OPENAI,
                         payload=payload, admitted=admitted, on_event=remember)


async def stored_response(request: Request, registry: Registry, response_id: str, action: str) -> Response:
    """GET /v1/responses/{id} (``action`` "") or POST .../cancel (``action`` "/cancel") on the engine holding it."""
    rid = check_response_id(response_id, "response_id")
    index: ResponseIndex = response_index(request.app)
    stored = index.lookup(rid, _owner(), "response_id")
    path_model = request.path_params.get("repo_id")
    if path_model and registry.get(path_model).info.name != stored.model:  # /models/{other}/v1/responses/{id}
        raise ResponseNotFound(f"Response with id '{rid}' not found for model `{path_model}`.", param="response_id")
    engine = registry.get(stored.model)
    request.state.model = engine.info.name
    query = request.url.query
    if query and not QUERY_RE.match(query):
        raise InvalidRequest("The query string holds characters this route does not take.")
    path = f"/v1/responses/{rid}{action}" + (f"?{query}" if query and not action else "")

    def admitted(now: Engine) -> None:
        index.require_commit(rid, now, stored.commit, "response_id")

    method = "POST" if action else "GET"
    return await forward(registry, engine, path, b"", request.headers, Family.OPENAI, method=method, admitted=admitted)
