"""Pydantic models of the Hub Inference API family (the bodies ``huggingface_hub.InferenceClient`` sends).

Text generation reuses TGI's models (server/tgi/protocol.py). Feature extraction follows TEI's /embed, which
InferenceClient sends to URL targets: ``inputs`` plus root-level options. Unknown fields are accepted and
logged; the legacy serverless ``options`` ({"wait_for_model", "use_cache"}) is accepted and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidRequest, validation_problem
from server.tasks.catalog import TASKS
from sync.manifest import UNSERVED_TASKS

log = logging.getLogger("hubserve.hub")


class EmbedRequest(BaseModel):
    """Feature extraction: one text or a batch; the answer is one vector per text (always a nested list)."""

    model_config = ConfigDict(extra="allow")

    inputs: str | list[str]
    normalize: bool = Field(True, description="L2-normalize the vectors (TEI's default).")
    prompt_name: str | None = Field(None, description="A prompt of the model's config_sentence_transformers.json.")
    truncate: bool = Field(False, description="Cut inputs longer than the model's context instead of failing.")
    truncation_direction: Literal["left", "right", "Left", "Right"] = "right"
    dimensions: int | None = Field(default=None, gt=0, description="Keep the first N dimensions (Matryoshka models).")
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
        message, param = validation_problem(e)
        raise InvalidRequest(message, param=param) from e
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
        message, param = validation_problem(e)
        raise InvalidRequest(message, param=param) from e


# ---- the other text tasks (answered through server/tasks/answers.py by either backend) ----------------------------

Texts = str | list[str]
GENERATE_KEYS = frozenset(
    {
        "do_sample", "early_stopping", "epsilon_cutoff", "eta_cutoff", "max_length", "max_new_tokens", "min_length",
        "min_new_tokens", "num_beam_groups", "num_beams", "penalty_alpha", "temperature", "top_k", "top_p",
        "typical_p", "use_cache", "repetition_penalty", "no_repeat_ngram_size", "length_penalty", "seed",
    }
)
MAX_NEW_TOKENS = 1024


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextClassificationParameters(_Parameters):
    top_k: int | None = Field(default=None, gt=0)
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None


class TokenClassificationParameters(_Parameters):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] | None = None
    ignore_labels: list[str] | None = None
    stride: int | None = Field(default=None, ge=0)


class FillMaskParameters(_Parameters):
    targets: list[str] | str | None = None
    top_k: int | None = Field(default=None, gt=0, le=1000)


class ZeroShotBase(_Parameters):
    """Zero-shot classification of texts and of images: candidate labels put into a hypothesis template."""

    candidate_labels: list[str] | str = Field(min_length=1)
    hypothesis_template: str | None = None

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None and "{}" not in v:
            raise ValueError("`hypothesis_template` must contain `{}` (where the label goes)")
        return v


class ZeroShotParameters(ZeroShotBase):
    multi_label: bool | None = False


class QuestionAnsweringParameters(_Parameters):
    top_k: int | None = Field(default=None, gt=0, le=100)
    max_answer_len: int | None = Field(default=None, gt=0)
    handle_impossible_answer: bool | None = None
    doc_stride: int | None = Field(default=None, gt=0)
    max_question_len: int | None = Field(default=None, gt=0)
    max_seq_len: int | None = Field(default=None, gt=0)
    align_to_words: bool | None = None


class Seq2SeqParameters(_Parameters):
    """summarization / translation (``generate_parameters``) and text2text-generation (TGI's flat parameters)."""

    clean_up_tokenization_spaces: bool | None = None
    truncation: str | None = None
    generate_parameters: dict[str, Any] | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None
    max_new_tokens: int | None = Field(default=None, gt=0)
    do_sample: bool | None = None
    temperature: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for ``generate``: the flat TGI-style ones, then ``generate_parameters``; only known keys."""
        flat = {k: getattr(self, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                              "repetition_penalty", "seed")}
        merged = {k: v for k, v in {**flat, **(self.generate_parameters or {})}.items() if v is not None}
        unknown = sorted(set(merged) - GENERATE_KEYS)
        if unknown:
            raise ValueError(f"unknown generate parameters: {', '.join(unknown)}")
        if int(merged.get("max_new_tokens", 0)) > MAX_NEW_TOKENS:
            raise ValueError(f"`max_new_tokens` must be <= {MAX_NEW_TOKENS}")
        return merged


class QAInputs(BaseModel):
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)


class _TaskRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    options: dict[str, Any] | None = Field(None, description="Legacy Inference API options; ignored.")


class TextClassificationRequest(_TaskRequest):
    inputs: Texts
    parameters: TextClassificationParameters = Field(default_factory=lambda: TextClassificationParameters())


class TokenClassificationRequest(_TaskRequest):
    inputs: Texts
    parameters: TokenClassificationParameters = Field(default_factory=lambda: TokenClassificationParameters())


class FillMaskRequest(_TaskRequest):
    inputs: Texts
    parameters: FillMaskParameters = Field(default_factory=lambda: FillMaskParameters())


class ZeroShotRequest(_TaskRequest):
    inputs: str
    parameters: ZeroShotParameters


class QuestionAnsweringRequest(_TaskRequest):
    inputs: QAInputs
    parameters: QuestionAnsweringParameters = Field(default_factory=lambda: QuestionAnsweringParameters())


class Seq2SeqRequest(_TaskRequest):
    inputs: Texts
    parameters: Seq2SeqParameters = Field(default_factory=lambda: Seq2SeqParameters())
    stream: bool = False


TASK_REQUESTS: dict[str, type[_TaskRequest]] = {
    "text-classification": TextClassificationRequest,
    "token-classification": TokenClassificationRequest,
    "fill-mask": FillMaskRequest,
    "zero-shot-classification": ZeroShotRequest,
    "question-answering": QuestionAnsweringRequest,
    "summarization": Seq2SeqRequest,
    "translation": Seq2SeqRequest,
    "text2text-generation": Seq2SeqRequest,
}


def refuse_unserved(payload: object) -> None:
    """InferenceClient's tabular_classification / tabular_regression body (``{"table": ...}``, no ``inputs``): a 400
    that says why hubserve serves no tabular task, whatever the model."""
    if isinstance(payload, dict) and "table" in payload and "inputs" not in payload:
        raise InvalidRequest(f"tabular-classification and tabular-regression are not served: "
                             f"{UNSERVED_TASKS['tabular-classification']}.", param="table")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_field(part: object) -> bool:
    """Whether a pydantic error location part names a field or an index (not a union member's type tag)."""
    text = str(part)
    return isinstance(part, int) or (text.isidentifier() and text.lower() not in _TYPE_TAGS)


Request = TypeVar("Request", bound=BaseModel)


def validate_task_request(cls: type[Request], payload: dict[str, Any], expects: str,
                          check: Callable[[Request], object] | None = None) -> Request:
    """``payload`` as ``cls`` (then ``check``, which may raise ValueError): InvalidRequest says what the task
    ``expects`` and where the body went wrong. Unknown fields are accepted and logged (but for the ``flat_keys``
    of its parameters: not fields, used all the same)."""
    try:
        request = cls.model_validate(payload)
        if check is not None:
            check(request)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if _is_field(p))
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"{expects}; got {loc}: {msg}.", param=loc or None) from e
    except ValueError as e:
        raise InvalidRequest(f"{expects}; got {e}.", param="parameters") from e
    parameters = getattr(request, "parameters", None)
    taken: frozenset[str] = getattr(parameters, "flat_keys", frozenset())
    unknown_parameters = ((parameters and parameters.model_extra) or {}).keys() - taken
    extra = sorted((request.model_extra or {}).keys() | unknown_parameters)
    if extra:
        log.info("ignoring unknown fields: %s", ", ".join(extra))
    return request


