"""Errors of the state backends, in the server's one hierarchy (server/errors.py maps it to HTTP)."""

from __future__ import annotations

from server.errors import ServerError


class StateUnavailable(ServerError):
    """The state backend (the SQLite file or Redis) cannot be read or written: 503, the request is not run."""

    status = 503
    code = "state_unavailable"
    openai_type = "server_error"
    tgi_type = "unhealthy"
    anthropic_type = "api_error"
    hub_code = "StateUnavailable"
