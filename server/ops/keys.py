"""Named API keys: the keys file (TOML beside models.toml), key creation, and its locked read-modify-write.

Reading the file and checking a key (``KeyRecord``, ``KeyRing``, the HMAC) is sync/keys.py's: the mirror reads
the same file and sync/ never imports server/. The file stores only id, salt and hash; the key is printed once,
at creation. ``KeyRing`` re-reads the file when it changes (a ``stat`` per check), so added, updated and revoked
keys take effect on the next request without a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from sync.diskio import atomic_write
from sync.errors import ConfigError, HubserveError
from sync.filelock import exclusive
from sync.keys import (
    DEFAULT_SCOPES,
    KEY_RE,
    LIMITS,
    NAME_RE,
    SCOPES,
    KeyRecord,
    KeyRing,
    mac,
    parse_expires,
    parse_keys_file,
    parse_scopes,
    read_keys,
)

__all__ = ["DEFAULT_SCOPES", "KEY_RE", "LIMITS", "NAME_RE", "SCOPES", "KeyRecord", "KeyRing", "KeysFileError",
           "new_key", "parse_expires", "parse_keys_file", "parse_scopes", "read_keys", "update_keys", "write_keys"]

HEADER = "# hubserve API keys (`hubserve keys add|update|list|revoke`): salted HMAC-SHA256 only, never the keys.\n"


def new_key(
    name: str, models: tuple[str, ...] | None = None, rpm: int | None = None, tpm: int | None = None, **limits: Any
) -> tuple[str, KeyRecord]:
    """A fresh key and the record that verifies it. ``limits``: the other KeyRecord fields (daily_tokens, ...,
    expires, scopes)."""
    if not NAME_RE.match(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    record = KeyRecord(name, key_id, salt, mac(salt, secret), models, rpm, tpm, created, **limits)
    return f"hs_{key_id}_{secret}", record


def with_changes(record: KeyRecord, **changes: Any) -> KeyRecord:
    """``record`` with some fields replaced (``keys update``); the key itself stays valid."""
    return dataclasses.replace(record, **changes)


def write_keys(path: Path, records: dict[str, KeyRecord]) -> None:
    """Atomic write (temp file, fsync, rename, directory fsync), readable by the owner only: a running server
    never sees half, and a crash after the rename keeps it. Concurrent writers go through ``update_keys``."""
    body = HEADER + tomli_w.dumps({"keys": [r.to_toml() for r in records.values()]})
    atomic_write(path, body.encode(), mode=0o600)


class KeysFileError(HubserveError):
    """The keys file could not be read or written (permissions, a full disk)."""


def update_keys(
    path: Path, change: Callable[[dict[str, KeyRecord]], dict[str, KeyRecord]], timeout: float = 60.0
) -> dict[str, KeyRecord]:
    """Read, ``change`` and write back the keys file under its exclusive lock, so concurrent ``hubserve keys``
    commands never lose each other's changes. ``change`` may raise (nothing is written then). Temp files of
    writers killed mid-write are removed here: under the lock, no live writer owns one."""
    with exclusive(path, timeout):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            records = change(read_keys(path))
            write_keys(path, records)
        except OSError as e:
            raise KeysFileError(f"{path}: cannot update it ({e.strerror or e})") from None
    return records
