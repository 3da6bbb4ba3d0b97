"""Idempotency-Key replays and the response cache through the real gateway on a loopback port, over real engine
processes that count their calls (tests/fixtures/counting_engine.py: every answer says ``call N``), with the stock
``openai`` and ``anthropic`` clients: a replay or a hit is the stored bytes and never reaches the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.engines.base import ModelInfo
from server.ops.keys import KeyRecord, new_key, update_keys, write_keys
from server.registry import Registry
from server.settings import Settings
from tests.fixtures.counting_engine import CountingProcessEngine

pytestmark = pytest.mark.integration

FLAT = "flat-replay-key-0123456789"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
CHAT = [{"role": "user", "content": "hello"}]


@dataclasses.dataclass
class Gateway:
    url: str
    app: FastAPI
    registry: Registry
    keys: dict[str, str]
    keys_path: Path
    clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = dataclasses.field(default_factory=list)

    def sdk(self, key: str = "alice") -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.keys.get(key, key), max_retries=0)
        self.clients.append(client)
        return client

    def claude(self, key: str = "alice") -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=self.url, api_key=self.keys.get(key, key), max_retries=0)
        self.clients.append(client)
        return client

    def auth(self, key: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.get(key, key)}"}


def _info(tmp_path: Path, name: str, task: str, commit: str = COMMIT_A, **extra: Any) -> ModelInfo:
    return ModelInfo(name, f"org/{name}", commit, task, str(tmp_path), cache=True, cache_ttl_s=60, **extra)


def _keys(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "keys.toml"
    if path.exists():  # a second gateway over the same directory shares the first's keys
        return {}
    records: dict[str, KeyRecord] = {}
    keys = {"flat": FLAT}
    for name, models in (("alice", None), ("bob", None), ("emb-only", ("emb",))):
        key, record = new_key(name, models)
        records[record.id] = record
        keys[name] = key
    write_keys(path, records)
    return keys


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, keys: dict[str, str] | None = None, **settings: Any) -> AsyncIterator[Gateway]:
    """The app with gen (text-generation, the default) and emb (feature-extraction), both `cache = true`, on a
    free loopback port in this event loop; its state.db is tmp_path's (two gateways on one tmp_path share it)."""
    (tmp_path / "models.toml").touch()
    keys = keys or _keys(tmp_path)
    config = Settings(api_keys=FLAT, keys_file=tmp_path / "keys.toml", config=tmp_path / "models.toml",  # type: ignore[arg-type]
                      watch=False, engine_start_attempts=1, idempotency_poll_s=0.02, **settings)
    engines = [CountingProcessEngine(_info(tmp_path, "gen", "text-generation", default=True), config),
               CountingProcessEngine(_info(tmp_path, "emb", "feature-extraction"), config)]
    registry = Registry(engines, settings=config, factory=CountingProcessEngine)
    app = create_app(config, registry)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    async with httpx.AsyncClient() as client:
        for _ in range(1000):
            if server.started and (await client.get(f"http://127.0.0.1:{_port(server)}/ready")).status_code == 200:
                break
            assert not task.done(), "the gateway did not start"
            await asyncio.sleep(0.02)
    gw = Gateway(f"http://127.0.0.1:{_port(server)}", app, registry, keys, tmp_path / "keys.toml")
    try:
        yield gw
    finally:
        for client in gw.clients:
            await client.close()
        server.should_exit = True
        await task


def _port(server: uvicorn.Server) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1]) if server.servers else 0


def _key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def _text(raw: Any) -> str:
    return str(raw.parse().choices[0].message.content)


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.request for r in caplog.records if r.name == "hubserve.access" and hasattr(r, "request")]


