"""Hub webhooks, as pure functions: check the secret, parse the payload, pick the models it concerns.

The Hub POSTs ``{event: {action, scope}, repo: {type, name, headSha}, updatedRefs?: [{ref, oldSha,
newSha}]}`` with the secret as is in ``X-Webhook-Secret`` (no HMAC; see ARCHITECTURE.md "Hub webhooks").
huggingface_hub's own payload model lacks ``headSha``, so the few fields used are read here. The shas
are never trusted: a matching model is re-resolved through the upstream like any other sync.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sync.errors import HubserveError
from sync.manifest import ModelSpec
from sync.paths import check_ref, has_control

SECRET_HEADER = "X-Webhook-Secret"
CONTENT_SCOPE = "repo.content"
REF_PREFIXES = ("refs/heads/", "refs/tags/")


class PayloadError(ValueError):
    """The body is not a Hub webhook payload (answered 400)."""


@dataclass(frozen=True)
class HubEvent:
    scope: str
    repo: str
    repo_type: str
    refs: tuple[str, ...]  # revision names that moved: "main", "v1" (from updatedRefs)
    head_moved: bool  # repo.headSha present: the default branch may have moved


def check_secret(sent: str | None, expected: str | None) -> int | None:
    """The HTTP status refusing the request (401 missing, 403 wrong), or None when the secret matches.

    With no secret configured every request is refused (401): an open webhook would let anyone make the
    daemon hit the upstream at will.
    """
    if not sent or not expected:
        return 401
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        return 403
    return None


def parse_event(body: bytes) -> HubEvent:
    """The fields of a Hub webhook payload the daemon uses; PayloadError if it is not one.

    The repo name and refs come from the network: they are checked here like any name that may reach the
    store or a log (a control character in either is refused with a 400). A name that is no ``org/name``
    repo id cannot be in models.toml, so it simply matches no model.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(f"body is not JSON ({e})") from e
    except ValueError:  # a number past int()'s digit limit
        raise PayloadError("body holds a number too long to read") from None
    except RecursionError:
        raise PayloadError("body is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise PayloadError("body is not a JSON object")
    event, repo = data.get("event"), data.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict) or not isinstance(repo.get("name"), str):
        raise PayloadError("missing event or repo.name")
    updated = data.get("updatedRefs") or []
    if not isinstance(updated, list):
        raise PayloadError("updatedRefs is not a list")
    refs: list[str] = []
    if has_control(repo["name"]) or len(repo["name"]) > 255:
        raise PayloadError(f"repo.name {repo['name'][:255]!r}: a control character, or over 255 characters")
    try:
        for item in updated:
            ref = item.get("ref") if isinstance(item, dict) else None
            if isinstance(ref, str):
                refs.append(check_ref(ref_to_revision(ref)))
    except HubserveError as e:
        raise PayloadError(str(e)) from None
    return HubEvent(
        scope=event["scope"] if isinstance(event.get("scope"), str) else "",
        repo=repo["name"],
        repo_type=repo["type"] if isinstance(repo.get("type"), str) else "model",
        refs=tuple(refs),
        head_moved=isinstance(repo.get("headSha"), str),
    )


def ref_to_revision(ref: str) -> str:
    """``refs/heads/main`` -> ``main``, ``refs/tags/v1`` -> ``v1``; anything else as is."""
    for prefix in REF_PREFIXES:
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def matching_models(event: HubEvent, models: Iterable[ModelSpec]) -> set[str]:
    """The following models (``follow = true``) of the event's repo whose branch or tag it moved.

    With updatedRefs, only those revisions match; without them, ``headSha`` alone matches every
    following model of the repo (it is re-resolved, so an unmoved ref is a cheap no-op).
    """
    if event.scope != CONTENT_SCOPE or event.repo_type != "model":
        return set()
    mine = [m for m in models if m.follow and m.repo == event.repo]
    if event.refs:
        return {m.name for m in mine if m.revision in event.refs}
    return {m.name for m in mine} if event.head_moved else set()


def known_repo(event: HubEvent, models: Iterable[ModelSpec]) -> bool:
    return any(m.repo == event.repo for m in models)
