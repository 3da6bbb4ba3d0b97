"""Shared gateway state: ``open_state(url, default_path)`` picks the backend (server/state/base.py)."""

from __future__ import annotations

import re
from pathlib import Path

from server.state.base import StateStore
from server.state.errors import StateUnavailable

__all__ = ["StateStore", "StateUnavailable", "open_state", "redact_url"]


def open_state(url: str | None, default_path: Path) -> StateStore:
    """``None`` or ``sqlite:///path``: the embedded SQLite file (``default_path`` when none is named);
    ``redis://`` / ``rediss://`` / ``unix://``: Redis (server/state/redis_store.py)."""
    if not url:
        from server.state.sqlite_store import SQLiteStore

        return SQLiteStore(default_path)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        from server.state.sqlite_store import SQLiteStore

        path = url.split("://", 1)[1]
        return SQLiteStore(Path(path) if path else default_path)
    if scheme in ("redis", "rediss", "unix"):
        from server.state.redis_store import RedisStore

        return RedisStore(url)
    raise StateUnavailable(f"HUBSERVE_STATE_URL {redact_url(url)!r}: use sqlite:///path or redis://host:port/db")


def redact_url(url: str) -> str:
    """``url`` without its password (in the netloc or a ``password=`` query parameter), for logs and errors."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, tail = rest.partition("/") if "/" in rest.split("?", 1)[0] else rest.partition("?")
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user + ':***' if user else '***'}@{host}"
    tail = re.sub(r"(?i)(^|[?&])(password=)[^&#]*", r"\1\2***", tail)
    return f"{scheme}://{netloc}{sep}{tail}"
