"""The receiving side's rules over what a bundle carries, applied before any blob is read.

- models.toml's per-model file rules (include/exclude, allow_pickle), through sync's own ``select_files``:
  a file the receiving side would not have synced is not imported (reported as skipped), and the lock
  entry records the receiving selection, so ``hubserve sync`` there finds the pin up to date. A revision of
  a model the receiving models.toml does not name gets the defaults (every file, no pickle) unless
  ``allow_pickle`` is passed.
- No downgrade: a bundle's commit for a model is *older* than the receiving pin when it is in that model's
  history in the receiving models.lock (this side was pinned to it and moved on). Bundles carry each
  model's history from the sending side, merged into the receiving lock, so a side that only ever got
  bundles knows which commits came before its pin too. Such a bundle is refused unless ``allow_downgrade``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sync.bundle_parts import BundleError
from sync.lock import HISTORY_MAX, Lock, LockedModel
from sync.manifest import Manifest, ModelSpec
from sync.plan import select_files
from sync.store import RevisionRecord


@dataclass(frozen=True)
class Ruled:
    """A bundle's revisions and lock entries as the receiving rules let them in."""

    revisions: tuple[RevisionRecord, ...]
    models: tuple[LockedModel, ...]
    skipped: tuple[str, ...]  # one line per file not imported, naming the rule

    def needed(self) -> set[tuple[str, str]]:
        """(repo, etag) of every blob some imported file needs."""
        return {(r.repo, f.etag) for r in self.revisions for f in r.files}


def _default_spec(name: str, repo: str, allow_pickle: bool) -> ModelSpec:
    return ModelSpec.model_construct(name=name, repo=repo, include=None, exclude=[], allow_pickle=allow_pickle)


def _specs(models: tuple[LockedModel, ...], receiving: Manifest | None, allow_pickle: bool) -> dict[str, ModelSpec]:
    """The receiving rules for each model the bundle pins (by served name)."""
    out = {}
    known = {s.name: s for s in receiving.models} if receiving else {}
    for m in models:
        spec = known.get(m.name)
        if spec is not None and spec.repo != m.repo:
            raise BundleError(f"{m.name}: the bundle pins {m.repo}, the receiving models.toml says {spec.repo}; "
                              "refusing it")
        out[m.name] = spec if spec is not None else _default_spec(m.name, m.repo, allow_pickle)
    return out


def apply_rules(
    revisions: tuple[RevisionRecord, ...], models: tuple[LockedModel, ...], receiving: Manifest | None,
    allow_pickle: bool = False,
) -> Ruled:
    """Each revision keeps the files some model pinning it selects; each lock entry its own selection."""
    specs = _specs(models, receiving, allow_pickle)
    by_rev: dict[tuple[str, str], list[ModelSpec]] = {}
    for m in models:
        by_rev.setdefault((m.repo, m.commit), []).append(specs[m.name])
    ruled_revs, skipped = [], []
    for rec in revisions:
        rules = by_rev.get((rec.repo, rec.commit)) or [_default_spec(rec.repo, rec.repo, allow_pickle)]
        chosen = {f.path for spec in rules for f in select_files(spec, list(rec.files)).files}
        files = tuple(f for f in rec.files if f.path in chosen)
        for f in rec.files:
            if f.path not in chosen:
                why = "a pickle file (allow_pickle = false)" if any(s.refuses_pickle(f.path) for s in rules) else (
                    "not selected by include/exclude")
                skipped.append(f"{rec.repo}@{rec.commit[:12]}: {f.path}: {why}; not imported")
        ruled_revs.append(replace(rec, files=files))
    ruled_models = []
    for m in models:
        spec = specs[m.name]
        files = select_files(spec, list(m.files)).files if m.files else ()
        ruled_models.append(replace(m, files=files, selection=spec.selection_key()))
    return Ruled(tuple(ruled_revs), tuple(ruled_models), tuple(skipped))


def check_downgrade(lock: Lock, models: tuple[LockedModel, ...]) -> None:
    """Refuse moving a pin back to a commit the receiving side was pinned to before (see the module doc)."""
    for m in models:
        current = lock.get(m.name)
        if current is None or current.repo != m.repo or current.commit == m.commit:
            continue
        if m.commit in current.history:
            raise BundleError(
                f"{m.name}: the bundle pins {m.commit[:12]}, older than the current pin {current.commit[:12]} "
                f"(models.lock history); refusing to move it back (pass --allow-downgrade to, or use "
                "`hubserve rollback`)"
            )


def merge_models(lock: Lock, models: tuple[LockedModel, ...]) -> None:
    """Put each entry into the lock (a moved pin keeps this side's history, as sync does), then add the
    sending side's history after this side's own, so later replays of older commits are recognised."""
    for m in models:
        entry = lock.put(replace(m, history=()))
        extra = tuple(c for c in m.history if c != entry.commit and c not in entry.history)
        if extra:
            lock.models[m.name] = replace(entry, history=(*entry.history, *extra)[:HISTORY_MAX])
