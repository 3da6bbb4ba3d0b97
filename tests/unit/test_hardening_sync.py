"""Issue 16, sync side, pure checks: a file list that cannot be one tree, hostile bundle manifests and
signature entries, field types from the network."""

from __future__ import annotations

import json

import pytest

from sync.bundle import BundleManifest
from sync.bundle_parts import BundleError
from sync.bundle_sign import check_signature
from sync.errors import HubserveError, UnsafePathError
from sync.manifest import ModelSpec
from sync.plan import select_files
from sync.store import FileEntry, RevisionRecord

COMMIT = "a" * 40


def entry(path: str, n: int = 0) -> FileEntry:
    return FileEntry(path, 3, git_sha1=f"{n:040x}")


@pytest.mark.parametrize(
    "paths", [["a", "a/b"], ["x/a/b/c", "x/a"], ["a", "a"], ["config.json", "config.json/x", "z"]]
)
def test_a_file_list_that_is_no_tree_is_refused_whole(paths: list[str]) -> None:
    files = [entry(p, i) for i, p in enumerate(paths)]
    with pytest.raises(UnsafePathError, match=r"both a file and the directory|listed twice"):
        RevisionRecord("org/m", COMMIT, tuple(files), "now")  # what a bundle manifest builds first
    with pytest.raises(UnsafePathError):  # what sync checks on the upstream listing, before any download
        select_files(ModelSpec(name="m", repo="org/m"), files)
    RevisionRecord("org/m", COMMIT, (entry("a/b", 1), entry("ab", 2), entry("a.b", 3)), "now")  # siblings: fine


def _manifest(**override: object) -> bytes:
    doc: dict[str, object] = {
        "format": "hubserve-bundle", "version": 1, "bundle_id": "x", "created_at": "now", "since": [],
        "models": [], "revisions": [{"repo": "org/m", "commit": COMMIT, "verified_at": "now",
                                     "files": [{"path": "a", "size": 3, "git_sha1": "0" * 40}]}],
        "blobs": [{"repo": "org/m", "etag": "0" * 40, "size": 3}],
    }
    doc.update(override)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # nested past the recursion limit
        b'{"format": ' * 50_000,
        _manifest(revisions=[{"repo": "org/m", "commit": COMMIT, "verified_at": "n",
                              "files": [{"path": "a", "size": 3, "git_sha1": "0" * 40},
                                        {"path": "a/b", "size": 3, "git_sha1": "0" * 40}]}]),
        _manifest(revisions=[{"repo": "org/m", "commit": COMMIT, "verified_at": "n",
                              "files": [{"path": "a", "size": "3", "git_sha1": "0" * 40}]}]),  # size a string
        _manifest(revisions=[{"repo": "org/m", "commit": COMMIT, "verified_at": "n",
                              "files": [{"path": "a", "size": -5, "git_sha1": "0" * 40}]}]),
        _manifest(revisions=[{"repo": "org/m", "commit": COMMIT, "verified_at": "n",
                              "files": [{"path": "a", "size": 3, "git_sha1": "../../x"}]}]),
        _manifest(revisions="nope"),
        _manifest(blobs=[["org/m"]]),
        _manifest(models=[{"name": "m", "repo": "org/m", "revision": "main", "commit": COMMIT, "history": ["x"]}]),
        b"[]",
        b"\xff\xfe",
    ],
)
def test_hostile_manifests_are_one_bundle_error(body: bytes) -> None:
    with pytest.raises(BundleError, match="bundle manifest is invalid"):
        BundleManifest.from_bytes(body)


def test_hostile_signature_entries_are_one_bundle_error() -> None:
    for sig in (b"[" * 60_000, b"[]", b'{"public_key": 5}', b"\xff"):
        with pytest.raises(BundleError, match="malformed"):
            check_signature(b"manifest", sig, [])


def test_file_entries_check_their_field_types() -> None:
    for bad in ({"size": True}, {"size": 1.5}, {"git_sha1": "Z" * 40}, {"git_sha1": 7}, {"path": 3}):
        fields: dict[str, object] = {"path": "a", "size": 1, "git_sha1": "0" * 40, **bad}
        with pytest.raises(HubserveError):
            FileEntry(**fields)  # type: ignore[arg-type]
