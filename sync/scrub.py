"""The daemon's bit-rot schedule: re-hash the whole store every ``[daemon] verify_interval``, paced.

A pass reads every verified revision at no more than ``[daemon] verify_bandwidth`` MB/s (a share of the
disk, so serving keeps the rest), marks what no longer verifies (sync/integrity.py), and re-fetches the
bad files from the upstream through the syncer's own client when it can. The time of the last pass is
kept in ``.hubserve/verify.json``, so a daemon that restarts daily still verifies weekly; a store that
was never scrubbed counts from its oldest record's ``verified_at``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync.errors import HubserveError
from sync.integrity import Problem, Stopped, Throttle, check, corrupt_marks, repair
from sync.manifest import Config
from sync.progress import human_bytes
from sync.store import FileEntry, RevisionRecord, Store, atomic_write
from sync.syncer import Syncer

log = logging.getLogger("hubserve.daemon")
MB = 1_000_000


@dataclass
class PassReport:
    revisions: int = 0
    bytes: int = 0
    seconds: float = 0.0
    corrupt: list[str] = field(default_factory=list)  # repo@commit found corrupt in this pass
    repaired: list[str] = field(default_factory=list)
    unrepaired: dict[str, str] = field(default_factory=dict)  # repo@commit -> why


class Scrubber:
    """One verify pass when due (``step``), or a thread that runs them on schedule (``run``)."""

    def __init__(self, config: Callable[[], Config], stop: threading.Event | None = None) -> None:
        self._config = config
        self.stop = stop or threading.Event()
        self.running = False
        self.verified_bytes = 0
        self.repairs = {"ok": 0, "failed": 0}

    @property
    def store(self) -> Store:
        return Store(self._config().store_path)

    @property
    def interval(self) -> float:
        return self._config().manifest.daemon.verify_interval

    @property
    def _state_path(self) -> Path:
        return self.store.root / ".hubserve" / "verify.json"

    def last_pass(self) -> float | None:
        try:
            return float(json.loads(self._state_path.read_text())["last_pass"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _baseline(self) -> float:
        """Never scrubbed: count from the oldest record's verification (a fresh store is not re-read at once)."""
        stamps = []
        for rec in self.store.revisions():
            try:
                stamps.append(datetime.fromisoformat(rec.verified_at.replace("Z", "+00:00")).timestamp())
            except ValueError:
                stamps.append(0.0)
        return min(stamps, default=time.time())

    def next_pass(self) -> float | None:
        """Unix time the next pass is due; None when ``verify_interval`` is off."""
        if not self.interval:
            return None
        last = self.last_pass()
        return (last if last is not None else self._baseline()) + self.interval

    def step(self, force: bool = False) -> PassReport | None:
        """Run one pass if one is due (or ``force``); None if not due. Stopped propagates a stop request."""
        due = self.next_pass()
        if not force and (due is None or due > time.time()):
            return None
        self.running = True
        try:
            return self._pass()
        finally:
            self.running = False

    def run(self) -> None:
        """The schedule, in the daemon's verify thread, until ``stop`` is set."""
        while not self.stop.is_set():
            due = self.next_pass()
            wait = 3600.0 if due is None else min(3600.0, max(0.0, due - time.time()))
            if wait > 0:
                self.stop.wait(wait)  # re-read hourly: verify_interval may change with models.toml
                continue
            try:
                self.step()
            except Stopped:
                return
            except Exception as e:  # a store we cannot read now: log it, try again next interval
                log.error("verify pass failed (%s: %s); next pass in verify_interval", type(e).__name__, e)
                log.debug("verify pass failed", exc_info=True)
                self._write_state(time.time(), PassReport())

    def _pass(self) -> PassReport:
        cfg, store, started = self._config(), self.store, time.monotonic()
        throttle = Throttle(cfg.manifest.daemon.verify_bandwidth * MB, self.stop)
        report, seen = PassReport(), dict[str, bool]()
        records = store.revisions()
        log.info("verify pass: %d revision(s), at most %g MB/s", len(records), cfg.manifest.daemon.verify_bandwidth)
        for rec in records:
            before = throttle.consumed
            problems = check(store, rec, throttle, seen)
            self.verified_bytes += throttle.consumed - before
            report.revisions += 1
            if problems:
                self._on_corrupt(cfg, store, rec, problems, report)
        report.bytes, report.seconds = throttle.consumed, time.monotonic() - started
        self._write_state(time.time(), report)
        log.info(
            "verify pass done: %d revision(s), %s in %.1fs; %d corrupt, %d repaired", report.revisions,
            human_bytes(report.bytes), report.seconds, len(report.corrupt), len(report.repaired),
        )
        return report

    def _on_corrupt(self, cfg: Config, store: Store, rec: RevisionRecord, problems: list[Problem],
                    report: PassReport) -> None:
        name = f"{rec.repo}@{rec.commit}"
        report.corrupt.append(name)
        for p in problems:  # repo and path come from a verified record; logged as reprs all the same
            log.error("corrupt: %r@%s: %r: %s", rec.repo, rec.commit[:12], p.path, p.message)
        syncer = Syncer(cfg, cancel=self.stop)
        try:
            left = repair(store, rec, problems, lambda entry, part: self._download(syncer, rec, entry, part))
        except (HubserveError, OSError) as e:
            left, why = problems, str(e)
        else:
            why = "; ".join(p.message for p in left)
        finally:
            syncer.upstream.close()
        if left:
            self.repairs["failed"] += 1
            report.unrepaired[name] = why
            log.error("%r@%s stays marked corrupt (the server starts no engine on it): %s",
                      rec.repo, rec.commit[:12], why)
        else:
            self.repairs["ok"] += 1
            report.repaired.append(name)
            log.info("%r@%s: re-fetched from %s and verified again", rec.repo, rec.commit[:12], cfg.endpoint)

    def _download(self, syncer: Syncer, rec: RevisionRecord, entry: FileEntry, part: Path) -> None:
        def on_bytes(_n: int) -> None:
            if self.stop.is_set():
                raise Stopped("verification stopped")

        syncer.upstream.download(rec.repo, rec.commit, entry, part, on_bytes)

    def _write_state(self, when: float, report: PassReport) -> None:
        data = {"last_pass": when, "revisions": report.revisions, "bytes": report.bytes, "seconds": report.seconds}
        atomic_write(self._state_path, (json.dumps(data) + "\n").encode())

    # ---- what /health and /metrics show -----------------------------------------------------------
    def health(self) -> dict[str, Any]:
        nxt = self.next_pass()
        return {
            "verify_interval_s": self.interval,
            "running": self.running,
            "last_pass": self.last_pass(),
            "next_pass": nxt,
            "corrupt": [
                {"repo": m.repo, "commit": m.commit, "files": list(m.files)} for m in corrupt_marks(self.store)
            ],
        }


