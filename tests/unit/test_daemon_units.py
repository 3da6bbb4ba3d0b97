"""The daemon's pure parts: webhook secret, payload parsing and matching, backoff, --listen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sync.daemon import backoff_delay
from sync.daemon_http import parse_listen
from sync.errors import ConfigError
from sync.manifest import ModelSpec
from sync.webhooks import PayloadError, check_secret, matching_models, parse_event, ref_to_revision

pytestmark = pytest.mark.unit


def payload(repo: str = "org/model", refs: tuple[str, ...] = ("refs/heads/main",), **extra: object) -> bytes:
    data = {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "model", "name": repo, "headSha": "a" * 40},
        "updatedRefs": [{"ref": r, "oldSha": "b" * 40, "newSha": "c" * 40} for r in refs],
        "webhook": {"id": "1", "version": 3},
        **extra,
    }
    return json.dumps(data).encode()


MODELS = [
    ModelSpec(name="main", repo="org/model", revision="main", follow=True),
    ModelSpec(name="tagged", repo="org/model", revision="v1", follow=True),
    ModelSpec(name="still", repo="org/model", revision="main"),  # not following: never moved by a webhook
    ModelSpec(name="other", repo="org/other", revision="main", follow=True),
]


def test_secret_missing_wrong_right() -> None:
    assert check_secret(None, "s") == 401
    assert check_secret("", "s") == 401
    assert check_secret("s", None) == 401  # no secret configured: refuse everything
    assert check_secret("S", "s") == 403
    assert check_secret("s" * 2, "s") == 403
    assert check_secret("s", "s") is None


def test_refs_map_to_revisions() -> None:
    assert ref_to_revision("refs/heads/main") == "main"
    assert ref_to_revision("refs/tags/v1") == "v1"
    assert ref_to_revision("refs/heads/feature/x") == "feature/x"
    assert ref_to_revision("refs/pr/3") == "refs/pr/3"


def test_matching_follows_repo_and_ref() -> None:
    assert matching_models(parse_event(payload()), MODELS) == {"main"}
    assert matching_models(parse_event(payload(refs=("refs/tags/v1",))), MODELS) == {"tagged"}
    assert matching_models(parse_event(payload(refs=("refs/heads/dev",))), MODELS) == set()
    assert matching_models(parse_event(payload(refs=())), MODELS) == {"main", "tagged"}  # headSha alone
    assert matching_models(parse_event(payload(repo="someone/else")), MODELS) == set()
    discussion = json.loads(payload())
    discussion["event"]["scope"] = "discussion"
    assert matching_models(parse_event(json.dumps(discussion).encode()), MODELS) == set()


@pytest.mark.parametrize(
    "body", [b"{nope", b"[1, 2]", b'"text"', b'{"event": {}}', b'{"event": {}, "repo": {"name": 3}}', b"\xff\xfe"]
)
def test_bad_payloads_are_refused(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_event(body)


def test_odd_updated_refs_are_skipped() -> None:
    data = json.loads(payload())
    data["updatedRefs"] = ["refs/heads/main", {"ref": 5}, {"ref": "refs/heads/main"}]
    assert parse_event(json.dumps(data).encode()).refs == ("main",)


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    low = [backoff_delay(n, cap=60, rng=lambda: 0.0) for n in range(1, 9)]
    high = [backoff_delay(n, cap=60, rng=lambda: 1.0) for n in range(1, 9)]
    assert low == [1, 2, 4, 8, 16, 30, 30, 30]
    assert high == [2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff_delay(100, cap=5) <= 5


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8091") == ("127.0.0.1", 8091)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8091", "host:", ":80", "host:port"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def test_a_models_toml_just_written_or_emptied_is_not_read_yet(tmp_path: Path) -> None:
    """What the server's and the daemon's reloads wait for: a file changed under SETTLE_S ago may be half-written;
    a 0-byte one while models are configured is being written."""
    import os

    from sync.manifest import SETTLE_S, emptied, unsettled_s

    path = tmp_path / "models.toml"
    path.write_text("")
    mtime = path.stat().st_mtime
    assert 0 < unsettled_s(path, now=mtime + 0.05) <= SETTLE_S
    assert unsettled_s(path, now=mtime + SETTLE_S) == 0.0
    assert unsettled_s(path, now=mtime - 5) == 0.0  # an mtime in the future (a skewed clock): not waited for
    assert unsettled_s(tmp_path / "missing.toml") == 0.0
    error = emptied(path, serving=True)
    assert error is not None and "leave a comment" in str(error)
    assert emptied(path, serving=False) is None  # nothing served: an empty manifest is just that
    path.write_text("# no models for now\n")
    os.utime(path, (mtime - 10, mtime - 10))
    assert emptied(path, serving=True) is None and unsettled_s(path) == 0.0
