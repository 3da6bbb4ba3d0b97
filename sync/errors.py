"""One exception hierarchy for everything sync does.

Each error carries an ``exit_code`` for the CLI (1 failure, 2 bad config or usage) and a
``http_status``/``error_code`` pair that the mirror (and the server) use to answer over HTTP.
"""

from __future__ import annotations

import errno


class HubserveError(Exception):
    """Base of every error hubserve raises on purpose; its message is one actionable line."""

    exit_code: int = 1
    http_status: int = 500
    error_code: str | None = None


class ConfigError(HubserveError):
    """models.toml, models.lock or a command-line value is invalid."""

    exit_code = 2
    http_status = 400


class UnsafePathError(HubserveError):
    """A file path from an upstream or a bundle would escape the repository directory."""

    http_status = 400


class PickleRefusedError(HubserveError):
    """A pickle weight file was requested for a model that did not opt in."""


class VerificationError(HubserveError):
    """A file's bytes do not match the hash the upstream declared."""

    def __init__(self, repo_id: str, path: str, algo: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{repo_id}: {path} failed verification: expected {algo} {expected}, got {actual}; "
            "the revision was not promoted"
        )
        self.repo_id, self.path, self.algo, self.expected, self.actual = repo_id, path, algo, expected, actual


class UpstreamError(HubserveError):
    """The upstream answered with an error that retrying will not fix."""


class RepoNotFound(UpstreamError):
    http_status = 404
    error_code = "RepoNotFound"


class RevisionNotFound(UpstreamError):
    http_status = 404
    error_code = "RevisionNotFound"


class EntryNotFound(UpstreamError):
    http_status = 404
    error_code = "EntryNotFound"


class AuthError(UpstreamError):
    """401/403: a missing or wrong token, or a gated repository."""

    http_status = 401


class TransientUpstreamError(UpstreamError):
    """5xx, 429, a reset or a truncated body: worth retrying with backoff."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(HubserveError):
    """The store on disk is not in the state an operation needs."""


class DiskFullError(StoreError):
    """The store's filesystem is full (ENOSPC/EDQUOT): not transient, never retried; temp files are removed."""


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(e: OSError, where: object) -> DiskFullError | None:
    """The DiskFullError for ``e`` when it is a full disk or quota, else None (re-raise ``e``)."""
    if e.errno not in NO_SPACE_ERRNOS:
        return None
    return DiskFullError(f"no space left on the device holding {where} ({e.strerror}); free space and run again")
