"""``/v1/audio/transcriptions`` and ``/translations``: the multipart upload as the ``openai`` SDK sends it,
checked (bytes, seconds, a readable audio file) off the event loop, then sent on as a multipart body of the
gateway's own making (fixed file name, the routed model's name) to the model's vLLM engine (engines/select.py
puts speech recognition on vLLM)."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import Request, Response
from starlette.datastructures import UploadFile

from server.engines.capabilities import input_modalities
from server.errors import Family, InvalidRequest
from server.media import MediaLimits, check_audio
from server.openai.serving import routed_engine
from server.proxy import forward
from server.registry import Registry

MAX_FIELDS = 32


async def _read_form(request: Request, limit: int) -> tuple[bytes, list[tuple[str, str]]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("Send the audio as multipart/form-data with a `file` part.", param="file")
    form = await request.form(max_files=1, max_fields=MAX_FIELDS)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("The form needs a `file` part holding the audio.", param="file")
        data = await upload.read(limit + 1)
        fields = [(k, v) for k, v in form.multi_items() if isinstance(v, str) and k != "file"]
    finally:
        await form.close()
    return data, fields


async def transcribe(request: Request, registry: Registry, path: str) -> Response:
    """``path``: ``/v1/audio/transcriptions`` or ``/v1/audio/translations``."""
    settings = registry.settings
    data, fields = await _read_form(request, settings.max_audio_bytes)
    named = dict(fields)
    engine = routed_engine(request, registry, named.get("model"))
    if "audio" not in input_modalities(engine.info.snapshot) or engine.backend == "transformers":
        raise InvalidRequest(f"Model `{engine.info.name}` ({engine.info.task}) does not take audio; name a "
                             "speech-recognition model.", param="model")
    await asyncio.to_thread(check_audio, "file", data, MediaLimits.from_settings(settings))
    sent: dict[str, list[str]] = {"model": [engine.info.name]}
    for key, value in fields:
        if key != "model":
            sent.setdefault(key, []).append(value)  # repeated fields (timestamp_granularities[]) stay repeated
    built = httpx.Request("POST", "http://engine", data=sent, files={"file": ("audio", data)})
    return await forward(registry, engine, path, built.read(), request.headers, Family.OPENAI,
                         content_type=built.headers["content-type"])
