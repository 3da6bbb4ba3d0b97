"""Issue 16, names and protocol values: control characters never pass the store's edge, headers and
progress lines are built from escaped text, huge numbers and deep JSON are 4xx, the daemon's access rules."""

from __future__ import annotations

import json
from urllib.parse import unquote

import pytest

from sync.bundle import BundleManifest
from sync.bundle_parts import BundleError
from sync.daemon_http import DaemonAccess
from sync.errors import ConfigError, HubserveError, UnsafePathError
from sync.httpbounds import Limits
from sync.hub_protocol import HttpError, check_host, header_safe, parse_paths_body, parse_range
from sync.mirror import file_headers
from sync.paths import check_ref, check_repo_id, is_commit, printable, safe_relpath
from sync.progress import DownloadProgress
from sync.store import FileEntry, RevisionRecord
from sync.webhooks import PayloadError, parse_event

CONTROL = [chr(c) for c in (*range(0x20), 0x7F)]
COMMIT = "a" * 40
SHA = "b" * 64


@pytest.mark.parametrize("char", CONTROL, ids=[f"0x{ord(c):02x}" for c in CONTROL])
def test_every_control_character_is_refused_in_paths_and_refs(char: str) -> None:
    for bad in (f"a{char}b.txt", f"dir/{char}", f"x.json{char}"):
        with pytest.raises(UnsafePathError):
            safe_relpath(bad)
        with pytest.raises(UnsafePathError):
            FileEntry(bad, 1, sha256=SHA)  # the record itself: what every upstream tree and bundle goes through
        with pytest.raises(UnsafePathError):
            check_ref(bad)


def test_trailing_newline_no_longer_slips_past_the_anchors() -> None:
    with pytest.raises(ConfigError):
        check_repo_id("org/name\n")
    assert not is_commit(COMMIT + "\n")
    assert is_commit(COMMIT) and check_repo_id("org/name") == "org/name"
    assert check_ref("refs/pr/1") == "refs/pr/1" and check_ref("v1.0") == "v1.0"


def test_bundle_manifest_with_a_crlf_name_is_refused() -> None:
    record = RevisionRecord("org/name", COMMIT, (FileEntry("ok.txt", 1, git_sha1="c" * 40),), "2026-01-01T00:00:00Z")
    doc = json.loads(json.dumps({
        "format": "hubserve-bundle", "version": 1, "bundle_id": "x", "created_at": "t",
        "models": [], "revisions": [json.loads(record.to_json())], "blobs": [],
    }))
    doc["revisions"][0]["files"][0]["path"] = "evil\r\nX-Injected: 1"
    with pytest.raises(BundleError, match="control characters"):
        BundleManifest.from_bytes(json.dumps(doc).encode())


def test_content_disposition_is_rfc6266_and_printable() -> None:
    record = RevisionRecord("org/name", COMMIT, (), "2026-01-01T00:00:00Z")
    name = 'naïve "q" name;=#1\u2028.txt'
    headers = file_headers(record, FileEntry(f"docs/{name}", 3, git_sha1="c" * 40))
    cd = headers["Content-Disposition"]
    assert all(" " <= c <= "~" for v in headers.values() for c in v), headers
    star = cd.split("filename*=UTF-8''", 1)[1].split(";", 1)[0]
    assert unquote(star) == name and ";" not in star and '"' not in star
    assert 'filename="na_ve _q_ name;=#1_.txt"' in cd


def test_header_and_log_text_is_escaped() -> None:
    assert header_safe("a\r\nX-Evil: 1\x1b[2J é") == "a\\x0d\\x0aX-Evil: 1\\x1b[2J \\xe9"
    assert printable("ok\x7f\n") == "ok\\x7f\\x0a"
    assert len(printable("x" * 5000)) < 1100


def test_progress_lines_escape_names(capsys: pytest.CaptureFixture[str]) -> None:
    with DownloadProgress("m\x1b[2J", 10, 1) as progress:
        progress.file_done("evil\r\n\x1b]0;title\x07.txt", 10)
        progress.advance(10)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err
    assert "verified evil\\x0d\\x0a\\x1b]0;title\\x07.txt" in err


def test_webhook_names_are_checked_and_deep_json_is_a_payload_error() -> None:
    def hook(name: str, ref: str = "refs/heads/main") -> bytes:
        return json.dumps({"event": {"scope": "repo.content"}, "repo": {"type": "model", "name": name},
                           "updatedRefs": [{"ref": ref}]}).encode()

    assert parse_event(hook("org/name")).refs == ("main",)
    for bad in (hook("org/na\nme"), hook("org/name", "refs/heads/ma\r\nin"), b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(PayloadError):
            parse_event(bad)
    with pytest.raises(HttpError) as e:
        parse_paths_body(b'{"paths":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json")
    assert e.value.status == 400


def test_range_numbers_of_any_length() -> None:
    huge = "9" * 4300
    with pytest.raises(HttpError) as e:
        parse_range(f"bytes={huge}-", 10)
    assert e.value.status == 416
    assert parse_range(f"bytes=2-{huge}", 10) == (2, 9)
    assert parse_range(f"bytes=-{huge}", 10) == (0, 9)
    assert parse_range(f"bytes={huge}-1", 10) is None  # last < first: ignored, whole file


def test_host_values() -> None:
    for good in ("localhost", "mirror:8090", "hub_mirror.internal:80", "10.0.0.1:8090", "[::1]:8090"):
        assert check_host(good) == good
    for bad in (None, "", "evil.com\n", "a b", "a:99999", "a:0", "x" * 256, "a/b", "a@b", "[::1", "-a.com"):
        assert check_host(bad) is None


def test_limits_from_env() -> None:
    limits = Limits.from_env("P_", {"P_MAX_CONNECTIONS": "7", "P_HEADER_TIMEOUT": "2.5"}, body_timeout=3.0)
    assert (limits.max_connections, limits.header_timeout, limits.body_timeout) == (7, 2.5, 3.0)
    for bad in ("x", "0", "-1"):
        with pytest.raises(ConfigError, match="P_IDLE_TIMEOUT"):
            Limits.from_env("P_", {"P_IDLE_TIMEOUT": bad})


def test_daemon_access_defaults_closed_with_a_token_and_public_bind_needs_one() -> None:
    none = DaemonAccess.from_env({})
    assert none.is_open("health") and none.is_open("metrics")
    none.check_bind("127.0.0.1")
    none.check_bind("::1")
    with pytest.raises(HubserveError, match=r"refusing to listen on 0\.0\.0\.0"):
        none.check_bind("0.0.0.0")
    DaemonAccess.from_env({"HUBSERVE_DAEMON_INSECURE_PUBLIC": "1"}).check_bind("0.0.0.0")

    token = DaemonAccess.from_env({"HUBSERVE_DAEMON_TOKEN": "t0k", "HUBSERVE_DAEMON_OPEN_HEALTH": "1"})
    token.check_bind("0.0.0.0")
    assert token.is_open("health") and not token.is_open("metrics")
    assert token.allows("Bearer t0k") and not token.allows("Bearer t0") and not token.allows(None)