async def test_a_replay_is_the_first_answer_for_that_key_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "hubserve.access")
    async with gateway(tmp_path) as gw:
        alice = gw.sdk().chat.completions.with_raw_response
        first = await alice.create(model="gen", messages=CHAT, extra_headers=_key("order-1"))  # type: ignore[arg-type]
        again = await alice.create(model="gen", messages=CHAT, extra_headers=_key("order-1"))  # type: ignore[arg-type]
        assert _text(first) == "call 1 part 1 end" and "idempotent-replayed" not in first.headers
        assert again.headers["idempotent-replayed"] == "true"
        assert again.http_response.content == first.http_response.content
        assert again.headers["x-hubserve-commit"] == COMMIT_A and again.headers["x-hubserve-model"] == "gen"
        assert again.headers["x-request-id"] != first.headers["x-request-id"]
        assert _lines(caplog)[-1]["cache"] == "replay"
        # scoped per API key (a named key by name, a flat key by itself): the others run it afresh, no 422
        bob = await gw.sdk("bob").chat.completions.with_raw_response.create(
            model="gen", messages=CHAT, extra_headers=_key("order-1"))  # type: ignore[arg-type]
        flat = await gw.sdk("flat").chat.completions.with_raw_response.create(
            model="gen", messages=CHAT, extra_headers=_key("order-1"))  # type: ignore[arg-type]
        assert (_text(bob), _text(flat)) == ("call 2 part 2 end", "call 3 part 3 end")
        assert "idempotent-replayed" not in bob.headers and "idempotent-replayed" not in flat.headers
        # the same key with another body: 422 in OpenAI's shape, naming the header; nothing ran
        with pytest.raises(openai.UnprocessableEntityError) as reused:
            await alice.create(model="gen", messages=[{"role": "user", "content": "other"}],
                               extra_headers=_key("order-1"))
        assert reused.value.body["param"] == "Idempotency-Key"  # type: ignore[index]
        assert reused.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]
        # a malformed key: 400 naming the header
        with pytest.raises(openai.BadRequestError) as bad:
            await alice.create(model="gen", messages=CHAT, extra_headers=_key("x" * 256))
        assert bad.value.body["param"] == "Idempotency-Key"  # type: ignore[index]
        fresh = await alice.create(model="gen", messages=CHAT)  # type: ignore[arg-type]
        assert _text(fresh) == "call 4 part 4 end"  # neither the replay, nor the 422, nor the 400 ran


async def test_a_streamed_answer_is_replayed_as_the_same_event_stream(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, httpx.AsyncClient() as client:
        body = {"model": "gen", "messages": CHAT, "stream": True}
        runs = []
        for _ in range(2):
            async with client.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                                     headers={**gw.auth(), **_key("stream-1")}) as r:
                runs.append((r.headers, [chunk async for chunk in r.aiter_bytes()]))
        (_, first), (h2, second) = runs
        assert b"".join(first) == b"".join(second) and b"call 1" in b"".join(first)
        assert h2["content-type"].startswith("text/event-stream") and h2["idempotent-replayed"] == "true"
        # the stock clients read the replay as a stream
        sdk = gw.sdk()
        chunks = [c.choices[0].delta.content async for c in await sdk.chat.completions.create(
            model="gen", messages=CHAT, stream=True, extra_headers=_key("stream-1"))]  # type: ignore[arg-type]
        assert chunks == ["call 1", " part 1", " end"]
        claude = gw.claude()
        texts = []
        for _ in range(2):
            stream = await claude.messages.create(model="gen", max_tokens=8, stream=True, extra_headers=_key("msg-1"),
                                                  messages=[{"role": "user", "content": "hi"}])
            texts.append([e.delta.text async for e in stream if e.type == "content_block_delta"])  # type: ignore[union-attr]
        assert texts[0] == texts[1] == ["call 2", " part 2", " end"]


