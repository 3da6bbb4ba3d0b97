"""Fixtures the in-process app tests share: named keys on disk, the scripted engines' script, and one real
redis-server for the session (``redis_server``: tests/fixtures/redis_server.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.gateway_app import EngineScript, Keys, make_keys
from tests.fixtures.redis_server import redis_server_fixture  # noqa: F401 (the session's redis-server)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys.toml")


@pytest.fixture
def script() -> EngineScript:
    return EngineScript()
