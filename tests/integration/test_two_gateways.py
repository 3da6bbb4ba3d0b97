"""Two gateway replicas over one real redis-server: both answer, both hold the same state (a counter incremented
through one gateway's state is seen by the other's), and /health names the backend, its redacted URL and
whether it answers, on SQLite and on Redis, without a password and without waiting long on a Redis that is down."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.ops.routes import StateHealth
from server.settings import Settings
from server.state import StateStore
from tests.fixtures.gateway_app import served
from tests.fixtures.redis_server import RedisServer, require_redis
from tests.fixtures.two_gateways import KEY, synthetic_registry, two_gateways

pytestmark = pytest.mark.integration


def test_two_gateways_answer_and_share_one_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    url = redis_server.url_for("two-gateways")
    with two_gateways(tmp_path, url) as (a, b):
        for gw in (a, b):
            answer = httpx.post(f"{gw.url}/v1/completions", headers=gw.auth, timeout=30,
                                json={"model": "a", "prompt": "x", "max_tokens": 2})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-hubserve-model"] == "a"
        assert a.app.state.state is not b.app.state.state  # two stores, two connection pools ...

        async def bump(state: StateStore) -> int:
            return await state.incr("shared-counter", 5)

        async def read(state: StateStore) -> int:
            return await state.get_int("shared-counter")

        assert a.call(bump) == 5 and b.call(bump) == 10  # ... one Redis
        assert a.call(read) == b.call(read) == 10
        for gw in (a, b):
            state = httpx.get(f"{gw.url}/health", timeout=10).json()["state"]
            assert state["backend"] == "redis" and state["ok"] is True
            assert redis_server.password not in state["url"] and "***@127.0.0.1" in state["url"]


def _one_gateway(tmp_path: Path, state_url: str | None = None) -> FastAPI:
    """A gateway whose engines are not started: /health only."""
    (tmp_path / "models.toml").touch()
    settings = Settings(api_keys=KEY, config=tmp_path / "models.toml", watch=False, state_url=state_url)  # type: ignore[arg-type]
    return create_app(settings, synthetic_registry(tmp_path, settings, ("a",)), start_engines=False)


def test_health_shows_the_embedded_sqlite_state(tmp_path: Path) -> None:
    with served(_one_gateway(tmp_path)) as url:
        state = httpx.get(f"{url}/health", timeout=10).json()["state"]
    assert state == {"backend": "sqlite", "url": f"sqlite://{tmp_path / 'state.db'}", "ok": True}


def test_health_reports_redis_down_quickly_and_redacted(tmp_path: Path) -> None:
    require_redis()
    redis = RedisServer.start(tmp_path / "redis")
    try:
        app = _one_gateway(tmp_path, redis.url)
        app.state.state_health = StateHealth(every_s=0.2)
        with served(app) as url:
            assert httpx.get(f"{url}/health", timeout=10).json()["state"]["ok"] is True
            redis.stop()
            time.sleep(0.25)
            started = time.monotonic()
            health = httpx.get(f"{url}/health", timeout=10)
            assert time.monotonic() - started < 3
            assert health.status_code == 200  # alive: a liveness probe must not restart every replica
            body = health.json()
            assert body["state"]["ok"] is False and body["status"] == "degraded"
            assert redis.password not in health.text and "***@127.0.0.1" in body["state"]["url"]
            redis.run()
            time.sleep(0.25)
            assert httpx.get(f"{url}/health", timeout=10).json()["state"]["ok"] is True
    finally:
        redis.stop()
