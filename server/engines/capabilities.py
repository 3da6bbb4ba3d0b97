"""What a model takes in (text, image, audio), read once from its snapshot's config.json.

A snapshot never changes, so the answer is cached per snapshot path. Vision-language models carry a
``vision_config`` (LLaVA, Qwen2-VL, Idefics3, Gemma 3, ...) or an image token; audio-language models an
``audio_config`` (Qwen2-Audio, Ultravox); Whisper-family models take audio to transcribe.
"""

from __future__ import annotations

from server.tasks.catalog import TASKS
from server.tasks.snapshot import model_config

IMAGE_KEYS = ("vision_config", "image_token_index", "image_token_id", "vision_tower")
AUDIO_KEYS = ("audio_config", "audio_token_index", "audio_token_id")
SPEECH_MODEL_TYPES = frozenset({"whisper"})


def input_modalities(snapshot: str) -> tuple[str, ...]:
    """``("text",)``, ``("text", "image")``, ``("audio",)`` ...: what requests to this model may carry."""
    config = model_config(snapshot)
    if config.get("model_type") in SPEECH_MODEL_TYPES:
        return ("audio",)
    found = ["text"]
    if any(k in config for k in IMAGE_KEYS):
        found.append("image")
    if any(k in config for k in AUDIO_KEYS):
        found.append("audio")
    return tuple(found)


TASK_INPUTS = {"image": ("image",), "image+question": ("image", "text"), "audio": ("audio",)}


def task_modalities(snapshot: str, task: str) -> tuple[str, ...]:
    """What a model takes in for its task (as /v1/models lists it): an image classifier images, a speech
    recognizer audio; chat models what their config says."""
    spec = TASKS.get(task)
    return TASK_INPUTS.get(spec.input, input_modalities(snapshot)) if spec is not None else input_modalities(snapshot)
