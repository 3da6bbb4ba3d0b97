"""Request models of the image, audio and table tasks (the bodies ``huggingface_hub.InferenceClient`` sends).

The client sends an image or audio task either as the raw bytes (no parameters) or as JSON with the bytes in
base64: ``{"inputs": "<base64>", "parameters": {...}}``; visual question answering adds ``"image"`` and
``"question"`` at the root, document question answering sends ``{"inputs": {"image", "question"}}``, table
question answering ``{"inputs": {"query", "table"}}``. ``parse_media_task`` turns every form into one
normalized request (media always base64 in ``inputs`` or ``inputs.image``), which is what the gateway checks
and sends to the worker, and what the worker parses again. Pure: nothing here decodes an image or audio.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.errors import InvalidRequest
from server.tasks.catalog import TASKS
from server.tasks.requests import (
    GENERATE_KEYS,
    MAX_NEW_TOKENS,
    ZeroShotBase,
    refuse_unserved,
    validate_task_request,
)

log = logging.getLogger("hubserve.hub")

MAX_INFERENCE_STEPS = 200
MAX_TOP_K = 1000


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")


def _generate_kwargs(flat: dict[str, Any], nested: dict[str, Any] | None,
                     also: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``generate`` arguments: the flat ones, then ``generation_parameters``; only known keys, bounded."""
    merged = {k: v for k, v in {**flat, **(nested or {})}.items() if v is not None}
    unknown = sorted(set(merged) - GENERATE_KEYS - also)
    if unknown:
        raise ValueError(f"unknown generation parameters: {', '.join(unknown)}")
    for key in ("max_new_tokens", "max_length"):
        if key in merged and not (isinstance(merged[key], int) and 0 < merged[key] <= MAX_NEW_TOKENS):
            raise ValueError(f"`{key}` must be an integer in 1..{MAX_NEW_TOKENS}")
    return merged


class ClassificationParameters(_Parameters):
    """image-classification and audio-classification."""

    top_k: int | None = Field(default=None, gt=0, le=MAX_TOP_K)
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None


class ZeroShotImageParameters(ZeroShotBase):
    @property
    def labels(self) -> list[str]:
        given = self.candidate_labels.split(",") if isinstance(self.candidate_labels, str) else self.candidate_labels
        return [label.strip() for label in given if label.strip()]


class ObjectDetectionParameters(_Parameters):
    threshold: float | None = Field(default=None, ge=0, le=1)


class ImageSegmentationParameters(_Parameters):
    subtask: Literal["semantic", "instance", "panoptic"] | None = None
    threshold: float | None = Field(default=None, ge=0, le=1)
    mask_threshold: float | None = Field(default=None, ge=0, le=1)
    overlap_mask_area_threshold: float | None = Field(default=None, ge=0, le=1)


class GenerationParameters(_Parameters):
    """image-to-text, automatic-speech-recognition and text-to-speech: ``generate`` arguments."""

    max_new_tokens: int | None = Field(default=None, gt=0, le=MAX_NEW_TOKENS)
    generation_parameters: dict[str, Any] | None = None
    generate_kwargs: dict[str, Any] | None = None  # transformers' own name for them

    _also: frozenset[str] = frozenset()  # keys beyond GENERATE_KEYS this task's generate() takes
    flat_keys: ClassVar[frozenset[str]] = GENERATE_KEYS  # generate() reads them from the extra fields

    def generate(self) -> dict[str, Any]:
        """``generate`` arguments: flat ones (text_to_speech sends them so), then the nested dicts."""
        flat = {k: v for k, v in (self.model_extra or {}).items() if k in GENERATE_KEYS}
        return _generate_kwargs({**flat, "max_new_tokens": self.max_new_tokens},
                                {**(self.generate_kwargs or {}), **(self.generation_parameters or {})}, self._also)


