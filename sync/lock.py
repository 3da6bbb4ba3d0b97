"""models.lock: each pin resolved to a commit, with every file and its hash. Deterministic TOML."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from sync.errors import ConfigError
from sync.paths import is_commit
from sync.store import FileEntry, atomic_write

LOCK_VERSION = 1
HEADER = "# models.lock: written by `hubserve sync`; pins each model of models.toml to a commit.\n"


@dataclass(frozen=True)
class LockedModel:
    name: str
    repo: str
    revision: str  # what models.toml asked for
    commit: str  # what it resolved to
    files: tuple[FileEntry, ...] = field(default_factory=tuple)
    # The file selection the files were chosen with; a change re-lists the commit upstream.
    selection: str = ""


@dataclass
class Lock:
    models: dict[str, LockedModel] = field(default_factory=dict)

    def get(self, name: str) -> LockedModel | None:
        return self.models.get(name)

    def to_toml(self) -> str:
        doc = {
            "version": LOCK_VERSION,
            "models": [
                {
                    "name": m.name,
                    "repo": m.repo,
                    "revision": m.revision,
                    "commit": m.commit,
                    "selection": m.selection,
                    "files": [f.to_dict() for f in sorted(m.files, key=lambda f: f.path)],
                }
                for m in sorted(self.models.values(), key=lambda m: m.name)
            ],
        }
        return HEADER + tomli_w.dumps(doc)


def read_lock(path: Path) -> Lock:
    """The lock beside the manifest; an empty Lock if there is none yet."""
    if not path.is_file():
        return Lock()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        models = {}
        for m in data.get("models", []):
            if not is_commit(m["commit"]):
                raise ValueError(f"model {m.get('name')!r}: commit {m['commit']!r} is not 40-hex")
            models[m["name"]] = LockedModel(
                name=m["name"],
                repo=m["repo"],
                revision=m["revision"],
                commit=m["commit"],
                selection=str(m.get("selection", "")),
                files=tuple(FileEntry(**f) for f in m.get("files", [])),
            )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable lock file ({e}); fix it or delete it and run `hubserve sync`") from e
    return Lock(models)


def write_lock(path: Path, lock: Lock) -> bool:
    """Write the lock if its content changed; return whether it did."""
    text = lock.to_toml()
    if not lock.models and not path.exists():
        return False
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write(path, text.encode())
    return True


def pinned_commit(lock: Lock, name: str, repo: str, revision: str) -> str | None:
    """The commit a model is pinned to: the revision itself if 40-hex, else the lock's entry."""
    if is_commit(revision):
        return revision
    locked = lock.get(name)
    if locked and locked.repo == repo and locked.revision == revision:
        return locked.commit
    return None
