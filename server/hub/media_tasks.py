"""Image, audio and table tasks on the Hub routes: read the body as the client sent it, check it, pass it on.

InferenceClient sends an image or audio task as the file's raw bytes (no parameters) or as JSON with the bytes in
base64 (server/tasks/media_requests.py has every form). The gateway:

1. reads the body; a body that is not JSON is the file itself (its Content-Type is only a claim: the bytes are
   sniffed, and a declared image/audio type must agree with them);
2. in a worker thread, never on the event loop: parses the JSON, validates the request for the model's task,
   decodes each base64 item just far enough to check it against the limits (bytes, image pixels from the
   header, audio seconds, accepted image types) and serializes the normalized request for the engine;
3. sends it to the model's engine: the transformers worker (which decodes and runs it, answering JSON or
   image/audio bytes, relayed as they are), or, for Whisper on vLLM, vLLM's /v1/audio/transcriptions.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request, Response

from server.engines.base import Engine
from server.engines.client import parse_json, post_engine
from server.errors import InvalidRequest
from server.hub import on_vllm
from server.media import MediaLimits, check_bytes, decode_inline
from server.registry import Registry
from server.tasks.catalog import TASKS
from server.tasks.media_requests import (
    ImageToImageParameters,
    ImageToImageRequest,
    MediaRequest,
    SpeechRecognitionRequest,
    TextToImageRequest,
    parse_media_task,
)

JSON_TYPES = ("application/json", "text/json")


@dataclass(frozen=True)
class Prepared:
    request: MediaRequest
    body: bytes  # the normalized request, serialized for the worker
    audio: bytes | None = None  # the audio file itself, for engines that take the file (vLLM)


def media_kind(task: str) -> Literal["image", "audio"] | None:
    kind = TASKS[task].input
    return "image" if kind in ("image", "image+question") else "audio" if kind == "audio" else None


def is_json_body(body: bytes, content_type: str) -> bool:
    """JSON by its declared type, or by its first byte (no image or audio format starts with ``{``)."""
    return content_type in JSON_TYPES or body.lstrip()[:1] == b"{"


def prepare(task: str, model: str, body: bytes, content_type: str, limits: MediaLimits,
            max_image_pixels: int) -> Prepared:
    """Parse, validate and check one request (blocking: runs in a worker thread)."""
    kind = media_kind(task)
    raw: bytes | None = None
    if is_json_body(body, content_type):
        payload = parse_json(body)
    elif kind is None:
        raise InvalidRequest(f"Model `{model}` serves {task} and expects {TASKS[task].expects}.")
    else:
        if body[:8].lower().startswith((b"http://", b"https:/")):
            raise InvalidRequest("The body is a URL; remote URLs are not fetched (this server is offline): send the "
                                 f"{kind}'s bytes as the body.", param="inputs")
        declared = content_type if content_type.startswith(f"{kind}/") else None
        check_bytes(kind, "body", body, declared, limits)
        raw = body
        payload = {"inputs": base64.b64encode(body).decode("ascii")}
    request = parse_media_task(task, payload, model)
    if kind is not None and raw is None:
        for where, text in request.media():
            data, declared = decode_inline(kind, where, text, limits)
            check_bytes(kind, where, data, declared, limits)
            raw = data
            if text[:5].lower() == "data:":  # the worker takes plain base64; other text goes on as it came
                _set_base64(request, where, data)
    _check_output_size(request, max_image_pixels)
    normalized = request.model_dump(mode="json", exclude_none=True)
    return Prepared(request, json.dumps(normalized).encode(), raw if kind == "audio" else None)


def _set_base64(request: MediaRequest, where: str, data: bytes) -> None:
    """Plain base64 for the worker (a data: URI's prefix dropped)."""
    text = base64.b64encode(data).decode("ascii")
    if where == "inputs":
        request.inputs = text  # type: ignore[attr-defined]
    else:
        request.inputs.image = text  # type: ignore[attr-defined]


def _check_output_size(request: MediaRequest, max_pixels: int) -> None:
    """Generated images obey the image pixel limit too."""
    if isinstance(request, TextToImageRequest | ImageToImageRequest):
        p = request.parameters
        height, width = p.height, p.width
        if isinstance(p, ImageToImageParameters) and p.target_size is not None:
            height, width = p.target_size.height, p.target_size.width
        if height and width and height * width > max_pixels:
            raise InvalidRequest(f"A {width}x{height} image is over the limit of {max_pixels} pixels "
                                 "(HUBSERVE_MAX_IMAGE_PIXELS).", param="parameters")


async def run_media_task(registry: Registry, engine: Engine, request: Request) -> Response:
    """One image, audio or table task request, answered in the Hub's shape (JSON, or image/audio bytes)."""
    task = engine.info.task
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    settings = registry.settings
    prepared = await asyncio.to_thread(prepare, task, engine.info.name, body, content_type,
                                       MediaLimits.from_settings(settings), settings.max_image_pixels)
    async with registry.using(engine) as engine:
        if engine.backend == "vllm":  # engines/select.py sends only Whisper speech recognition there
            assert isinstance(prepared.request, SpeechRecognitionRequest) and prepared.audio is not None
            answer: Any = await on_vllm.transcribe(engine, prepared.audio, prepared.request)
            return Response(json.dumps(answer), media_type="application/json")
        response = await post_engine(engine, "/run", content=prepared.body)
    return Response(response.content, media_type=response.headers.get("content-type", "application/json"))
