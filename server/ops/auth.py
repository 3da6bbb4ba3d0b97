"""API-key auth (bearer) for inference routes. Keys live only as sha256 digests; compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.errors import Unauthorized


class KeyChecker:
    """Accepts a request when no keys are configured, or when its bearer key's digest is one of them."""

    def __init__(self, digests: frozenset[str]) -> None:
        self._digests = tuple(sorted(digests))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).hexdigest()
        match = False
        for known in self._digests:  # no early exit: every digest is compared
            match |= hmac.compare_digest(digest, known)
        return match

    def check(self, request: Request) -> None:
        if not self._digests:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip() or not self.accepts(key.strip()):
            raise Unauthorized()


def require_api_key(request: Request) -> None:
    """Router dependency for every inference route (OpenAI, TGI, Hub). List it after the family dependency."""
    checker: KeyChecker = request.app.state.key_checker
    checker.check(request)
