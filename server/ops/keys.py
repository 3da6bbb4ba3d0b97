"""Named API keys: the keys file (TOML beside models.toml), key creation, and cheap constant-time checks.

A key reads ``hs_<id>_<secret>``: ``id`` (12 hex) is public and finds the record; ``secret`` (256 random bits)
is checked against ``HMAC-SHA256(salt, secret)`` with a per-key random salt. A secret that random needs no
slow KDF (nothing to brute-force), so a check costs microseconds per request, not the tens of ms of scrypt.
The file stores only id, salt and hash; the key is printed once, at creation.

``KeyRing`` re-reads the file when it changes (a ``stat`` per check), so added and revoked keys take effect
on the next request without a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from sync.diskio import atomic_write
from sync.errors import ConfigError, HubserveError
from sync.filelock import exclusive

log = logging.getLogger("hubserve.keys")

KEY_RE = re.compile(r"^hs_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEADER = "# hubserve API keys (`hubserve keys add|list|revoke`): salted HMAC-SHA256 only, never the keys.\n"


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """One named key as stored: who it is, what it may call, how fast; never the key itself."""

    name: str
    id: str
    salt: str  # hex
    hash: str  # hex HMAC-SHA256(salt, secret)
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (in + out) per minute
    created: str = ""

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_mac(self.salt, secret), self.hash)

    def to_toml(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.models is not None:
            out["models"] = list(self.models)
        return out


def _mac(salt_hex: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt_hex), secret.encode(), hashlib.sha256).hexdigest()


_DUMMY = KeyRecord(name="", id="0" * 12, salt="00" * 16, hash="0" * 64)


def new_key(
    name: str, models: tuple[str, ...] | None = None, rpm: int | None = None, tpm: int | None = None
) -> tuple[str, KeyRecord]:
    """A fresh key and the record that verifies it."""
    if not NAME_RE.match(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    record = KeyRecord(name, key_id, salt, _mac(salt, secret), models, rpm, tpm, created)
    return f"hs_{key_id}_{secret}", record


def parse_keys_file(text: str, where: str) -> dict[str, KeyRecord]:
    """id → record. ConfigError names the file and the entry when something is malformed."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid TOML (nested too deeply)") from None
    entries = data.get("keys") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: `keys` must be an array of [[keys]] tables")
    records: dict[str, KeyRecord] = {}
    for n, entry in enumerate(entries, 1):
        try:
            models = entry.get("models")
            record = KeyRecord(
                name=str(entry["name"]), id=str(entry["id"]), salt=str(entry["salt"]), hash=str(entry["hash"]),
                models=tuple(str(m) for m in models) if models is not None else None,
                rpm=_positive(entry.get("rpm")), tpm=_positive(entry.get("tpm")), created=str(entry.get("created", "")),
            )
            bytes.fromhex(record.salt)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: [[keys]] entry {n} is malformed ({type(e).__name__}: {e})") from None
        records[record.id] = record
    return records


def _positive(v: object) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def read_keys(path: Path) -> dict[str, KeyRecord]:
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_keys_file(text, str(path))


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


class KeyRing:
    """The keys file as the server sees it: re-read when its stat changes; a bad edit keeps the last good set.

    Once the file has existed, auth stays on even if it disappears or empties (then no named key passes):
    deleting the file must not open the server.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._records: dict[str, KeyRecord] = {}
        self.seen = False  # the file existed at some point: named-key auth is on
        self.refresh()

    def refresh(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            if self._stamp is not None:
                log.warning("keys file %s is gone: no named key is accepted until it is back", self.path)
                self._stamp, self._records = None, {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            records = read_keys(self.path)
        except (ConfigError, OSError) as e:
            log.error("keys file %s not reloaded, the previous keys stay in force: %s", self.path, e)
            self._stamp = stamp
            return
        self._stamp, self._records, self.seen = stamp, records, True
        log.info("keys file %s: %d key(s) loaded", self.path, len(records))

    def find(self, key: str) -> KeyRecord | None:
        """The record of a well-formed, unrevoked key, after a refresh."""
        self.refresh()
        return self.lookup(key)

    def lookup(self, key: str) -> KeyRecord | None:
        """``find`` without the refresh; one HMAC per call whatever the outcome."""
        m = KEY_RE.match(key)
        record = self._records.get(m.group(1)) if m else None
        ok = (record or _DUMMY).matches(m.group(2) if m else "")
        return record if record is not None and ok else None