async def test_concurrent_duplicates_run_once(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        create = gw.sdk().chat.completions.with_raw_response.create
        answers = await asyncio.gather(*(create(model="gen", messages=CHAT, extra_headers=_key("dup"),  # type: ignore[arg-type]
                                                extra_body={"delay": 0.4}) for _ in range(3)))
        assert {_text(a) for a in answers} == {"call 1 part 1 end"}
        assert sorted(a.headers.get("idempotent-replayed", "-") for a in answers) == ["-", "true", "true"]
        assert _text(await create(model="gen", messages=CHAT)) == "call 2 part 2 end"  # type: ignore[arg-type]


async def test_errors_a_retry_may_fix_are_not_kept_and_client_errors_are(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, httpx.AsyncClient() as client:
        url, h = f"{gw.url}/v1/chat/completions", gw.auth()

        async def post(key: str, status: int) -> httpx.Response:
            return await client.post(url, json={"model": "gen", "messages": CHAT, "status": status},
                                     headers={**h, **_key(key)})

        failed, retried = await post("e-503", 503), await post("e-503", 503)
        assert "call 1" in failed.text and "call 2" in retried.text and "idempotent-replayed" not in retried.headers
        refused, replayed = await post("e-400", 400), await post("e-400", 400)
        assert refused.status_code == replayed.status_code == 400 and replayed.content == refused.content
        assert replayed.headers["idempotent-replayed"] == "true"


async def test_a_revoked_key_or_one_without_the_model_cannot_replay(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        bob = gw.sdk("bob").chat.completions
        assert _text(await bob.with_raw_response.create(model="gen", messages=CHAT, extra_headers=_key("r")))  # type: ignore[arg-type]
        update_keys(gw.keys_path, lambda rs: {i: dataclasses.replace(r, models=("emb",)) if r.name == "bob" else r
                                              for i, r in rs.items()})
        with pytest.raises(openai.NotFoundError):
            await bob.create(model="gen", messages=CHAT, extra_headers=_key("r"))  # type: ignore[arg-type]
        update_keys(gw.keys_path, lambda rs: {i: r for i, r in rs.items() if r.name != "bob"})
        with pytest.raises(openai.AuthenticationError):
            await bob.create(model="gen", messages=CHAT, extra_headers=_key("r"))  # type: ignore[arg-type]


async def _metric(client: httpx.AsyncClient, gw: Gateway, model: str, result: str) -> float:
    text = (await client.get(f"{gw.url}/metrics", headers=gw.auth())).text
    line = f'hubserve_cache_requests_total{{model="{model}",result="{result}"}} '
    return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line)), 0.0)


async def test_deterministic_requests_are_cached_per_commit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "hubserve.access")
    async with gateway(tmp_path) as gw, httpx.AsyncClient() as client:
        chat = gw.sdk().chat.completions.with_raw_response.create
        miss = await chat(model="gen", messages=CHAT, temperature=0)  # type: ignore[arg-type]
        hit = await chat(model="gen", messages=CHAT, temperature=0)  # type: ignore[arg-type]
        assert (miss.headers["x-hubserve-cache"], hit.headers["x-hubserve-cache"]) == ("miss", "hit")
        assert hit.http_response.content == miss.http_response.content and _text(hit) == "call 1 part 1 end"
        assert [line["cache"] for line in _lines(caplog)[-2:]] == ["miss", "hit"]
        assert await _metric(client, gw, "gen", "hit") == 1 and await _metric(client, gw, "gen", "miss") == 1
        # another key allowed the model hits too; a key not allowed it gets the unknown-model 404, not the answer
        assert (await gw.sdk("bob").chat.completions.with_raw_response.create(
            model="gen", messages=CHAT, temperature=0)).headers["x-hubserve-cache"] == "hit"  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            await gw.sdk("emb-only").chat.completions.create(model="gen", messages=CHAT, temperature=0)  # type: ignore[arg-type]
        # sampling is not cached: temperature > 0, or none (vLLM's default samples); a seed is
        sampled = [await chat(model="gen", messages=CHAT, temperature=t) for t in (0.7, 0.7)]  # type: ignore[arg-type]
        default = await chat(model="gen", messages=CHAT)  # type: ignore[arg-type]
        assert [_text(r) for r in [*sampled, default]] == [f"call {n} part {n} end" for n in (2, 3, 4)]
        assert all("x-hubserve-cache" not in r.headers for r in [*sampled, default])
        seeded = [await chat(model="gen", messages=CHAT, seed=7, temperature=1) for _ in range(2)]  # type: ignore[arg-type]
        assert [r.headers["x-hubserve-cache"] for r in seeded] == ["miss", "hit"]
        assert _text(seeded[1]) == "call 5 part 5 end"
        # a swap to a new commit never serves the old revision's answer
        await gw.registry.apply([dataclasses.replace(e.info, commit=COMMIT_B) for e in gw.registry.engines.values()])
        swapped = await chat(model="gen", messages=CHAT, temperature=0)  # type: ignore[arg-type]
        assert swapped.headers["x-hubserve-cache"] == "miss" and swapped.headers["x-hubserve-commit"] == COMMIT_B
        assert _text(swapped) == "call 1 part 1 end"  # the new engine's first call
        assert (await chat(model="gen", messages=CHAT, temperature=0)).headers["x-hubserve-cache"] == "hit"  # type: ignore[arg-type]


