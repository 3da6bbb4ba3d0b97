"""Pydantic models of the OpenAI family. Request bodies pass through to vLLM unparsed; the gateway reads
only the fields it routes by, and builds only the model list itself."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RoutingFields(BaseModel):
    """The fields of an OpenAI request body the gateway itself reads; the rest is vLLM's business."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, description="Served name or repo id; omitted: the default model.")
    stream: bool | None = Field(default=False, description="Server-sent events instead of one JSON answer.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hubserve"
    root: str = Field(description="The Hub repo id.")
    repo: str
    commit: str
    task: str
    backend: str = Field(description="The engine serving it: vllm or transformers.")
    state: str
    max_model_len: int | None = None
    aliases: list[str] = Field(default_factory=list, description="Other names the model answers to.")
    input_modalities: list[str] = Field(
        default_factory=lambda: ["text"], description="What requests to it may carry: text, image, audio."
    )
    load: str = Field("startup", description="startup, or on-demand (loaded by its first request).")
    load_state: str = Field("loaded", description="loaded, loading or unloaded.")
    parent: str | None = Field(None, description="For a LoRA adapter: the served name of its base model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