class ScrubCollector(Collector):
    """The scrubber's metrics, read at scrape time (registered on the daemon's registry)."""

    def __init__(self, scrubber: Scrubber) -> None:
        self.scrubber = scrubber

    def collect(self) -> Iterable[Metric]:
        s = self.scrubber
        marks = corrupt_marks(s.store)
        yield GaugeMetricFamily(
            "hubserve_daemon_corrupt_revisions", "Revisions marked corrupt (no engine starts on them).", len(marks)
        )
        each = GaugeMetricFamily(
            "hubserve_daemon_corrupt_revision", "A revision marked corrupt (value 1).", labels=["repo", "commit"]
        )
        for m in marks:
            each.add_metric([m.repo, m.commit], 1)
        yield each
        last = s.last_pass()
        if last is not None:
            yield GaugeMetricFamily(
                "hubserve_daemon_verify_last_pass_timestamp_seconds", "Unix time of the last verify pass.", last
            )
        yield CounterMetricFamily(
            "hubserve_daemon_verified_bytes", "Bytes re-hashed by verify passes.", s.verified_bytes
        )
        repairs = CounterMetricFamily(
            "hubserve_daemon_repairs", "Corrupt revisions re-fetched (ok) or left marked (failed).", labels=["result"]
        )
        for result, n in s.repairs.items():
            repairs.add_metric([result], n)
        yield repairs
