"""Fixtures the in-process app tests share: named keys on disk and the scripted engines' script."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.gateway_app import EngineScript, Keys, make_keys


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys.toml")


@pytest.fixture
def script() -> EngineScript:
    return EngineScript()
