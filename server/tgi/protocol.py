"""Pydantic models of the TGI family (text-generation-inference's router API), with TGI's validation rules.

Field names, defaults and error messages follow TGI's router (``router/src/lib.rs``, ``validation.rs``), so
that ``huggingface_hub.InferenceClient`` and other TGI clients see the same answers. Unknown parameters are
accepted and logged (new client versions must not break); limits that depend on the model (context length)
are checked in serving, where the engine is known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import InvalidRequest, validation_problem

log = logging.getLogger("hubserve.tgi")

MAX_STOP_SEQUENCES = 4
MAX_BEST_OF = 2
MAX_TOP_N_TOKENS = 5

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class _Lenient(BaseModel):
    """Accepts unknown fields (kept in ``model_extra``) so that newer clients are not rejected."""

    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class Grammar(BaseModel):
    """TGI's guided generation: a JSON schema (``json``/``json_schema``) or a regular expression."""

    type: Literal["json", "json_schema", "regex"]
    value: Any = Field(description="A JSON schema (object or string) or a regular expression.")

    @model_validator(mode="after")
    def _value_matches_type(self) -> Grammar:
        if self.type == "regex" and not isinstance(self.value, str):
            raise ValueError("grammar of type `regex` needs a string value")
        if self.type == "json_schema" and isinstance(self.value, dict) and "schema" in self.value:
            self.value = self.value["schema"]  # TGI's json_schema form: {"name"?, "schema": {...}}
        return self


def _check(ok: Callable[[Any], bool], message: str) -> AfterValidator:
    """A field check with TGI's own error message; None (unset) always passes."""

    def validate(v: Any) -> Any:
        if v is not None and not ok(v):
            raise ValueError(message)
        return v

    return AfterValidator(validate)


def _positive(v: float) -> bool:
    return v > 0


def _open_unit(v: float) -> bool:
    return 0.0 < v < 1.0


class GenerateParameters(_Lenient):
    """``parameters`` of /generate, /generate_stream and /. Defaults are TGI's: greedy unless sampling asked."""

    best_of: int | None = Field(None, description="Generate best_of sequences, return the most likely one.")
    temperature: Annotated[float | None, _check(_positive, "`temperature` must be strictly positive")] = None
    repetition_penalty: Annotated[
        float | None, _check(_positive, "`repetition_penalty` must be strictly positive")
    ] = None
    frequency_penalty: Annotated[
        float | None, _check(lambda v: -2.0 <= v <= 2.0, "`frequency_penalty` must be >= -2.0 and <= 2.0")
    ] = None
    top_k: Annotated[int | None, _check(_positive, "`top_k` must be strictly positive")] = None
    top_p: Annotated[float | None, _check(_open_unit, "`top_p` must be > 0.0 and < 1.0")] = None
    typical_p: Annotated[float | None, _check(_open_unit, "`typical_p` must be > 0.0 and < 1.0")] = Field(
        None, description="Accepted for compatibility; vLLM has no typical sampling."
    )
    do_sample: bool = False
    max_new_tokens: Annotated[int | None, _check(_positive, "`max_new_tokens` must be strictly positive")] = Field(
        None, description="Default: whatever fits in the model's context."
    )
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = Field(None, description="Keep only the last `truncate` tokens of the input.")
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    top_n_tokens: int | None = None
    grammar: Grammar | None = None
    adapter_id: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("`stop` sequences cannot be empty")
        return v

    @field_validator("truncate")
    @classmethod
    def _truncate(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"`truncate` must be strictly positive. Given: {v}")
        return v

    @field_validator("top_n_tokens")
    @classmethod
    def _top_n_tokens(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_N_TOKENS:
            raise ValueError(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {v}")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and not 0 < v <= MAX_BEST_OF:
            raise ValueError(f"`best_of` must be > 0 and <= {MAX_BEST_OF}. Given: {v}")
        return v

    @model_validator(mode="after")
    def _best_of_rules(self) -> GenerateParameters:
        if (self.best_of or 1) > 1:
            if not self.sampling:
                raise ValueError("you must use sampling when `best_of` is > 1")
            if self.seed is not None:
                raise ValueError("`seed` must not be set when `best_of` > 1")
        return self

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when any sampling warper is set; otherwise it decodes greedily."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k != 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )


class GenerateRequest(_Lenient):
    """Body of /generate and /generate_stream (and of / with ``stream``)."""

    inputs: str = Field(description="The prompt.")
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters.model_validate({}))
    stream: bool = Field(False, description="Only read by POST / and the Hub routes.")
    options: dict[str, Any] | None = Field(None, description="Legacy Inference API options; ignored.")

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: str) -> str:
        if not v:
            raise ValueError("`inputs` cannot be empty")
        return v


class TokenizeRequest(_Lenient):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters.model_validate({}))


# ---- responses ---------------------------------------------------------------------------------------------


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(None, description="None for the first token (nothing predicts it).")


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class SimpleToken(BaseModel):
    """One entry of /tokenize: the token and the character span of ``inputs`` it covers."""

    id: int
    text: str
    start: int
    stop: int


class SequenceDetails(BaseModel):
    """What TGI reports about one generated sequence."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class BestOfSequence(SequenceDetails):
    generated_text: str


class Details(SequenceDetails):
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int
    seed: int | None = None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    """GET /info, TGI's field names; hubserve fills them from the engine and the pinned revision."""

    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    model_dtype: str | None = None
    model_device_type: str | None = None
    max_concurrent_requests: int
    max_best_of: int = MAX_BEST_OF
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_input_tokens: int | None
    max_total_tokens: int | None
    max_top_n_tokens: int = MAX_TOP_N_TOKENS
    validation_workers: int = 1
    max_client_batch_size: int = 1
    router: str = "hubserve"
    version: str
    sha: str | None = None
    docker_label: str | None = None


# ---- parsing -----------------------------------------------------------------------------------------------


def parse_generate(payload: object) -> GenerateRequest:
    """Validate a generate body; InvalidRequest (TGI: 422 validation) with TGI's message otherwise."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object with `inputs` and `parameters`.")
    try:
        request = GenerateRequest.model_validate(payload)
    except ValidationError as e:
        message, param = validation_problem(e)
        raise InvalidRequest(message, param=param) from e
    ignored = request.ignored_fields() + [f"parameters.{k}" for k in request.parameters.ignored_fields()]
    if ignored:
        log.info("ignoring unknown fields: %s", ", ".join(ignored))
    return request


def parse_tokenize(payload: object) -> TokenizeRequest:
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object with `inputs`.")
    try:
        return TokenizeRequest.model_validate(payload)
    except ValidationError as e:
        message, param = validation_problem(e)
        raise InvalidRequest(message, param=param) from e
