"""Which requests the response cache may answer, and the key of their answer. Pure functions.

A request is cacheable when its answer is a function of what the key holds: the model revision that answers
(its commit, and the base model's commit for a LoRA adapter), the route, the normalized body and the settings that
change the body sent to the engine. Generation is cacheable only when it does not sample (temperature 0, TGI's
greedy default) or samples from a fixed seed, with one choice; embeddings, rerank, score and the non-generative
Hub tasks always are. The Responses API is never cached: each answer is a stored object with its own id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from server.tasks.catalog import TASKS

MODEL_PREFIX = "/models/{repo_id:path}"  # the path routes: /models/{repo_id}/v1/... answer as /v1/...
OPENAI_GENERATION = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages"})
ALWAYS = frozenset({"/v1/embeddings", "/v1/rerank", "/rerank", "/v1/score", "/score"})
TGI_GENERATION = frozenset({"/generate", "/generate_stream"})
HUB_ROUTES = frozenset({"/", "/v1", MODEL_PREFIX, f"{MODEL_PREFIX}/v1", f"{MODEL_PREFIX}/pipeline/{{task}}"})
# Tasks whose answer is a function of the input (no sampling at all): classification and embeddings, and the
# media tasks that classify or locate; the others generate (text, images, audio) and need a seed or greedy decoding.
NON_GENERATIVE_MEDIA = frozenset({"image-classification", "zero-shot-image-classification", "object-detection",
                                  "image-segmentation", "audio-classification"})
TGI_TASKS = frozenset({"text-generation"})  # Hub routes of these tasks speak TGI's parameters (greedy by default)


def route_kind(path_format: str) -> str:
    """"openai" (chat, completions, messages), "always", "tgi", "hub" or "never", from the route's template."""
    if path_format.startswith(f"{MODEL_PREFIX}/v1/"):
        path_format = path_format[len(MODEL_PREFIX):]
    if path_format in OPENAI_GENERATION:
        return "openai"
    if path_format in ALWAYS:
        return "always"
    if path_format in TGI_GENERATION:
        return "tgi"
    if path_format in HUB_ROUTES:
        return "hub"
    return "never"


def cacheable(path_format: str, task: str, payload: object) -> bool:
    """Whether a request to the route ``path_format`` of a model serving ``task``, with the JSON body ``payload``
    (None: not JSON), has one answer that may be served again."""
    kind = route_kind(path_format)
    if kind == "always":
        return True
    body = payload if isinstance(payload, dict) else {}
    if kind == "openai":
        return payload is not None and _openai_deterministic(body)
    if kind == "tgi":
        return payload is not None and _tgi_deterministic(_params(body))
    if kind == "hub":
        spec = TASKS.get(task)
        if spec is not None and (spec.kind in ("embedding", "classification") or task in NON_GENERATIVE_MEDIA):
            return True
        if task in TGI_TASKS:
            return payload is not None and _tgi_deterministic(_params(body))
        return payload is not None and _seeded_or_greedy(_params(body))
    return False


def _params(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters")
    return params if isinstance(params, dict) else {}


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _seed(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _openai_deterministic(body: dict[str, Any]) -> bool:
    """OpenAI chat/completions and Anthropic messages: one choice, and temperature 0 or a seed. An absent
    temperature samples (vLLM's default is the model's generation config, else 1.0; Anthropic's is 1.0)."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    temperature = body.get("temperature")
    return (_number(temperature) and temperature == 0) or _seed(body.get("seed"))


def _tgi_deterministic(params: dict[str, Any]) -> bool:
    """TGI's parameters: greedy unless sampling is asked for (server/tgi/protocol.py ``sampling``), or seeded."""
    if params.get("best_of") not in (None, 1):
        return False
    if _seed(params.get("seed")):
        return True
    temperature, top_k = params.get("temperature"), params.get("top_k")
    sampling = (
        bool(params.get("do_sample"))
        or (temperature is not None and temperature != 1.0)
        or (top_k is not None and top_k != 0)
        or any(_number(params.get(k)) and params[k] < 1.0 for k in ("top_p", "typical_p"))
    )
    return not sampling


def _seeded_or_greedy(params: dict[str, Any]) -> bool:
    """Generative Hub tasks on the transformers worker (summarization, images, speech): their defaults come from the
    model's generation config, which may sample; cacheable with a seed or an explicit ``do_sample: false``."""
    inner = params.get("generate_parameters")
    inner = inner if isinstance(inner, dict) else {}
    return any(_seed(p.get("seed")) or p.get("do_sample") is False for p in (params, inner))


def cache_key(model: str, commit: str, base_commit: str | None, route: str, accept: str, body_digest: str,
              max_new_tokens: int | None) -> str:
    """The cache key of one answer: what decides it, hashed. ``body_digest``: sha256 of the canonical body."""
    parts = json.dumps([model, commit, base_commit, route, accept, body_digest, max_new_tokens]).encode()
    return f"cache:{hashlib.sha256(parts).hexdigest()}"
