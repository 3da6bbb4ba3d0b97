"""Idempotency-Key: the header's rule, the body's fingerprint and the record's scope. Pure functions.

A record is scoped to (who sent it, the route, the key): a named key by its name, a flat key by the sha256 of the
key itself (its log name holds only 8 hex digits of it), so no other key can read it or collide with it.
"""

from __future__ import annotations

import hashlib
import json
import re

from server.errors import InvalidIdempotencyKey

IDEMPOTENCY_KEY_RE = re.compile(r"^[ -~]{1,255}\Z")  # printable ASCII, as Stripe's up-to-255-character keys
BOUNDARY_RE = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
BIG_BODY = 256 * 1024  # normalizing a larger body runs in a thread, off the event loop


def check_key(value: str | None) -> str | None:
    """The header's value, or None when absent; InvalidIdempotencyKey (400) when it breaks the rule."""
    if value is None:
        return None
    if not IDEMPOTENCY_KEY_RE.match(value):
        raise InvalidIdempotencyKey()
    return value


def normalize_body(body: bytes, content_type: str) -> tuple[bytes, object]:
    """(canonical bytes, parsed JSON or None): a JSON body with sorted keys and no spaces, so that two clients
    serializing the same request differently agree; a multipart body with its random boundary replaced (a client
    retrying an upload builds a new one); any other body as is."""
    if "json" in content_type.lower() or body[:1] in (b"{", b"["):
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return body, None
        try:
            return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(), payload
        except (ValueError, RecursionError):
            return body, None
    match = BOUNDARY_RE.search(content_type)
    if content_type.lower().startswith("multipart/") and match:
        return body.replace(match.group(1).encode("latin-1"), b"<boundary>"), None
    return body, None


def digest_body(body: bytes, content_type: str) -> tuple[str, object]:
    """(sha256 of the normalized body, parsed JSON or None): what a request is compared and keyed by."""
    canonical, payload = normalize_body(body, content_type)
    return hashlib.sha256(canonical).hexdigest(), payload


def fingerprint(model: str, body_digest: str) -> str:
    """An Idempotency-Key's request: its body and the model it resolved to."""
    return hashlib.sha256(f"{model}\0{body_digest}".encode()).hexdigest()


def identity(principal_name: str, presented_key: str | None) -> str:
    """Who owns a record: the named key's name, or (a flat key, logged as ``key-`` + 8 hex of its digest) the
    key's whole digest. With auth off every client is the one anonymous principal."""
    if presented_key is not None:
        digest = hashlib.sha256(presented_key.encode()).hexdigest()
        if principal_name == f"key-{digest[:8]}":
            return f"flat:{digest}"
    return f"named:{principal_name}"


def record_key(owner: str, route: str, key: str) -> str:
    parts = json.dumps([owner, route, key]).encode()
    return f"idem:{hashlib.sha256(parts).hexdigest()}"