class SpeechRecognitionParameters(GenerationParameters):
    """Whisper's generate also takes ``language`` (e.g. "en", "english") and ``task`` (transcribe, translate)."""

    return_timestamps: bool | Literal["word", "char"] | None = None
    _also: frozenset[str] = frozenset({"language", "task"})


class VQAParameters(_Parameters):
    top_k: int | None = Field(default=None, gt=0, le=MAX_TOP_K)


class DocumentQAParameters(_Parameters):
    top_k: int | None = Field(default=None, gt=0, le=100)
    doc_stride: int | None = Field(default=None, gt=0)
    handle_impossible_answer: bool | None = None
    lang: str | None = None
    max_answer_len: int | None = Field(default=None, gt=0)
    max_question_len: int | None = Field(default=None, gt=0)
    max_seq_len: int | None = Field(default=None, gt=0)
    # the words and their boxes: pairs ([["word", [x0, y0, x1, y1]], ...]) or the flat form the Hub spec gives
    word_boxes: list[tuple[str, list[float]] | list[float] | str] | None = None


class TextToImageParameters(_Parameters):
    negative_prompt: str | None = None
    height: int | None = Field(default=None, gt=0, le=8192)
    width: int | None = Field(default=None, gt=0, le=8192)
    num_inference_steps: int | None = Field(default=None, gt=0, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    scheduler: str | None = Field(default=None, pattern=r"^[A-Za-z0-9]{1,64}$")

    @model_validator(mode="after")
    def _multiple_of_8(self) -> TextToImageParameters:
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and value % 8:
                raise ValueError(f"`{side}` must be a multiple of 8")
        return self


class TargetSize(BaseModel):
    height: int = Field(gt=0, le=8192, multiple_of=8)
    width: int = Field(gt=0, le=8192, multiple_of=8)


class ImageToImageParameters(TextToImageParameters):
    prompt: str | None = None
    target_size: TargetSize | None = None
    strength: float | None = Field(default=None, gt=0, le=1)


class TableQAParameters(_Parameters):
    padding: Literal["do_not_pad", "longest", "max_length"] | bool | None = None
    sequential: bool | None = None
    truncation: Literal["drop_rows_to_fit", "do_not_truncate"] | bool | None = None


class TextToSpeechParameters(GenerationParameters):
    seed: int | None = Field(default=None, ge=0, lt=2**63)


# ---- the requests ------------------------------------------------------------------------------------------


class _MediaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    options: dict[str, Any] | None = Field(None, description="Legacy Inference API options; ignored.")

    def media(self) -> list[tuple[str, str]]:
        """(where, base64) of every image or audio item in the request."""
        return []


class _Base64Input(_MediaRequest):
    inputs: str = Field(min_length=1)

    def media(self) -> list[tuple[str, str]]:
        return [("inputs", self.inputs)]


class ImageClassificationRequest(_Base64Input):
    parameters: ClassificationParameters = Field(default_factory=lambda: ClassificationParameters())


class ZeroShotImageRequest(_Base64Input):
    parameters: ZeroShotImageParameters


class ObjectDetectionRequest(_Base64Input):
    parameters: ObjectDetectionParameters = Field(default_factory=lambda: ObjectDetectionParameters())


class ImageSegmentationRequest(_Base64Input):
    parameters: ImageSegmentationParameters = Field(default_factory=lambda: ImageSegmentationParameters())


class ImageToTextRequest(_Base64Input):
    parameters: GenerationParameters = Field(default_factory=lambda: GenerationParameters())


class SpeechRecognitionRequest(_Base64Input):
    parameters: SpeechRecognitionParameters = Field(default_factory=lambda: SpeechRecognitionParameters())


class AudioClassificationRequest(_Base64Input):
    parameters: ClassificationParameters = Field(default_factory=lambda: ClassificationParameters())


class ImageToImageRequest(_Base64Input):
    parameters: ImageToImageParameters = Field(default_factory=lambda: ImageToImageParameters())


class ImageQuestion(BaseModel):
    image: str = Field(min_length=1)
    question: str = Field(min_length=1)


class VQARequest(_MediaRequest):
    inputs: ImageQuestion
    parameters: VQAParameters = Field(default_factory=lambda: VQAParameters())

    def media(self) -> list[tuple[str, str]]:
        return [("inputs.image", self.inputs.image)]


class DocumentQARequest(_MediaRequest):
    inputs: ImageQuestion
    parameters: DocumentQAParameters = Field(default_factory=lambda: DocumentQAParameters())

    def media(self) -> list[tuple[str, str]]:
        return [("inputs.image", self.inputs.image)]


class TextToSpeechRequest(_MediaRequest):
    inputs: str = Field(min_length=1)
    parameters: TextToSpeechParameters = Field(default_factory=lambda: TextToSpeechParameters())


class TextToImageRequest(_MediaRequest):
    inputs: str = Field(min_length=1)
    parameters: TextToImageParameters = Field(default_factory=lambda: TextToImageParameters())


Cell = str | bool | int | float


class Table(BaseModel):
    query: str = Field(min_length=1)
    table: dict[str, list[Cell]] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _question(cls, data: Any) -> Any:  # the Hub's spec calls it `question`, the client sends `query`
        if isinstance(data, dict) and "query" not in data and "question" in data:
            data = {**data, "query": data["question"]}
        return data

    @field_validator("table")
    @classmethod
    def _rectangular(cls, table: dict[str, list[Cell]]) -> dict[str, list[Cell]]:
        lengths = {len(cells) for cells in table.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError("every column of `table` must hold the same number of cells (at least one)")
        return table


class TableQARequest(_MediaRequest):
    inputs: Table
    parameters: TableQAParameters = Field(default_factory=lambda: TableQAParameters())


MEDIA_REQUESTS: dict[str, type[_MediaRequest]] = {
    "image-classification": ImageClassificationRequest,
    "zero-shot-image-classification": ZeroShotImageRequest,
    "object-detection": ObjectDetectionRequest,
    "image-segmentation": ImageSegmentationRequest,
    "image-to-text": ImageToTextRequest,
    "visual-question-answering": VQARequest,
    "document-question-answering": DocumentQARequest,
    "automatic-speech-recognition": SpeechRecognitionRequest,
    "audio-classification": AudioClassificationRequest,
    "text-to-speech": TextToSpeechRequest,
    "text-to-audio": TextToSpeechRequest,
    "text-to-image": TextToImageRequest,
    "image-to-image": ImageToImageRequest,
    "table-question-answering": TableQARequest,
}
MediaRequest = _MediaRequest


def normalize(task: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The client's composite forms as one shape: VQA's root-level ``image``/``question`` go into ``inputs``."""
    if task in ("visual-question-answering", "document-question-answering") and "question" in payload:
        image = payload.get("image", payload.get("inputs"))
        rest = {k: v for k, v in payload.items() if k not in ("image", "question", "inputs")}
        return {**rest, "inputs": {"image": image, "question": payload["question"]}}
    return payload


def parse_media_task(task: str, payload: object, model: str) -> _MediaRequest:
    """The request for ``model``'s media ``task``; InvalidRequest names the model, its task and what it expects."""
    refuse_unserved(payload)
    cls = MEDIA_REQUESTS[task]
    expects = f"Model `{model}` serves {task} and expects {TASKS[task].expects}"
    if not isinstance(payload, dict) or ("inputs" not in payload and "image" not in payload):
        raise InvalidRequest(f"{expects}.")

    def check(request: _MediaRequest) -> None:
        parameters = getattr(request, "parameters", None)
        if isinstance(parameters, GenerationParameters):
            parameters.generate()

    request = validate_task_request(cls, normalize(task, payload), expects, check)
    if isinstance(request, ZeroShotImageRequest) and not request.parameters.labels:
        raise InvalidRequest("`candidate_labels` must name at least one label.", param="candidate_labels")
    return request

