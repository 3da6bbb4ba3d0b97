"""Pydantic models of the Hub Inference API family (the bodies ``huggingface_hub.InferenceClient`` sends).

Text generation reuses TGI's models (server/tgi/protocol.py). Feature extraction follows TEI's /embed, which
InferenceClient sends to URL targets: ``inputs`` plus root-level options. Unknown fields are accepted and
logged; the legacy serverless ``options`` ({"wait_for_model", "use_cache"}) is accepted and ignored.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidRequest

log = logging.getLogger("hubserve.hub")


class EmbedRequest(BaseModel):
    """Feature extraction: one text or a batch; the answer is one vector per text (always a nested list)."""

    model_config = ConfigDict(extra="allow")

    inputs: str | list[str]
    normalize: bool = Field(True, description="L2-normalize the vectors (TEI's default).")
    prompt_name: str | None = Field(None, description="A prompt of the model's config_sentence_transformers.json.")
    truncate: bool = Field(False, description="Cut inputs longer than the model's context instead of failing.")
    truncation_direction: Literal["left", "right", "Left", "Right"] = "right"
    dimensions: int | None = Field(None, gt=0, description="Keep the first N dimensions (Matryoshka models).")
    parameters: dict[str, Any] | None = Field(None, description="Legacy place of the options above.")
    options: dict[str, Any] | None = Field(None, description="Legacy Inference API options; ignored.")

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("`inputs` cannot be empty")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


def parse_embed(payload: object) -> EmbedRequest:
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object with `inputs`.")
    merged = dict(payload)
    legacy = merged.get("parameters")
    if isinstance(legacy, dict):  # old clients nest the options in `parameters`; root-level values win
        merged = {**{k: v for k, v in legacy.items() if k in EmbedRequest.model_fields}, **merged}
    try:
        request = EmbedRequest.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(msg if msg.startswith("`") else f"{loc}: {msg}", param=loc or None) from e
    if request.model_extra:
        log.info("ignoring unknown fields: %s", ", ".join(sorted(request.model_extra)))
    return request


class SimilarityInputs(BaseModel):
    source_sentence: str
    sentences: list[str] = Field(min_length=1)


class SimilarityRequest(BaseModel):
    """Sentence similarity (answered by embedding models): cosine of the source with each sentence."""

    model_config = ConfigDict(extra="allow")

    inputs: SimilarityInputs
    parameters: dict[str, Any] | None = None
    options: dict[str, Any] | None = None


def parse_similarity(payload: dict[str, Any]) -> SimilarityRequest:
    try:
        return SimilarityRequest.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{loc}: {first['msg']}", param=loc or None) from e