async def test_embeddings_and_messages_are_cached_and_streams_replay_as_streams(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, httpx.AsyncClient() as client:
        embed = gw.sdk().embeddings.with_raw_response.create
        first, second = [await embed(model="emb", input=["a", "b"]) for _ in range(2)]
        assert [r.headers["x-hubserve-cache"] for r in (first, second)] == ["miss", "hit"]
        assert second.parse().data[0].embedding == [1.0, 0.5]
        claude = gw.claude()
        said = [await claude.messages.with_raw_response.create(
            model="gen", max_tokens=8, messages=[{"role": "user", "content": "hi"}], extra_body={"temperature": 0})
            for _ in range(2)]
        assert [r.headers["x-hubserve-cache"] for r in said] == ["miss", "hit"]
        assert (await said[1].parse()).content[0].text == "call 1 part 1 end"  # type: ignore[union-attr]
        body = {"model": "gen", "messages": CHAT, "stream": True, "temperature": 0}
        streams = []
        for _ in range(2):
            async with client.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=gw.auth()) as r:
                streams.append((r.headers["x-hubserve-cache"], b"".join([c async for c in r.aiter_bytes()])))
        assert [s[0] for s in streams] == ["miss", "hit"] and streams[0][1] == streams[1][1]
        assert streams[1][1].count(b"\n\n") == 4 and b"call 2" in streams[1][1]


async def test_the_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    async with gateway(tmp_path, cache_max_bytes=1200, cache_max_entry_bytes=1000) as gw:
        embed = gw.sdk().embeddings.with_raw_response.create

        async def call(inputs: list[str]) -> tuple[str, float]:
            r = await embed(model="emb", input=inputs)
            return r.headers["x-hubserve-cache"], r.parse().data[0].embedding[0]

        a, b = ["a"] * 6, ["b"] * 6  # one answer of ~700 bytes fits, two do not
        assert [await call(a), await call(a)] == [("miss", 1.0), ("hit", 1.0)]
        assert await call(b) == ("miss", 2.0)  # evicts a
        assert await call(a) == ("miss", 3.0)
        assert 0 < await gw.app.state.state.cache_bytes() <= 1200
        big = ["c"] * 20  # an answer over HUBSERVE_CACHE_MAX_ENTRY_BYTES is sent, not kept
        assert [await call(big), await call(big)] == [("miss", 4.0), ("miss", 5.0)]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_second_gateway_on_the_same_state_replays_and_hits(tmp_path: Path, backend: str,
                                                                   request: pytest.FixtureRequest) -> None:
    # sqlite: both gateways open tmp_path/state.db; redis: the session's redis-server, under a prefix of its own
    url = request.getfixturevalue("redis_server").url_for("replay") if backend == "redis" else None
    await _two_gateways(tmp_path, url)


async def _two_gateways(tmp_path: Path, state_url: str | None) -> None:
    async with gateway(tmp_path, state_url=state_url) as one, \
            gateway(tmp_path, keys=one.keys, state_url=state_url) as two:
        first = one.sdk().chat.completions.with_raw_response.create
        second = two.sdk().chat.completions.with_raw_response.create
        await first(model="gen", messages=CHAT)  # type: ignore[arg-type]
        kept = await first(model="gen", messages=CHAT, extra_headers=_key("shared"))  # type: ignore[arg-type]
        replayed = await second(model="gen", messages=CHAT, extra_headers=_key("shared"))  # type: ignore[arg-type]
        assert _text(kept) == _text(replayed) == "call 2 part 2 end"  # the first gateway's engine's answer
        assert replayed.headers["idempotent-replayed"] == "true"
        assert _text(await second(model="gen", messages=CHAT)) == "call 1 part 1 end"  # type: ignore[arg-type]
        hit = await two.sdk().embeddings.with_raw_response.create(model="emb", input="x")
        miss_then = await one.sdk().embeddings.with_raw_response.create(model="emb", input="x")
        assert (hit.headers["x-hubserve-cache"], miss_then.headers["x-hubserve-cache"]) == ("miss", "hit")
