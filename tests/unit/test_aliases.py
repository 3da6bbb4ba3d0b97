"""Aliases: models.toml's [[aliases]] validation (errors naming the alias and the field), the pure rules of the
fallback middleware (why an attempt counts as not answered, which paths name an alias) and the README's snippet."""

from __future__ import annotations

import re

import pytest

from server.errors import (
    EngineUnavailable,
    GenerationError,
    InvalidRequest,
    ModelLoading,
    Overloaded,
    RateLimited,
)
from server.ops.fallback import fallback_reason, path_alias
from sync.errors import ConfigError
from sync.manifest import FALLBACK_REASONS, parse_manifest
from tests.fixtures.readme import blocks
from tests.fixtures.sse_engine import CONTEXT_LENGTH_MESSAGE

pytestmark = pytest.mark.unit

MODELS = """
[[models]]
name = "big"
repo = "org/big"
[[models]]
name = "small"
repo = "org/small"
[[models.adapters]]
name = "small-poet"
repo = "org/small-poet"
"""


def _aliases(text: str) -> list[tuple[str, list[str], list[str]]]:
    return [(a.name, a.models, a.fallback_on) for a in parse_manifest(MODELS + text).aliases]


def test_an_alias_parses_with_all_four_reasons_by_default() -> None:
    assert _aliases('[[aliases]]\nname = "chat"\nmodels = ["big", "small-poet"]\n') == [
        ("chat", ["big", "small-poet"], list(FALLBACK_REASONS))]
    assert _aliases('[[aliases]]\nname = "chat"\nmodels = ["big"]\nfallback_on = ["loading"]\n') == [
        ("chat", ["big"], ["loading"])]
    assert parse_manifest(MODELS).aliases == []


@pytest.mark.parametrize(("alias", "error"), [
    ('name = "chat"\nmodels = ["big", "bigg"]',
     "models.toml: aliases[0] (chat).models: 'bigg' is not a model of this manifest; known: big, small, small-poet"),
    ('name = "small"\nmodels = ["big"]', "aliases[0] (small).name: 'small' is already a model's name or repo id"),
    ('name = "org/small-poet"\nmodels = ["big"]', "aliases[0] (org/small-poet).name: 'org/small-poet' is already"),
    ('name = "chat"\nmodels = ["big"]\nfallback_on = ["failed", "slow"]',
     "aliases[0] (chat).fallback_on: 'slow' is not a fallback reason; accepted: failed, overloaded, loading, "
     "context_length"),
    ('name = "chat"\nmodels = []', "aliases[0] (chat).models: List should have at least 1 item"),
    ('name = "chat"\nmodels = ["big", "big"]', "aliases[0] (chat).models: a model is listed twice: big"),
    ('name = "chat"\nmodel = ["big"]', "aliases[0] (chat).model: unknown key 'model'"),
    ('name = "c h"\nmodels = ["big"]', "aliases[0] (c h).name: 'c h' is not a valid served name"),
])
def test_a_bad_alias_is_an_error_naming_it_and_the_field(alias: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_manifest(MODELS + "[[aliases]]\n" + alias + "\n")


def test_two_aliases_with_one_name_are_an_error() -> None:
    text = '[[aliases]]\nname = "chat"\nmodels = ["big"]\n[[aliases]]\nname = "chat"\nmodels = ["small"]\n'
    with pytest.raises(ConfigError, match=re.escape("aliases[1] (chat).name: another alias has the name 'chat'")):
        parse_manifest(MODELS + text)


@pytest.mark.parametrize(("refusal", "status", "body", "reason"), [
    (Overloaded("queue full"), 429, b"", "overloaded"),
    (Overloaded("queue full"), 529, b"", "overloaded"),  # Anthropic's status for it
    (RateLimited("key over its rpm"), 429, b"", None),  # a key's own limit: no other model helps
    (None, 429, b"", None),  # a 429 nobody noted (a key's budget, a limit of the engine's own)
    (ModelLoading("lazy", 20), 503, b"", "loading"),
    (EngineUnavailable("down"), 503, b"", "failed"),
    (None, 503, b"", "failed"),  # the connection to the engine broke
    (None, 500, b'{"error": {"message": "CUDA error"}}', "failed"),
    (GenerationError("engine failed"), 424, b"", None),  # TGI's generation error is a 4xx the client reads
    (None, 400, b'{"error": {"message": "' + CONTEXT_LENGTH_MESSAGE.encode() + b'"}}', "context_length"),
    (None, 400, b"Input length (40) exceeds model's maximum context length (16).", "context_length"),
    (None, 422, b'{"error": "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 40", "error_type": "x"}',
     "context_length"),
    (InvalidRequest("bad"), 400, b'{"error": {"message": "temperature must be > 0"}}', None),
    (None, 404, b"", None),
    (Overloaded("queue full"), 200, b"", None),  # it answered after all
])
def test_why_an_attempt_did_not_answer(refusal: object, status: int, body: bytes, reason: str | None) -> None:
    assert fallback_reason(refusal, status, body) == reason  # type: ignore[arg-type]


@pytest.mark.parametrize(("path", "found"), [
    ("/models/chat", ("chat", "")),
    ("/models/chat/v1", ("chat", "/v1")),
    ("/models/chat/v1/chat/completions", ("chat", "/v1/chat/completions")),
    ("/models/chat/pipeline/feature-extraction", ("chat", "/pipeline/feature-extraction")),
    ("/models/chat/info", ("chat", "/info")),
    ("/models/team/chat", ("team/chat", "")),
    ("/models/chatty", None),  # another name that starts like it
    ("/models/chat/other", None),  # a repo id "chat/other", not the alias
    ("/v1/models/chat", None),  # models.retrieve: answered by the route itself
    ("/models/big", None),
])
def test_which_paths_name_an_alias(path: str, found: tuple[str, str] | None) -> None:
    assert path_alias(path, ["chat", "team/chat"]) == found


def test_the_readme_snippet_parses() -> None:
    section = next(b for b in blocks() if b.lang == "toml" and "[[aliases]]" in b.code)
    manifest = parse_manifest(section.code, "README.md")
    assert [(a.name, a.models, a.fallback_on) for a in manifest.aliases] == [
        ("chat", ["big", "small"], list(FALLBACK_REASONS))]
