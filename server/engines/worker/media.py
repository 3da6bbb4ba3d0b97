"""The worker's contract for image, audio and table tasks, and the decoding they share.

A media task module (vision.py, vision_language.py, audio.py, tables.py, diffusion.py) exposes
``load(spec) -> MediaModel`` for the tasks it serves (``TASK_MODULES`` says which module serves which task).
A ``MediaModel`` splits a request into a per-request item and a batch key (``prepare``, on the event loop:
cheap, no decoding) and runs a batch of items with one key (``run``, on the model thread: decoding of images
and audio happens there, inside the worker process, never in the gateway). ``run`` answers one value per item:
a JSON-able object, or ``Binary`` (image or audio bytes with their content type).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest
from server.tasks.media_requests import MediaRequest

TASK_MODULES = {
    "image-classification": "vision",
    "zero-shot-image-classification": "vision",
    "object-detection": "vision",
    "image-segmentation": "vision",
    "image-to-text": "vision_language",
    "visual-question-answering": "vision_language",
    "document-question-answering": "vision_language",
    "automatic-speech-recognition": "audio",
    "audio-classification": "audio",
    "text-to-speech": "audio",
    "text-to-audio": "audio",
    "table-question-answering": "tables",
    "text-to-image": "diffusion",
    "image-to-image": "diffusion",
}


@dataclass(frozen=True)
class LoadSpec:
    """What the worker was started with."""

    repo: str
    revision: str
    task: str
    device: Any  # torch.device
    dtype: Any  # torch dtype or "auto"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Binary:
    """A binary answer: image or audio bytes."""

    data: bytes
    content_type: str


class MediaModel(ABC):
    """One loaded model serving one media task."""

    task: str
    max_len: int = 0  # context in tokens where the model has one (reported by /info)

    @abstractmethod
    def prepare(self, request: MediaRequest) -> tuple[Any, Hashable]:
        """(item, batch key) of one parsed request. Runs on the event loop: validate, do not decode."""

    @abstractmethod
    def run(self, items: list[Any], key: Hashable) -> list[Any]:
        """The answers of a batch of items with the same key, in order (runs on the model thread)."""

    def info(self) -> dict[str, Any]:
        return {}


def load_pipeline(spec: LoadSpec) -> Any:
    """transformers' pipeline for ``spec.task``, offline from the store at the pinned commit, safetensors only."""
    import transformers

    make: Any = transformers.pipeline  # its overloads want a literal task name; ours is a str
    return make(spec.task, model=spec.repo, revision=spec.revision, device=spec.device, dtype=spec.dtype,
                trust_remote_code=spec.trust_remote_code, model_kwargs={"use_safetensors": True})


def load(spec: LoadSpec) -> MediaModel:
    module = importlib.import_module(f"server.engines.worker.{TASK_MODULES[spec.task]}")
    model: MediaModel = module.load(spec)
    return model


# ---- decoding (in the worker, on the model thread) ---------------------------------------------------------


def b64bytes(data: str, where: str = "inputs") -> bytes:
    try:
        return binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise InvalidRequest(f"`{where}` is not valid base64 ({e}).", param=where) from e


def decode_image(data: str | bytes, where: str = "inputs") -> Any:
    """A PIL image in RGB from base64 text or bytes (the gateway has checked type and size already)."""
    from PIL import Image, UnidentifiedImageError

    raw = b64bytes(data, where) if isinstance(data, str) else data
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidRequest(f"`{where}` is not an image this server reads.", param=where) from e
    return image.convert("RGB")


def decode_audio(data: str | bytes, sampling_rate: int, where: str = "inputs") -> Any:
    """Mono float32 samples at ``sampling_rate`` (libsndfile reads wav, flac, ogg, mp3; resampled with scipy)."""
    import numpy as np
    import soundfile

    raw = b64bytes(data, where) if isinstance(data, str) else data
    try:
        samples, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError, soundfile.LibsndfileError) as e:
        raise InvalidRequest(f"`{where}` is not audio this server reads (wav, flac, ogg, mp3).", param=where) from e
    mono = samples.mean(axis=1).astype(np.float32)
    if rate != sampling_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(rate), int(sampling_rate))
        mono = resample_poly(mono, sampling_rate // g, int(rate) // g).astype(np.float32)
    return mono


def encode_png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_base64(image: Any) -> str:
    """A PIL image (e.g. a segmentation mask) as base64 PNG text, the Hub's mask encoding."""
    return base64.b64encode(encode_png(image)).decode("ascii")


def encode_flac(samples: Any, sampling_rate: int) -> bytes:
    """Audio samples (float, mono or channels-first) as FLAC bytes, the Inference API's text-to-speech answer."""
    import numpy as np
    import soundfile

    array = np.asarray(samples, dtype=np.float32)
    if array.ndim > 1:
        array = array.reshape(array.shape[0], -1).T if array.shape[0] < array.shape[-1] else array
    out = io.BytesIO()
    soundfile.write(out, np.clip(array, -1.0, 1.0), int(sampling_rate), format="FLAC")
    return out.getvalue()
