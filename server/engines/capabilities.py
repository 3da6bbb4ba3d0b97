"""What a model takes in (text, image, audio), read once from its snapshot's config.json.

A snapshot never changes, so the answer is cached per snapshot path. Vision-language models carry a
``vision_config`` (LLaVA, Qwen2-VL, Idefics3, Gemma 3, ...) or an image token; audio-language models an
``audio_config`` (Qwen2-Audio, Ultravox); Whisper-family models take audio to transcribe.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

IMAGE_KEYS = ("vision_config", "image_token_index", "image_token_id", "vision_tower")
AUDIO_KEYS = ("audio_config", "audio_token_index", "audio_token_id")
SPEECH_MODEL_TYPES = frozenset({"whisper"})


@functools.lru_cache(maxsize=256)
def input_modalities(snapshot: str) -> tuple[str, ...]:
    """``("text",)``, ``("text", "image")``, ``("audio",)`` ...: what requests to this model may carry."""
    try:
        config = json.loads((Path(snapshot) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ("text",)
    if not isinstance(config, dict):
        return ("text",)
    if config.get("model_type") in SPEECH_MODEL_TYPES:
        return ("audio",)
    found = ["text"]
    if any(k in config for k in IMAGE_KEYS):
        found.append("image")
    if any(k in config for k in AUDIO_KEYS):
        found.append("audio")
    return tuple(found)