def parse_task(task: str, payload: object, model: str) -> _TaskRequest:
    """The request for ``model``'s ``task``; InvalidRequest names the model, its task and the input it expects."""
    refuse_unserved(payload)
    expects = f"Model `{model}` serves {task} and expects {TASKS[task].expects}"
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InvalidRequest(f"{expects}.")

    def check(request: _TaskRequest) -> None:
        if isinstance(request, Seq2SeqRequest):
            request.parameters.generate_kwargs()

    return validate_task_request(TASK_REQUESTS[task], payload, expects, check)


# ---- request options both backends check the same way -------------------------------------------------------


def token_classification_options(request: TokenClassificationRequest, model: str, max_len: int
                                 ) -> tuple[str, tuple[str, ...] | None, int]:
    """(aggregation strategy, ignored labels, stride) of a token-classification request, checked as transformers
    checks them; ``max_len`` is the model's context in tokens."""
    params = request.parameters
    ignore = tuple(params.ignore_labels) if params.ignore_labels is not None else None
    strategy = params.aggregation_strategy or "simple"
    stride = params.stride or 0
    if stride and strategy == "none":
        raise InvalidRequest(f"Model `{model}` (token-classification): `stride` needs an aggregation_strategy "
                             "other than none (as in transformers).", param="stride")
    if stride >= max_len // 2:
        raise InvalidRequest(f"Model `{model}` (token-classification): `stride` must be < {max_len // 2} "
                             f"(half its {max_len}-token window).", param="stride")
    return strategy, ignore, stride


def fill_mask_options(request: FillMaskRequest, model: str, mask_token: str | None) -> tuple[int, tuple[str, ...]]:
    """(top_k, targets) of a fill-mask request whose every input holds the model's mask token."""
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    if mask_token is None or any(mask_token not in t for t in texts):
        raise InvalidRequest(f"Model `{model}` (fill-mask) needs its mask token {mask_token} in every input.")
    given = request.parameters.targets
    return request.parameters.top_k or 5, (given,) if isinstance(given, str) else tuple(given or ())
