"""Per-request caps that need no engine: the number of tokens a request may ask to generate."""

from __future__ import annotations

from typing import Any

from server.errors import InvalidRequest


def cap_max_tokens(payload: dict[str, Any], cap: int | None, fields: tuple[str, ...]) -> dict[str, Any] | None:
    """None when ``payload`` may go as is; a copy asking for ``cap`` tokens when it names no limit itself;
    InvalidRequest (naming the cap) when one of ``fields`` asks for more than ``cap``. Pure."""
    if cap is None:
        return None
    asked = [(f, payload[f]) for f in fields if payload.get(f) is not None]
    for field, value in asked:
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            raise InvalidRequest(
                f"`{field}` must be <= {cap} on this server (HUBSERVE_MAX_NEW_TOKENS). Given: {value}", param=field
            )
    return None if asked else {**payload, fields[0]: cap}
