"""The Batch API's objects in OpenAI's shapes (openai SDK: types/file_object.py, batch.py, batch_*.py), and the
request bodies this server reads. Objects carry ``extra="allow"`` so the SDK parses them as its own."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
OPENAI_ENDPOINTS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# The Hub family's task route: POST /models/{org}/{name} (a repo id, or a served name without a slash)
HUB_ENDPOINT_RE = re.compile(r"^/models/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
FILE_ID_RE = re.compile(r"^file-[A-Za-z0-9_-]{1,80}$")
BATCH_ID_RE = re.compile(r"^batch_[A-Za-z0-9_-]{1,80}$")
COMPLETION_WINDOW_S = 24 * 3600
EXPIRES_AFTER_MIN_S, EXPIRES_AFTER_MAX_S = 3600, 30 * 24 * 3600  # OpenAI's bounds on a file's expiration policy


def allowed_endpoint(url: str) -> bool:
    return url in OPENAI_ENDPOINTS or bool(HUB_ENDPOINT_RE.match(url))


class FileObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class ExpiresAfter(BaseModel):
    """A file's expiration policy (``expires_after`` of an upload, ``output_expires_after`` of a batch): it
    expires ``seconds`` after its creation."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=EXPIRES_AFTER_MIN_S, le=EXPIRES_AFTER_MAX_S)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchError(BaseModel):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None


class Page(BaseModel):
    """A cursor page (openai SDK: SyncCursorPage): ``after`` the last id for the next one."""

    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchCreate(BaseModel):
    """POST /v1/batches (openai SDK: batch_create_params.py)."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not allowed_endpoint(v):
            raise ValueError(f"`endpoint` must be one of {', '.join(OPENAI_ENDPOINTS)} or a Hub task route "
                             "/models/{repo_id}")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("`metadata`: at most 16 pairs, keys up to 64 characters, values up to 512")
        return v


class BatchRequest(BaseModel):
    """One validated line of an input file."""

    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> str | None:
        """The model the line asks for (the body's ``model``, or the Hub route's repo id)."""
        if self.url.startswith("/models/"):
            return self.url.removeprefix("/models/")
        model = self.body.get("model")
        return model if isinstance(model, str) else None
