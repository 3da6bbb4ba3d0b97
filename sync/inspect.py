"""Read-only views of the store against the manifest: status and what gc must keep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sync.errors import StoreError
from sync.lock import kept_commits, pinned_commit, read_lock
from sync.manifest import Config
from sync.store import Store, repo_folder_name


@dataclass(frozen=True)
class ModelStatus:
    name: str
    repo: str
    commit: str | None
    state: str  # missing | partial | verified | unresolved
    size: int
    verified_at: str | None


def model_status(cfg: Config) -> list[ModelStatus]:
    store = Store(cfg.store_path)
    lock = read_lock(cfg.lock_path)
    out = []
    for spec in cfg.manifest.pinned:
        commit = pinned_commit(lock, spec.name, spec.repo, spec.revision)
        if commit is None:
            out.append(ModelStatus(spec.name, spec.repo, None, "unresolved", 0, None))
            continue
        rec = store.get_revision(spec.repo, commit)
        if rec is not None:
            out.append(ModelStatus(spec.name, spec.repo, commit, "verified", rec.size, rec.verified_at))
            continue
        locked = lock.get(spec.name)
        files = locked.files if locked and locked.commit == commit else ()
        have = sum(f.size for f in files if store.has_blob(spec.repo, f))
        started = have > 0 or store.snapshot_dir(spec.repo, commit).exists() or any(store.tmp_dir.glob("*.part"))
        out.append(ModelStatus(spec.name, spec.repo, commit, "partial" if started else "missing", have, None))
    return out


def gc_keep(cfg: Config) -> tuple[set[tuple[str, str]], list[str]]:
    """(repo, commit) pairs to keep; repos whose pin is unresolved keep every revision (with a warning)."""
    store = Store(cfg.store_path)
    lock = read_lock(cfg.lock_path)
    keep: set[tuple[str, str]] = set()
    warnings = []
    for spec in cfg.manifest.pinned:
        commit = pinned_commit(lock, spec.name, spec.repo, spec.revision)
        if commit is None:
            warnings.append(f"{spec.name}: pin {spec.revision!r} not in models.lock; keeping all of {spec.repo}")
            keep |= {(r.repo, r.commit) for r in store.revisions(spec.repo)}
        else:
            keep.add((spec.repo, commit))
            locked = lock.get(spec.name)
            if locked is not None and locked.repo == spec.repo:
                keep |= {(spec.repo, c) for c in kept_commits(lock, spec.name, cfg.manifest.store.keep_revisions)}
                if locked.rolled_back_from:
                    keep.add((spec.repo, locked.rolled_back_from))
    return keep, warnings


def served_keep(store: Store, server: str | None, force: bool) -> tuple[set[tuple[str, str]], list[str]]:
    """The verified (repo, commit) pairs a running server serves, which gc never removes; and warnings.

    A configured server that does not answer (down, unreachable, serving nothing) stops gc unless ``force``,
    as the daemon's prune skips its run then: gc cannot know what it would take away from under it.
    """
    if not server:
        return set(), []
    from sync.daemon_http import served_commits

    served = set(served_commits(server).values())
    if not served:
        if force:
            return set(), [f"{server} did not say what it serves; --force: removing without asking it"]
        raise StoreError(
            f"gc: the server {server} did not say what it serves (not running or unreachable?); start it, "
            "pass the right --server, or --force to remove without asking it"
        )
    return {(r.repo, r.commit) for r in store.revisions() if r.commit in served}, []


def prune_plan(cfg: Config, repos: set[str], serving: set[tuple[str, str]]) -> tuple[list[Path], list[str]]:
    """What the daemon removes after pins of ``repos`` moved: their revisions that fell out of
    ``[store] keep_revisions``, never one still pinned, kept for rollback or in ``serving``; nothing of
    other repos and no temp file (those are `hubserve gc`'s). Empty while any pin is unresolved.

    Also the commits of ``repos`` that only ``serving`` keeps (beyond keep_revisions, still served)."""
    keep, warnings = gc_keep(cfg)
    if warnings:
        return [], []
    store = Store(cfg.store_path)
    folders = {repo_folder_name(r) for r in repos}
    records = store.root / ".hubserve" / "revisions"

    def in_scope(p: Path) -> bool:
        rel = p.relative_to(store.root).parts
        return rel[0] in folders or (p.parent.parent == records and p.parent.name in folders)

    spared = sorted(c for r, c in serving - keep if r in repos and store.get_revision(r, c) is not None)
    return [p for p in store.gc_plan(keep | serving) if in_scope(p)], spared
