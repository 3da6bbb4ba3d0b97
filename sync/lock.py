"""models.lock: each pin resolved to a commit, with every file and its hash. Deterministic TOML."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomli_w

from sync.diskio import atomic_write
from sync.errors import ConfigError
from sync.paths import is_commit
from sync.store import FileEntry

LOCK_VERSION = 1
HISTORY_MAX = 10  # previous commits remembered per model (the store keeps [store] keep_revisions of them)
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
    # Commits this model was pinned to before, newest first (what `hubserve rollback` goes back to).
    history: tuple[str, ...] = ()
    # Set by `hubserve rollback`: the commit rolled back from. Following a branch never moves back to it.
    rolled_back_from: str | None = None
    # For a LoRA adapter: the served name of the model it adapts (its entry is filed under that model's).
    base: str | None = None

    def moved_to(self, new: LockedModel) -> LockedModel:
        """``new`` as the successor of this entry: the old commit joins the history when the pin moves."""
        if new.commit == self.commit:
            return replace(new, history=self.history, rolled_back_from=self.rolled_back_from)
        history = tuple(c for c in (self.commit, *self.history) if c != new.commit)[:HISTORY_MAX]
        return replace(new, history=history, rolled_back_from=None)


@dataclass
class Lock:
    models: dict[str, LockedModel] = field(default_factory=dict)

    def get(self, name: str) -> LockedModel | None:
        return self.models.get(name)

    def put(self, entry: LockedModel) -> LockedModel:
        """Record ``entry``, keeping the model's history (a moved pin pushes the old commit onto it)."""
        old = self.models.get(entry.name)
        if old is not None and old.repo == entry.repo:
            entry = old.moved_to(entry)
        self.models[entry.name] = entry
        return entry

    def to_toml(self) -> str:
        doc = {"version": LOCK_VERSION, "models": [_entry_doc(m) for m in sorted(self.models.values(), key=_order)]}
        return HEADER + tomli_w.dumps(doc)


def _order(m: LockedModel) -> tuple[str, str]:
    """Models by name, each followed by its adapters."""
    return (m.base, m.name) if m.base else (m.name, "")


def _entry_doc(m: LockedModel) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": m.name,
        "repo": m.repo,
        "revision": m.revision,
        "commit": m.commit,
        "selection": m.selection,
    }
    if m.base:
        doc["base"] = m.base
    if m.history:
        doc["history"] = list(m.history)
    if m.rolled_back_from:
        doc["rolled_back_from"] = m.rolled_back_from
    doc["files"] = [f.to_dict() for f in sorted(m.files, key=lambda f: f.path)]
    return doc


def read_lock(path: Path) -> Lock:
    """The lock beside the manifest; an empty Lock if there is none yet."""
    if not path.is_file():
        return Lock()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        models = {}
        for m in data.get("models", []):
            history = tuple(m.get("history", ()))
            rolled_back_from = m.get("rolled_back_from")
            for commit in (m["commit"], *history, *([rolled_back_from] if rolled_back_from else [])):
                if not isinstance(commit, str) or not is_commit(commit):
                    raise ValueError(f"model {m.get('name')!r}: commit {commit!r} is not 40-hex")
            models[m["name"]] = LockedModel(
                name=m["name"],
                repo=m["repo"],
                revision=m["revision"],
                commit=m["commit"],
                selection=str(m.get("selection", "")),
                files=tuple(FileEntry(**f) for f in m.get("files", [])),
                history=history,
                rolled_back_from=rolled_back_from,
                base=m.get("base"),
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
    """The commit a model is pinned to: the lock's entry for this repo and revision (a rolled-back pin
    overrides even a 40-hex revision of models.toml), else the revision itself if 40-hex, else None."""
    locked = lock.get(name)
    same = locked is not None and locked.repo == repo and locked.revision == revision
    if same and locked is not None and (locked.rolled_back_from or not is_commit(revision)):
        return locked.commit
    return revision if is_commit(revision) else None


def kept_commits(lock: Lock, name: str, keep_revisions: int) -> tuple[str, ...]:
    """The commits of a model the store keeps: the pinned one and the newest ``keep_revisions - 1`` before it."""
    locked = lock.get(name)
    if locked is None:
        return ()
    return (locked.commit, *locked.history[: max(0, keep_revisions - 1)])


def rollback(
    lock: Lock, name: str, verified_files: Callable[[str], tuple[FileEntry, ...] | None]
) -> tuple[str, str]:
    """Pin ``name`` to the newest earlier commit still verified in the store (``verified_files`` gives its
    files, None if it is not there); return the (old, new) commits.

    The rolled-back-from commit is remembered so that following a branch does not move straight back to it.
    """
    locked = lock.get(name)
    if locked is None:
        raise ConfigError(f"model {name!r} has no entry in models.lock; run `hubserve sync` first")
    for i, commit in enumerate(locked.history):
        files = verified_files(commit)
        if files is not None:
            lock.models[name] = replace(
                locked, commit=commit, history=locked.history[i + 1 :], rolled_back_from=locked.commit, files=files
            )
            return locked.commit, commit
    known = ", ".join(c[:12] for c in locked.history) or "none"
    raise ConfigError(
        f"model {name!r}: no earlier verified revision to roll back to (history in models.lock: {known}); "
        "raise [store] keep_revisions to keep more"
    )
