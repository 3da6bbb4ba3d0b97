"""Which model revision answered each stored Response, and for whom.

vLLM keeps a Response in its engine's memory (VLLM_ENABLE_RESPONSES_API_STORE); the gateway remembers which
model and commit answered each id (from the answer, or the stream's first event that names it) and which key
asked. Retrieve, cancel and ``previous_response_id`` then go to that model, and only while the same commit
serves it: after a swap the old engine and what it stored are gone, and the answer says so (404) instead of
asking another engine. Another key's id is answered as unknown. The index lives as long as the engines do
(both are in memory; a restarted gateway restarts its engines) and is bounded (least recently used out).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from server.engines.base import Engine
from server.errors import InvalidRequest, NotFound

RESPONSE_ID = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
MAX_REMEMBERED = 100_000


@dataclass(frozen=True)
class StoredResponse:
    model: str
    commit: str
    owner: str | None


class ResponseNotFound(NotFound):
    code = "response_not_found"


def check_response_id(value: object, param: str) -> str:
    """A response id from the network, validated once here (it goes into the engine's request line)."""
    if not isinstance(value, str) or not RESPONSE_ID.match(value):
        raise InvalidRequest(f"`{param}` must be a response id (1-200 of A-Z a-z 0-9 _ -).", param=param)
    return value


class ResponseIndex:
    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._limit = limit

    def remember(self, response_id: str, model: str, commit: str, owner: str | None) -> None:
        self._items[response_id] = StoredResponse(model, commit, owner)
        self._items.move_to_end(response_id)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def observe(self, event: dict[str, Any], model: str, commit: str, owner: str | None) -> None:
        """A Responses answer or stream event: remember the id it names, answered by ``model`` at ``commit``."""
        response = event.get("response") if "response" in event else event
        if not isinstance(response, dict) or response.get("object") != "response":
            return
        rid = response.get("id")
        if isinstance(rid, str) and RESPONSE_ID.match(rid) and rid not in self._items:
            self.remember(rid, model, commit, owner)

    def lookup(self, response_id: str, owner: str | None, param: str) -> StoredResponse:
        stored = self._items.get(response_id)
        if stored is None or stored.owner != owner:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.", param=param)
        return stored

    def require_commit(self, response_id: str, engine: Engine, commit: str, param: str) -> None:
        """The engine a request was admitted to must be the revision that stored the response."""
        if engine.info.commit != commit:
            raise ResponseNotFound(
                f"Response '{response_id}' was stored by revision {commit[:12]} of model `{engine.info.name}`, "
                f"which has been swapped out since (now {engine.info.commit[:12]}); its stored responses went "
                "with it. Start a new response.",
                param=param,
            )


def response_index(app: FastAPI) -> ResponseIndex:
    """The app's index, made on first use."""
    index = getattr(app.state, "responses", None)
    if index is None:
        index = app.state.responses = ResponseIndex()
    return index
