"""Pure pieces of sync: hashes, path validation, manifest parsing, planning, lock format."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from sync.errors import ConfigError, StoreError, UnsafePathError
from sync.hashing import hash_file
from sync.lock import Lock, LockedModel, read_lock, write_lock
from sync.manifest import parse_manifest
from sync.paths import safe_relpath
from sync.plan import check_against_lock, choose_pin, missing_blobs, select_files
from sync.store import FileEntry, git_blob_sha1, lfs_pointer

pytestmark = pytest.mark.unit
C1, C2 = "a" * 40, "b" * 40


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    f = tmp_path / "hello.txt"
    f.write_bytes(b"hello\n")
    expected = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True).stdout.strip()
    assert hash_file(f, lfs=False) == expected == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert hash_file(f, lfs=True) == hashlib.sha256(b"hello\n").hexdigest()


def test_lfs_oid_is_the_pointer_blob_sha1() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    entry = FileEntry("w.safetensors", 1, sha256=sha)
    assert entry.oid == git_blob_sha1(lfs_pointer(sha, 1))
    assert entry.pointer_size == len(lfs_pointer(sha, 1)) and entry.etag == sha


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "./a", "C:/x", "a\x00b"])
def test_unsafe_paths_rejected(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(bad)


def test_safe_paths_kept() -> None:
    assert safe_relpath("1_Pooling/config.json") == "1_Pooling/config.json"
    assert safe_relpath("a..b/c") == "a..b/c"


def test_manifest_errors_name_model_key_and_value() -> None:
    with pytest.raises(ConfigError) as e:
        parse_manifest('[[models]]\nname = "m"\nrepo = "org/m"\ntask = "dance"\n', "x.toml")
    assert "x.toml" in str(e.value) and "models[0] (m).task" in str(e.value) and "'dance'" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        parse_manifest('[store]\ncolour = "red"\n')
    with pytest.raises(ConfigError, match=r"duplicate model names .*: a"):
        parse_manifest('[[models]]\nname = "a"\nrepo = "o/a"\n[[models]]\nname = "a"\nrepo = "o/b"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_manifest("[[models]\n")


def test_include_exclude_and_pickle_selection() -> None:
    spec = parse_manifest(
        '[[models]]\nname = "m"\nrepo = "o/m"\ninclude = ["*.json", "*.safetensors", "*.bin"]\nexclude = ["big*"]\n'
    ).models[0]
    listing = [
        FileEntry("config.json", 2, git_sha1=C1),
        FileEntry("sub/tokenizer.json", 2, git_sha1=C1),
        FileEntry("model.safetensors", 9, sha256="c" * 64),
        FileEntry("pytorch_model.bin", 9, sha256="d" * 64),
        FileEntry("bigfile.safetensors", 9, sha256="e" * 64),
        FileEntry("README.md", 2, git_sha1=C2),
    ]
    sel = select_files(spec, listing)
    assert [f.path for f in sel.files] == ["config.json", "sub/tokenizer.json", "model.safetensors"]
    assert sel.skipped_pickle == ("pytorch_model.bin",)
    with pytest.raises(StoreError, match="allow_pickle"):
        select_files(spec, [listing[3]])


def test_pins_and_lock_checks() -> None:
    spec = parse_manifest('[[models]]\nname = "m"\nrepo = "o/m"\nrevision = "main"\n').models[0]
    locked = LockedModel("m", "o/m", "main", C1, (FileEntry("a.json", 1, git_sha1=C2),))
    assert choose_pin(spec, None, False).source == "resolve"
    assert choose_pin(spec, locked, False).commit == C1
    assert choose_pin(spec, locked, True).source == "resolve"
    pinned = parse_manifest(f'[[models]]\nname = "m"\nrepo = "o/m"\nrevision = "{C2}"\n').models[0]
    assert choose_pin(pinned, locked, True).commit == C2
    with pytest.raises(StoreError, match="refusing the changed content"):
        check_against_lock(spec, locked, C1, (FileEntry("a.json", 1, git_sha1="f" * 40),))
    same = FileEntry("b.json", 1, git_sha1=C2)
    assert missing_blobs((locked.files[0], same), set()) == [locked.files[0]]


def test_lock_round_trip_is_deterministic(tmp_path: Path) -> None:
    lock = Lock(
        {
            "z": LockedModel(
                "z", "o/z", "main", C1, (FileEntry("b", 1, git_sha1=C2), FileEntry("a", 2, sha256="c" * 64))
            ),
            "a": LockedModel("a", "o/a", C2, C2, ()),
        }
    )
    path = tmp_path / "models.lock"
    assert write_lock(path, lock) is True
    text = path.read_text()
    assert text.index('name = "a"') < text.index('name = "z"')
    assert text.index('path = "a"') < text.index('path = "b"')
    again = read_lock(path)
    assert again.models["z"].files[0].path == "a"
    assert write_lock(path, again) is False
    path.write_text("models = [ {name = 'x', repo = 'o/x', revision = 'main', commit = 'nothex'} ]")
    with pytest.raises(ConfigError, match="unreadable lock"):
        read_lock(path)
