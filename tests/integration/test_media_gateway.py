"""The gateway side of the image, audio and table tasks, over synthetic engines that record what they get.

What the real worker answers is checked against transformers in tests/e2e/test_media_tasks.py; here: how the
gateway reads every body form InferenceClient sends (raw bytes, JSON base64, data: URIs, VQA's root fields),
sniffs and checks it against each limit (413/400 in the Hub's shape, naming the limit), refuses URLs, relays
binary answers byte for byte, translates Whisper-on-vLLM speech recognition, and applies per-model timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
from PIL import Image

from server.app import create_app
from server.engines.base import ModelInfo
from server.registry import Registry
from server.settings import Settings
from tests.fixtures.gateway_app import FLAT_KEY, asgi_client
from tests.fixtures.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {FLAT_KEY}"}
FLAC = b"fLaC-not-really-audio-but-opaque-bytes"


def png(width: int = 8, height: int = 8, color: str = "red", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt)
    return out.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """An image that does not compress: its bytes grow with its pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def wav(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="WAV")
    return out.getvalue()


@dataclass
class Worker:
    """A synthetic worker: records each /run body, answers what the real one would in shape."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    forms: list[bytes] = field(default_factory=list)
    pause_s: float = 0.0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/audio/transcriptions":
            self.forms.append(request.content)
            return httpx.Response(200, json={"text": " hello", "segments": [{"start": 0.0, "end": 1.5,
                                                                            "text": " hello"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.pause_s:
            await asyncio.sleep(self.pause_s)
        if request.url.path == "/run" and isinstance(body.get("inputs"), str) and "speak" in body["inputs"]:
            return httpx.Response(200, content=FLAC, headers={"content-type": "audio/flac"})
        return httpx.Response(200, json=[{"label": "red", "score": 0.9}])


MODELS = {
    "img": "image-classification",
    "vqa": "visual-question-answering",
    "asr": "audio-classification",
    "tts": "text-to-speech",
    "t2i": "text-to-image",
    "tab": "table-question-answering",
    "whisper": "automatic-speech-recognition",
}


def build(tmp_path: Path, worker: Worker, **settings: Any) -> tuple[Any, Registry]:
    engines = []
    for name, task in MODELS.items():
        info = ModelInfo(name=name, repo=f"org/{name}", commit="c" * 40, task=task, snapshot=str(tmp_path),
                         timeout_s=0.3 if name == "tab" else None)
        engine = ScriptedEngine(info, worker.handle)  # type: ignore[arg-type]
        engine.backend = "vllm" if name == "whisper" else "transformers"
        engines.append(engine)
    config = Settings.model_validate({"api_keys": FLAT_KEY, "state_url": f"sqlite://{tmp_path / 'state.db'}",
                                      **settings})
    for engine in engines:
        engine.max_in_flight = 4
    registry = Registry(engines, settings=config)
    return create_app(config, registry, start_engines=False), registry


@pytest.fixture
def worker() -> Worker:
    return Worker()


@pytest.fixture
async def client(tmp_path: Path, worker: Worker) -> Any:
    app, _ = build(tmp_path, worker, max_image_bytes=8_000, max_image_pixels=64 * 64,
                   image_types="image/png,image/jpeg", max_audio_seconds=2.0)
    async with asgi_client(app) as c:
        yield c


async def test_raw_bytes_and_json_base64_reach_the_worker_as_one_shape(client: httpx.AsyncClient,
                                                                        worker: Worker) -> None:
    image = png()
    r = await client.post("/models/org/img", content=image, headers=AUTH)  # InferenceClient without parameters
    assert r.status_code == 200 and r.json() == [{"label": "red", "score": 0.9}]
    r = await client.post("/models/img", headers=AUTH,
                          json={"inputs": base64.b64encode(image).decode(), "parameters": {"top_k": 1}})
    assert r.status_code == 200
    data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
    r = await client.post("/models/img", headers=AUTH, json={"inputs": data_uri})
    assert r.status_code == 200
    first, second, third = worker.bodies
    assert base64.b64decode(first["inputs"]) == image and first["inputs"] == third["inputs"]
    assert second == {"inputs": first["inputs"], "parameters": {"top_k": 1}}


async def test_vqa_root_fields_as_the_client_sends_them(client: httpx.AsyncClient, worker: Worker) -> None:
    b64 = base64.b64encode(png()).decode()
    body = {"inputs": b64, "parameters": {"top_k": 2}, "question": "What color?", "image": b64}
    r = await client.post("/models/vqa", headers=AUTH, json=body)
    assert r.status_code == 200
    assert worker.bodies[-1] == {"inputs": {"image": b64, "question": "What color?"}, "parameters": {"top_k": 2}}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (noise_png(60, 60), 413, "HUBSERVE_MAX_IMAGE_BYTES"),
        (png(100, 100, fmt="JPEG"), 400, "HUBSERVE_MAX_IMAGE_PIXELS"),
        (png(fmt="GIF"), 400, "image/gif images are not accepted"),
        (b"\x00\x01 not an image at all", 400, "not an image"),
        (b"https://example.com/cat.png", 400, "offline"),
    ],
)
async def test_each_image_limit_is_a_hub_error_naming_it(client: httpx.AsyncClient, worker: Worker, body: bytes,
                                                         status: int, words: str) -> None:
    r = await client.post("/models/img", content=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert words in r.json()["error"] and not worker.bodies


async def test_declared_type_must_agree_with_the_bytes(client: httpx.AsyncClient, worker: Worker) -> None:
    r = await client.post("/models/img", content=png(), headers={**AUTH, "content-type": "image/jpeg"})
    assert r.status_code == 400 and "declared image/jpeg, but the bytes are image/png" in r.json()["error"]
    r = await client.post("/models/img", content=png(), headers={**AUTH, "content-type": "application/octet-stream"})
    assert r.status_code == 200


async def test_json_inputs_are_checked_like_bytes(client: httpx.AsyncClient, worker: Worker) -> None:
    big = base64.b64encode(noise_png(60, 60)).decode()
    r = await client.post("/models/img", headers=AUTH, json={"inputs": big})
    assert r.status_code == 413 and "inputs" in r.json()["error"]
    r = await client.post("/models/img", headers=AUTH, json={"inputs": "http://example.com/a.png"})
    assert r.status_code == 400 and "offline" in r.json()["error"]
    r = await client.post("/models/img", headers=AUTH, json={"inputs": "%%% not base64"})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    r = await client.post("/models/img", headers=AUTH, json={"inputs": base64.b64encode(png()).decode(),
                                                              "parameters": {"top_k": 0}})
    assert r.status_code == 400 and "image-classification" in r.json()["error"]
    assert not worker.bodies


async def test_audio_length_limit(client: httpx.AsyncClient, worker: Worker) -> None:
    r = await client.post("/models/asr", content=wav(3.0), headers=AUTH)
    assert r.status_code == 400 and "HUBSERVE_MAX_AUDIO_SECONDS" in r.json()["error"]
    r = await client.post("/models/asr", content=wav(1.0), headers=AUTH)
    assert r.status_code == 200 and base64.b64decode(worker.bodies[-1]["inputs"]) == wav(1.0)


async def test_binary_answers_are_relayed_byte_for_byte(client: httpx.AsyncClient) -> None:
    r = await client.post("/models/tts", headers=AUTH, json={"inputs": "speak to me"})
    assert r.status_code == 200 and r.content == FLAC and r.headers["content-type"] == "audio/flac"


async def test_generated_image_size_is_capped(client: httpx.AsyncClient, worker: Worker) -> None:
    r = await client.post("/models/t2i", headers=AUTH, json={"inputs": "a cat", "parameters": {"height": 512,
                                                                                               "width": 512}})
    assert r.status_code == 400 and "HUBSERVE_MAX_IMAGE_PIXELS" in r.json()["error"] and not worker.bodies
    r = await client.post("/models/t2i", headers=AUTH, json={"inputs": "a cat", "parameters": {"height": 30}})
    assert r.status_code == 400 and "multiple of 8" in r.json()["error"]


async def test_text_tasks_take_json_only(client: httpx.AsyncClient) -> None:
    r = await client.post("/models/tts", headers=AUTH, content=png())
    assert r.status_code == 400 and "text-to-speech" in r.json()["error"]


async def test_tabular_tasks_are_refused_with_the_reason(client: httpx.AsyncClient) -> None:
    r = await client.post("/models/img", headers=AUTH, json={"table": {"a": ["1"]}})  # InferenceClient's body
    assert r.status_code == 400 and "tabular-classification" in r.json()["error"] and "pickle" in r.json()["error"]
    r = await client.post("/models/org/img/pipeline/audio-to-audio", headers=AUTH, content=wav(0.5))
    assert r.status_code == 400 and "audio-to-audio is not served" in r.json()["error"]


async def test_whisper_on_vllm_answers_the_hub_shape(client: httpx.AsyncClient, worker: Worker) -> None:
    r = await client.post("/models/whisper", content=wav(1.0), headers=AUTH)
    assert r.status_code == 200 and r.json() == {"text": " hello"}
    assert b'name="response_format"\r\n\r\njson' in worker.forms[-1] and wav(1.0) in worker.forms[-1]
    parameters = {"return_timestamps": True, "generation_parameters": {"temperature": 0.5}}
    body = {"inputs": base64.b64encode(wav(1.0)).decode(), "parameters": parameters}
    r = await client.post("/models/whisper", json=body, headers=AUTH)
    assert r.json() == {"text": " hello", "chunks": [{"text": " hello", "timestamp": [0.0, 1.5]}]}
    assert b"verbose_json" in worker.forms[-1] and b'name="temperature"\r\n\r\n0.5' in worker.forms[-1]
    r = await client.post("/models/whisper", json={**body, "parameters": {"generation_parameters": {"num_beams": 2}}},
                          headers=AUTH)
    assert r.status_code == 400 and "num_beams" in r.json()["error"] and "transformers" in r.json()["error"]


async def test_a_models_timeout_replaces_the_servers(tmp_path: Path) -> None:
    slow = Worker(pause_s=1.0)
    app, registry = build(tmp_path, slow, request_timeout_s=30)
    async with asgi_client(app) as c:
        table = {"inputs": {"query": "how many?", "table": {"a": ["1", "2"]}}}
        r = await c.post("/models/tab", headers=AUTH, json=table)  # timeout_s = 0.3
        assert r.status_code == 504 and "0.3 s of model `tab`" in r.json()["error"]
        slow.pause_s = 0.5
        r = await c.post("/models/img", headers=AUTH, content=png())  # media default: 900 s
        assert r.status_code == 200
    assert sum(e.in_flight for e in registry.engines.values()) == 0
