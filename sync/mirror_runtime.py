"""How the mirror runs: verified records parsed once per file version, and pre-forked worker processes.

The mirror's hot path resolves a revision on every request; re-reading and parsing its JSON record each time
costs more than answering a HEAD. Records are immutable once written (a re-promotion replaces the file), so
a cache keyed by the record file's inode, size and mtime is always current. One Python process is bound by
the GIL; ``workers`` > 1 forks that many processes that accept on the one listening socket, as nginx does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Protocol

from sync.errors import HubserveError, StoreError
from sync.store import RevisionRecord, Store, repo_folder_name

CACHE_MAX = 4096
log = logging.getLogger("hubserve.mirror")


class RecordCache(Store):
    """A Store whose ``get_revision`` parses each record file once per version (stat-checked)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._records: dict[Path, tuple[tuple[int, int, int], RevisionRecord]] = {}
        self._lock = threading.Lock()

    def get_revision(self, repo_id: str, commit: str) -> RevisionRecord | None:
        try:
            path = self.record_path(repo_id, commit)
            st = path.stat()
        except (StoreError, OSError):
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._records.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            record = super().get_revision(repo_id, commit)
        except (HubserveError, ValueError, KeyError, TypeError) as e:
            # a record this version refuses (a name with a control character, written before names were
            # checked) or a damaged one: not served, as if unverified; `hubserve verify` reports it
            log.warning("mirror: ignoring the record of %r at %s: %s", repo_id, commit[:12], e)
            return None
        if record is not None:
            with self._lock:
                if len(self._records) >= CACHE_MAX:
                    self._records.clear()
                self._records[path] = (stamp, record)
        return record


    def revisions(self, repo_id: str | None = None) -> list[RevisionRecord]:
        """Every verified record (of one repo), each through the cache: a record refused here is left out."""
        base = self.root / ".hubserve" / "revisions"
        try:
            folders = [base / repo_folder_name(repo_id)] if repo_id else sorted(base.glob("models--*"))
        except HubserveError:
            return []
        out = []
        for folder in folders:
            repo = folder.name.removeprefix("models--").replace("--", "/", 1)  # repo ids never hold "--"
            for rec_path in sorted(folder.glob("*.json")):
                record = self.get_revision(repo, rec_path.stem)
                if record is not None and record.repo == repo:
                    out.append(record)
        return out


class Serving(Protocol):
    def serve_forever(self, poll_interval: float = ...) -> None: ...
    def server_close(self) -> None: ...


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_workers(server: Serving, workers: int) -> None:
    """Serve on ``workers`` processes sharing the bound socket; returns when interrupted or terminated."""
    children: list[int] = []
    for _ in range(max(0, workers - 1)):
        pid = os.fork()
        if pid == 0:  # a worker: serve until the parent ends it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            try:
                server.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
