"""Shared gateway state: ``open_state(url, default_path)`` picks the backend (server/state/base.py)."""

from __future__ import annotations

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
        from server.state.redis_store import RedisStore  # type: ignore[import-not-found,unused-ignore]

        return RedisStore(url)
    raise StateUnavailable(f"HUBSERVE_STATE_URL {redact_url(url)!r}: use sqlite:///path or redis://host:port/db")


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    if "://" not in url or "@" not in url.split("://", 1)[1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.split("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{host}"
