"""``hubserve sync``: make the store hold every pinned revision of the manifest, verified.

Per model: choose the pin (manifest commit, lock, or resolve upstream), skip everything if that
revision is already verified in the store and pinned in the lock (no network), else list its files,
download the missing blobs concurrently (hashed as they stream), promote atomically and update the lock.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from sync.adapters import check_adapter, in_folder
from sync.diskio import check_free_space
from sync.errors import ConfigError, HubserveError
from sync.lock import Lock, LockedModel, read_lock, write_lock
from sync.manifest import Config, ModelSpec
from sync.plan import check_against_lock, choose_pin, missing_blobs, select_files
from sync.progress import DownloadProgress, human_bytes
from sync.store import FileEntry, RevisionRecord, Store, now_iso
from sync.upstream import Upstream

log = logging.getLogger("hubserve.sync")


@dataclass
class ModelResult:
    name: str
    commit: str | None = None
    old_commit: str | None = None
    downloaded_bytes: int = 0
    downloaded_files: int = 0
    up_to_date: bool = False
    held_by_rollback: bool = False  # following found the commit that `hubserve rollback` moved away from
    promoted: bool = False  # a new verified record was written
    skipped_pickle: tuple[str, ...] = ()
    error: HubserveError | None = None


@dataclass
class SyncReport:
    models: list[ModelResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(m.error is None for m in self.models)

    @property
    def downloaded_bytes(self) -> int:
        return sum(m.downloaded_bytes for m in self.models)


class Cancelled(Exception):
    """The sync was asked to stop (the daemon's SIGTERM): the file in flight stays in the temp area."""


class Syncer:
    def __init__(self, config: Config, console: Console | None = None, cancel: threading.Event | None = None) -> None:
        self.config = config
        self.store = Store(config.store_path)
        self.console = console or Console(stderr=True)
        self._upstream: Upstream | None = None
        # Checked between chunks and before each promotion; a cancelled run raises Cancelled.
        self._cancel = cancel or threading.Event()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("sync cancelled")

    @property
    def upstream(self) -> Upstream:
        """Created on first use, so a no-op sync never touches the network."""
        if self._upstream is None:
            up = self.config.manifest.upstream
            self._upstream = Upstream(
                self.config.endpoint, self.config.token, token_env=up.token_env, retries=up.retries
            )
        return self._upstream

    def run(
        self,
        update: set[str] | None = None,
        update_all: bool = False,
        only: set[str] | None = None,
        follow: set[str] | None = None,
    ) -> SyncReport:
        """Sync every model (or ``only`` those); ``update``/``update_all`` re-resolve branch/tag pins.

        ``follow``: models whose branch/tag is re-resolved too (the daemon's ``follow = true``), except that a
        commit ``hubserve rollback`` moved away from is not taken again.
        """
        report = SyncReport()
        self.store.ensure()
        with self.store.locked():
            lock = read_lock(self.config.lock_path)
            try:
                for spec in self.config.manifest.pinned:
                    if only and spec.name not in only:
                        continue
                    self._check_cancel()
                    result = ModelResult(spec.name)
                    report.models.append(result)
                    explicit = update_all or spec.name in (update or set())
                    following = not explicit and spec.name in (follow or set())
                    try:
                        self._sync_model(spec, lock, explicit or following, result, following)
                    except HubserveError as e:
                        result.error = e
            finally:
                self._prune_lock(lock)
                write_lock(self.config.lock_path, lock)
                if self._upstream:
                    self._upstream.close()
        return report

    def _prune_lock(self, lock: Lock) -> None:
        names = set(self.config.manifest.names())
        for name in list(lock.models):
            if name not in names:
                del lock.models[name]

    def _sync_model(
        self, spec: ModelSpec, lock: Lock, update: bool, result: ModelResult, following: bool = False
    ) -> None:
        locked = lock.get(spec.name)
        pin = choose_pin(spec, locked, update)
        commit, pipeline_tag = pin.commit, None
        if commit is None:
            info = self.upstream.resolve(spec.repo, spec.revision)
            commit, pipeline_tag = info.commit, info.pipeline_tag
            if following and locked is not None and locked.rolled_back_from == commit:
                commit, pipeline_tag, result.held_by_rollback = locked.commit, None, True
            if locked and locked.commit != commit:
                result.old_commit = locked.commit
        result.commit = commit
        record = self.store.get_revision(spec.repo, commit)
        if (
            record is not None
            and locked is not None
            and locked.commit == commit
            and locked.files
            and locked.selection == spec.selection_key()
            and {f.path for f in locked.files} == {f.path for f in record.files}
        ):
            result.up_to_date = True
            self._write_refs(spec, commit)
            return
        listing = self.upstream.list_files(spec.repo, commit)
        selection = select_files(spec, listing)
        result.skipped_pickle = selection.skipped_pickle
        check_against_lock(spec, locked, commit, selection.files)
        if record is None or {f.path for f in record.files} != {f.path for f in selection.files}:
            self._fetch(spec, commit, selection.files, result)
            if pipeline_tag is None and record is None:
                pipeline_tag = self._pipeline_tag(spec, commit)
            record = RevisionRecord(
                repo=spec.repo,
                commit=commit,
                files=selection.files,
                verified_at=now_iso(),
                source=self.config.endpoint,
                pipeline_tag=pipeline_tag or (record.pipeline_tag if record else None) or spec.task,
                refs=() if spec.revision == commit else (spec.revision,),
            )
            self._check_cancel()
            base = self._check_adapter(spec, record, lock)
            self.store.promote(record)
            result.promoted = True
        else:
            base = self._check_adapter(spec, record, lock)
        self._write_refs(spec, commit)
        lock.put(LockedModel(spec.name, spec.repo, spec.revision, commit, selection.files, spec.selection_key(),
                             base=base))

    def _check_adapter(self, spec: ModelSpec, record: RevisionRecord, lock: Lock) -> str | None:
        """For an adapter: its base's served name, once it fits the base's pinned revision (else ConfigError,
        before the adapter's revision is promoted or pinned)."""
        base = self.config.manifest.base_of(spec.name)
        if base is None:
            return None
        locked = lock.get(base.name)
        base_record = self.store.get_revision(base.repo, locked.commit) if locked else None
        if base_record is None:
            raise ConfigError(f"adapter {spec.name!r}: its base model {base.name!r} is not synced; sync it first")
        store = self.store

        def adapter_file(path: str) -> Path | None:
            entry = record.file(path)
            return store.blob_path(spec.repo, entry.etag) if entry is not None else None

        base_dir = store.snapshot_dir(base.repo, base_record.commit)
        check_adapter(adapter_file, in_folder(base_dir), f"{spec.name!r} ({spec.repo})", base.repo,
                      f"{base.name!r} ({base.repo}@{base_record.commit[:12]})")
        return base.name

    def _pipeline_tag(self, spec: ModelSpec, commit: str) -> str | None:
        try:
            return self.upstream.resolve(spec.repo, commit).pipeline_tag
        except HubserveError:
            return None

    def _write_refs(self, spec: ModelSpec, commit: str) -> None:
        if spec.revision != commit and self.store.read_ref(spec.repo, spec.revision) != commit:
            self.store.write_ref(spec.repo, spec.revision, commit)

    def _fetch(self, spec: ModelSpec, commit: str, files: tuple[FileEntry, ...], result: ModelResult) -> None:
        present = {f.etag for f in files if self.store.has_blob(spec.repo, f)}
        todo = missing_blobs(files, present)
        if not todo:
            return
        total = sum(f.size for f in todo)
        label = f"{spec.name} ({spec.repo}@{commit[:12]})"
        check_free_space(self.store.tmp_dir, total - sum(self._partial(f) for f in todo), f"syncing {label}")
        workers = min(self.config.manifest.upstream.max_workers, len(todo))
        with DownloadProgress(label, total, len(todo), self.console) as progress, ThreadPoolExecutor(workers) as pool:
            futures: list[Future[None]] = [
                pool.submit(self._fetch_one, spec.repo, commit, f, progress) for f in todo
            ]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in pending:
                fut.cancel()
            for fut in futures:
                if fut.done() and not fut.cancelled() and fut.exception():
                    raise fut.exception()  # type: ignore[misc]
        result.downloaded_bytes += total
        result.downloaded_files += len(todo)

    def _partial(self, entry: FileEntry) -> int:
        """Bytes an earlier run left in this file's .part (resumed, so not needed again)."""
        try:
            return min(entry.size, (self.store.tmp_dir / f"{entry.etag}.part").stat().st_size)
        except OSError:
            return 0

    def _fetch_one(self, repo: str, commit: str, entry: FileEntry, progress: DownloadProgress) -> None:
        part = self.store.tmp_dir / f"{entry.etag}.part"

        def on_bytes(n: int) -> None:
            self._check_cancel()  # between chunks: what arrived stays in the .part, resumed next run
            progress.advance(n)

        self.upstream.download(repo, commit, entry, part, on_bytes)
        self.store.add_blob(repo, entry, part)
        progress.file_done(entry.path, entry.size)


def describe(result: ModelResult) -> str:
    if result.error:
        return f"{result.name}: FAILED: {result.error}"
    commit = (result.commit or "")[:12]
    parts = [f"{result.name}: {commit}"]
    if result.old_commit:
        parts = [f"{result.name}: {result.old_commit[:12]} -> {commit}"]
    if result.held_by_rollback:
        parts.append("held by rollback (upstream still points at the commit rolled back from)")
    if result.up_to_date:
        parts.append("up to date")
    else:
        parts.append(f"verified, {result.downloaded_files} file(s) / {human_bytes(result.downloaded_bytes)} downloaded")
    if result.skipped_pickle:
        parts.append(f"skipped pickle files {', '.join(result.skipped_pickle)} (allow_pickle = false)")
    return ", ".join(parts)
