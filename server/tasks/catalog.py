"""The task catalog: every Hub task hubserve knows, what it takes in, what it answers and how long it may take.

One table (``TASKS``) is the vocabulary every family and both backends agree on: the Hub routes read the input
kind to know how to read a body (JSON text, an image, audio), the worker reads it to know what to decode, the
gateway reads ``timeout_s`` when a model sets none. The task sets below are views of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sync.manifest import UNSERVED_TASKS

Input = Literal["text", "image", "audio", "image+question", "table", "messages"]
Output = Literal["json", "image", "audio", "stream"]
Kind = Literal["generation", "embedding", "classification", "media"]

# Default time limits by kind of work (the seed: embeddings/classification short, generation long, images and
# audio longer still); a model's `timeout_s` in models.toml replaces its default. Generation's is the server's
# HUBSERVE_REQUEST_TIMEOUT_S (None here).
DEFAULT_TIMEOUT_S: dict[Kind, float | None] = {"classification": 60.0, "embedding": 60.0, "generation": None,
                                               "media": 900.0}


@dataclass(frozen=True)
class Task:
    """One Hub pipeline tag as hubserve serves it."""

    name: str
    input: Input
    output: Output
    kind: Kind
    client_method: str  # huggingface_hub.InferenceClient's method for it
    expects: str = ""  # the body it takes, for error messages

    @property
    def timeout_s(self) -> float | None:
        return DEFAULT_TIMEOUT_S[self.kind]


_IMAGE_BODY = "the image's bytes as the body, or {\"inputs\": \"<base64 image>\", \"parameters\": {...}}"
_AUDIO_BODY = "the audio's bytes as the body, or {\"inputs\": \"<base64 audio>\", \"parameters\": {...}}"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # text (served since issue 5)
        Task("text-generation", "text", "stream", "generation", "text_generation"),
        Task("conversational", "messages", "stream", "generation", "chat_completion"),
        Task("image-text-to-text", "messages", "stream", "generation", "chat_completion"),
        Task("text2text-generation", "text", "json", "generation", "text_generation",
             '{"inputs": "a text", "parameters": {"max_new_tokens", ...}}'),
        Task("summarization", "text", "json", "generation", "summarization",
             '{"inputs": "a text", "parameters": {"generate_parameters", "clean_up_tokenization_spaces"}}'),
        Task("translation", "text", "json", "generation", "translation",
             '{"inputs": "a text", "parameters": {"src_lang", "tgt_lang", "generate_parameters"}}'),
        Task("feature-extraction", "text", "json", "embedding", "feature_extraction"),
        Task("sentence-similarity", "text", "json", "embedding", "sentence_similarity"),
        Task("text-ranking", "text", "json", "classification", "-"),
        Task("text-classification", "text", "json", "classification", "text_classification",
             '{"inputs": "a text" (or a list), "parameters": {"top_k", "function_to_apply"}}'),
        Task("token-classification", "text", "json", "classification", "token_classification",
             '{"inputs": "a text" (or a list), "parameters": {"aggregation_strategy", "ignore_labels", "stride"}}'),
        Task("fill-mask", "text", "json", "classification", "fill_mask",
             '{"inputs": "a text with the mask token", "parameters": {"targets", "top_k"}}'),
        Task("zero-shot-classification", "text", "json", "classification", "zero_shot_classification",
             '{"inputs": "a text", "parameters": {"candidate_labels": [...], "multi_label", "hypothesis_template"}}'),
        Task("question-answering", "text", "json", "classification", "question_answering",
             '{"inputs": {"question": "...", "context": "..."}, "parameters": {"top_k", "max_answer_len", '
             '"handle_impossible_answer", "doc_stride"}}'),
        # images, audio and tables (issue 14)
        Task("image-classification", "image", "json", "media", "image_classification", _IMAGE_BODY),
        Task("zero-shot-image-classification", "image", "json", "media", "zero_shot_image_classification",
             _IMAGE_BODY + " with parameters.candidate_labels"),
        Task("object-detection", "image", "json", "media", "object_detection", _IMAGE_BODY),
        Task("image-segmentation", "image", "json", "media", "image_segmentation", _IMAGE_BODY),
        Task("image-to-text", "image", "json", "media", "image_to_text", _IMAGE_BODY),
        Task("visual-question-answering", "image+question", "json", "media", "visual_question_answering",
             '{"inputs": {"image": "<base64 image>", "question": "..."}} (or "image"/"question" at the root)'),
        Task("document-question-answering", "image+question", "json", "media", "document_question_answering",
             '{"inputs": {"image": "<base64 image>", "question": "..."}, "parameters": {...}}'),
        Task("automatic-speech-recognition", "audio", "json", "media", "automatic_speech_recognition", _AUDIO_BODY),
        Task("audio-classification", "audio", "json", "media", "audio_classification", _AUDIO_BODY),
        Task("text-to-speech", "text", "audio", "media", "text_to_speech", '{"inputs": "a text", "parameters": {...}}'),
        Task("text-to-audio", "text", "audio", "media", "text_to_speech", '{"inputs": "a text", "parameters": {...}}'),
        Task("text-to-image", "text", "image", "media", "text_to_image",
             '{"inputs": "a prompt", "parameters": {"negative_prompt", "height", "width", "num_inference_steps", '
             '"guidance_scale", "seed"}}'),
        Task("image-to-image", "image", "image", "media", "image_to_image",
             _IMAGE_BODY + ' with parameters {"prompt", "negative_prompt", "num_inference_steps", ...}'),
        Task("table-question-answering", "table", "json", "media", "table_question_answering",
             '{"inputs": {"query": "...", "table": {"column": ["cell", ...]}}}'),
    )
}

# Tasks of the Hub that hubserve refuses, and why (a 400 naming the task; models.toml refuses them too).
NOT_SERVED = UNSERVED_TASKS

GENERATIVE_TASKS = frozenset({"text-generation", "text2text-generation", "conversational", "image-text-to-text"})
EMBEDDING_TASKS = frozenset({"feature-extraction", "sentence-similarity", "embedding"})
RERANK_TASKS = frozenset({"text-ranking"})
SCORE_TASKS = RERANK_TASKS | EMBEDDING_TASKS  # vLLM's /v1/score: cross-encoders, or cosine of embeddings
TRANSCRIPTION_TASKS = frozenset({"automatic-speech-recognition"})
MEDIA_TASKS = frozenset(name for name, t in TASKS.items() if t.kind == "media")
IMAGE_OUTPUT_TASKS = frozenset(name for name, t in TASKS.items() if t.output == "image")  # diffusers pipelines


def task_timeout_s(task: str, generation_s: float) -> float:
    """The default time limit of ``task``'s requests; ``generation_s`` for generation and unknown tasks."""
    spec = TASKS.get(task)
    default = spec.timeout_s if spec is not None else None
    return default if default is not None else generation_s
