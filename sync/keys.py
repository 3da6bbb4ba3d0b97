"""The keys file's reading core, shared by the gateway (server/ops/keys.py) and the mirror (sync/mirror.py).

A key reads ``hs_<id>_<secret>``: ``id`` (12 hex) is public and finds the record; ``secret`` (256 random bits)
is checked against ``HMAC-SHA256(salt, secret)`` with a per-key random salt. A secret that random needs no
slow KDF (nothing to brute-force), so a check costs microseconds per request, not the tens of ms of scrypt.

It lives in sync/ because sync/ never imports server/ and the mirror accepts named keys with the ``mirror``
scope; writing the file (``hubserve keys``) stays in server/ops/keys.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

from sync.errors import ConfigError

log = logging.getLogger("hubserve.keys")

KEY_RE = re.compile(r"^hs_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SCOPES = ("inference", "batch", "mirror", "admin")
# A key without `scopes` (every key made before scopes existed) may do what keys could do then, inference, plus
# batches (inference, queued). `mirror` (every model's weights) and `admin` are granted only by name: a default
# of every scope would have made each tenant's existing key an admin credential on upgrade.
DEFAULT_SCOPES = ("inference", "batch")
LIMITS = ("rpm", "tpm", "daily_tokens", "monthly_tokens", "max_concurrent", "max_input_tokens")
DURATION_RE = re.compile(r"^(\d{1,6})([dhm])$")


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """One named key as stored: who it is, what it may call, how much, until when; never the key itself."""

    name: str
    id: str
    salt: str  # hex
    hash: str  # hex HMAC-SHA256(salt, secret)
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (in + out) per minute
    created: str = ""
    daily_tokens: int | None = None  # tokens (in + out) per UTC day
    monthly_tokens: int | None = None  # tokens (in + out) per UTC calendar month
    max_concurrent: int | None = None  # requests in flight at once, over every gateway sharing the state
    max_input_tokens: int | None = None  # input (prompt) tokens of one request
    expires: str | None = None  # ISO-8601 UTC; refused from then on
    scopes: tuple[str, ...] = DEFAULT_SCOPES

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(mac(self.salt, secret), self.hash)

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires is not None and (now or dt.datetime.now(dt.UTC)) >= parse_time(self.expires)

    def to_toml(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.models is not None:
            out["models"] = list(self.models)
        out["scopes"] = list(self.scopes)
        return out


def mac(salt_hex: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt_hex), secret.encode(), hashlib.sha256).hexdigest()


DUMMY = KeyRecord(name="", id="0" * 12, salt="00" * 16, hash="0" * 64)


def parse_time(text: str) -> dt.datetime:
    """An ISO-8601 time as aware UTC; a time without an offset is UTC."""
    value = dt.datetime.fromisoformat(text)
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def parse_expires(text: str, now: dt.datetime | None = None) -> str:
    """``30d`` / ``12h`` / ``90m`` from now, or an ISO date (midnight UTC) or time, as ISO-8601 UTC seconds."""
    now = now or dt.datetime.now(dt.UTC)
    m = DURATION_RE.match(text.strip())
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        when = now + dt.timedelta(**{unit: int(m.group(1))})
    else:
        try:
            when = parse_time(text.strip())
        except ValueError:
            raise ConfigError(f"--expires {text!r}: use 30d, 12h, 90m or an ISO date/time (2027-01-31)") from None
    return when.replace(microsecond=0).isoformat()


def parse_scopes(text: str) -> tuple[str, ...]:
    """``inference,batch`` → a tuple in canonical order; ConfigError naming an unknown scope."""
    given = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in given if s not in SCOPES]
    if unknown or not given:
        raise ConfigError(f"--scopes {text!r}: use a comma-separated list of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in given)


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
            record = _record(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: [[keys]] entry {n} is malformed ({type(e).__name__}: {e})") from None
        records[record.id] = record
    return records


def _record(entry: dict[str, Any]) -> KeyRecord:
    models, scopes, expires = entry.get("models"), entry.get("scopes"), entry.get("expires")
    if scopes is not None and (not isinstance(scopes, list) or any(s not in SCOPES for s in scopes)):
        raise ValueError(f"scopes must be a list of {', '.join(SCOPES)}, got {scopes!r}")
    record = KeyRecord(
        name=str(entry["name"]), id=str(entry["id"]), salt=str(entry["salt"]), hash=str(entry["hash"]),
        models=tuple(str(m) for m in models) if models is not None else None,
        created=str(entry.get("created", "")),
        expires=parse_time(str(expires)).isoformat() if expires is not None else None,
        scopes=tuple(s for s in SCOPES if s in scopes) if scopes is not None else DEFAULT_SCOPES,
        **{k: _positive(entry.get(k)) for k in LIMITS},
    )
    bytes.fromhex(record.salt)
    return record


def _positive(v: object) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
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


class KeyRing:
    """The keys file as a server sees it: re-read when its stat changes; a bad edit keeps the last good set.

    Once the file has existed, auth stays on even if it disappears or empties (then no named key passes):
    deleting the file must not open the server.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._records: dict[str, KeyRecord] = {}
        self.seen = False  # the file existed at some point: named-key auth is on
        self.refresh()

    @property
    def records(self) -> dict[str, KeyRecord]:
        return self._records

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
        ok = (record or DUMMY).matches(m.group(2) if m else "")
        return record if record is not None and ok else None

    def any_with_scope(self, scope: str) -> bool:
        """Whether some unexpired key has ``scope`` (after a refresh)."""
        self.refresh()
        return any(scope in r.scopes and not r.expired() for r in self._records.values())
