"""Pydantic models of the Anthropic family. Bodies pass through to vLLM's Messages API unparsed; the gateway
reads only the fields it routes and checks by."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import InvalidRequest, validation_problem

VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class MessagesFields(BaseModel):
    """What the gateway reads of a Messages (or count_tokens) body; the rest is the engine's business."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="Served name or repo id.")
    messages: list[object] = Field(description="The conversation: user/assistant turns of content blocks.")
    stream: bool | None = Field(default=False, description="Server-sent events instead of one JSON answer.")


def parse_messages(payload: object) -> MessagesFields:
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return MessagesFields.model_validate(payload)
    except ValidationError as e:
        message, param = validation_problem(e)
        raise InvalidRequest(message, param=param) from e


def check_version(value: str | None) -> None:
    """``anthropic-version``: optional here (every version is served the same), but well-formed when sent."""
    if value is not None and not VERSION_RE.match(value):
        raise InvalidRequest("anthropic-version: expected a date such as 2023-06-01.", param="anthropic-version")
