"""``hubserve daemon``: keep the store in step with models.toml, models.lock and the Hub.

One control loop in the main thread reconciles at start, when models.toml changes (watchfiles, plus a
content check every interval for changes a watch misses), on SIGHUP, every interval, and for the
models a Hub webhook names. Every reconcile is ``Syncer.run``, the code path of ``hubserve sync``, with
``follow`` set to the models that opt in, so pins without ``follow = true`` never move. An invalid
edit of models.toml is logged once and the last good configuration stays in force. Upstream failures
back off exponentially with jitter; webhooks coalesce (one reconcile running, one pending, at most one per
``webhook_min_interval``, never before the backoff ends). A second thread re-hashes the store on the
``verify_interval`` schedule (sync/scrub.py). SIGTERM/SIGINT cancel the sync between chunks (the partial file
stays in the temp area for the next run; nothing is half-promoted) and the daemon exits 0.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import watchfiles
from rich.console import Console

from sync.daemon_http import DaemonMetrics, DaemonServer, parse_listen, served_commits
from sync.errors import ConfigError, HubserveError
from sync.inspect import prune_plan
from sync.lock import read_lock
from sync.manifest import SETTLE_MAX_S, Config, emptied, load_config, unsettled_s
from sync.progress import human_bytes
from sync.scrub import Scrubber, ScrubCollector
from sync.store import Store
from sync.syncer import Cancelled, ModelResult, Syncer
from sync.webhooks import HubEvent, known_repo, matching_models

log = logging.getLogger("hubserve.daemon")
DEFAULT_INTERVAL = 300.0
DEFAULT_LISTEN = "127.0.0.1:8091"
INITIAL_BACKOFF = 2.0
STOP_GRACE = 5.0  # seconds a cancelled download gets to reach its next chunk before the process exits anyway


def backoff_delay(
    failures: int, cap: float, initial: float = INITIAL_BACKOFF, rng: Callable[[], float] = random.random
) -> float:
    """Seconds before retrying after ``failures`` failed reconciles in a row: exponential, capped at
    ``cap``, with "equal jitter" (half fixed, half random) so many daemons do not retry in step."""
    base = min(cap, initial * 2 ** max(0, failures - 1))
    return base / 2 + rng() * base / 2


@dataclass(frozen=True)
class DaemonOptions:
    config: Path | None = None
    store: Path | None = None
    interval: float | None = None  # None: [daemon] interval, else DEFAULT_INTERVAL
    listen: str | None = None  # None: [daemon] listen, else DEFAULT_LISTEN
    server: str | None = None  # None: [daemon] server, else no served-commit metric


class Daemon:
    def __init__(self, options: DaemonOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console(stderr=True)
        self.config = load_config(options.config, options.store)  # invalid at start: ConfigError, exit 2
        self._config_text: str | None = self.config.path.read_text(encoding="utf-8")
        self._config_error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._pending_full: str | None = "start"  # the trigger of the next full reconcile, if one is due
        self._pending_reload = False
        self._pending_webhook: set[str] = set()
        self._next_at = 0.0
        self._last_webhook_run = -float("inf")
        self._failures = 0
        self._last_success: float | None = None
        self._locked: dict[str, str] = {}
        server = options.server or self.config.manifest.daemon.server
        self.metrics = DaemonMetrics(self.locked_commits, (lambda: served_commits(server)) if server else None)
        self.scrubber = Scrubber(lambda: self.config, self._stop)  # bit rot: [daemon] verify_interval
        self.metrics.registry.register(ScrubCollector(self.scrubber))
        self._refresh_locked()

    # ---- settings that follow the current configuration -------------------------------------------
    @property
    def interval(self) -> float:
        return self.options.interval or self.config.manifest.daemon.interval or DEFAULT_INTERVAL

    @property
    def listen(self) -> str:
        return self.options.listen or self.config.manifest.daemon.listen or DEFAULT_LISTEN

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        host, port = parse_listen(self.listen)
        try:
            http = DaemonServer((host, port), self, self.metrics)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.listen}: {e.strerror or e}; pass another --listen") from e
        threading.Thread(target=http.serve_forever, name="daemon-http", daemon=True).start()
        threading.Thread(target=self._watch, name="config-watch", daemon=True).start()
        threading.Thread(target=self.scrubber.run, name="verify", daemon=True).start()
        log.info(
            "daemon for %s: store %s, every %gs, listening on http://%s:%d",
            self.config.path, self.config.store_path, self.interval, host, http.server_address[1],
        )
        try:
            while (job := self._next_job()) is not None:
                self._reconcile(*job)
        finally:
            http.shutdown()
            http.server_close()
        log.info("daemon stopped")
        return 0

    def _next_job(self) -> tuple[str, set[str] | None] | None:
        """Block until something is due: (trigger, models) with models None for a full reconcile."""
        while not self._stop.is_set():
            if self._pending_reload:
                self._pending_reload = False
                if self._reload():
                    with self._lock:  # a full reconcile covers a pending SIGHUP and webhook too
                        self._pending_full = None
                        self._pending_webhook.clear()
                    return "config", None
            now = time.monotonic()
            with self._lock:
                if self._pending_full:
                    trigger, self._pending_full = self._pending_full, None
                    self._pending_webhook.clear()
                    return trigger, None
                if self._next_at <= now:
                    self._pending_webhook.clear()  # the interval's (or backoff's) full reconcile covers them
                elif self._pending_webhook and self._webhook_due() <= now:
                    names, self._pending_webhook = self._pending_webhook, set()
                    self._last_webhook_run = now
                    return "webhook", names
                due = min(self._next_at, self._webhook_due() if self._pending_webhook else self._next_at)
            if self._next_at <= now:
                self._reload()  # a change the watch missed (a replaced symlink, a network filesystem)
                return "interval", None
            self._wake.wait(due - now)
            self._wake.clear()
        return None

    def _webhook_due(self) -> float:
        """When pending webhooks may reconcile: ``webhook_min_interval`` after the last webhook reconcile began,
        and never before the backoff after failures ends (a flood must not hammer a failing upstream)."""
        due = self._last_webhook_run + self.config.manifest.daemon.webhook_min_interval
        return max(due, self._next_at) if self._failures else due

    def _reconcile(self, trigger: str, only: set[str] | None) -> None:
        cfg = self.config
        follow = {m.name for m in cfg.manifest.pinned if m.follow}
        if only is not None:
            follow &= only
        self.metrics.reconciles.labels(trigger).inc()
        log.info("reconcile (%s)%s", trigger, f": {', '.join(sorted(only))}" if only else "")
        try:
            report = Syncer(cfg, self.console, self._cancel).run(only=only, follow=follow)
        except Cancelled:
            log.info("stopped mid-sync: the file in flight stays in the temp area for the next run; nothing promoted")
            return
        except Exception as e:  # the store or the lock file: keep running on what the store has, retry later
            log.debug("reconcile failed", exc_info=True)
            self.metrics.failures.labels("").inc()
            self._schedule(ok=False, reason=str(e) if isinstance(e, HubserveError) else f"{type(e).__name__}: {e}")
            return
        for result in report.models:
            self._log_result(result, result.name in follow)
        self._refresh_locked()
        repo_of = {m.name: m.repo for m in cfg.manifest.pinned}
        moved = {repo_of[r.name] for r in report.models if r.error is None and r.old_commit and r.name in repo_of}
        if moved and cfg.manifest.daemon.prune:
            self._prune(cfg, moved, repo_of)
        failed = [r for r in report.models if r.error is not None]
        self._schedule(ok=not failed, reason=", ".join(r.name for r in failed))

    def _prune(self, cfg: Config, repos: set[str], repo_of: dict[str, str]) -> None:
        """Remove the revisions of ``repos`` that fell out of keep_revisions, never the one a server serves."""
        serving: set[tuple[str, str]] = set()
        server = self.options.server or cfg.manifest.daemon.server
        if server:
            served = served_commits(server)
            if not served:
                log.info("prune skipped: %s did not say what it serves; `hubserve gc` can do it later", server)
                return
            serving = {(repo_of[name], commit) for name, commit in served.items() if name in repo_of}
        store = Store(cfg.store_path)
        try:
            with store.locked():
                doomed, spared = prune_plan(cfg, repos, serving)
                freed = store.remove(doomed)
        except (OSError, HubserveError) as e:
            log.warning("prune failed (%s); the store keeps those revisions until `hubserve gc`", e)
            return
        if spared:
            log.info("kept %s beyond keep_revisions: %s still serves it", ", ".join(c[:12] for c in spared), server)
        gone = sorted(p.name for p in doomed if p.parent.name == "snapshots")
        if gone:
            log.info("pruned %d revision(s) beyond [store] keep_revisions = %d: %s (freed %s)", len(gone),
                     cfg.manifest.store.keep_revisions, ", ".join(c[:12] for c in gone), human_bytes(freed))

    def _schedule(self, ok: bool, reason: str) -> None:
        if ok:
            self._failures = 0
            self._last_success = time.time()
            self.metrics.last_success.set(self._last_success)
            self._next_at = time.monotonic() + self.interval
            return
        self._failures += 1
        delay = backoff_delay(self._failures, self.config.manifest.daemon.backoff_max)
        self._next_at = time.monotonic() + delay
        log.warning("reconcile failed (%s); keeping what the store has, retrying in %.1fs", reason, delay)

    def _log_result(self, r: ModelResult, followed: bool) -> None:
        """One line per action: failed, moved (name: old -> new), resolved, downloaded, promoted."""
        if r.error is not None:
            self.metrics.failures.labels(r.name).inc()
            log.error("%s: failed: %s", r.name, r.error)
            return
        commit = (r.commit or "")[:12]
        if r.old_commit:
            log.info("%s: %s -> %s", r.name, r.old_commit[:12], commit)
        elif followed:
            log.info("%s: resolved to %s", r.name, commit)
        if r.held_by_rollback:
            log.info("%s: held at %s by `hubserve rollback` (upstream has the rolled-back-from one)", r.name, commit)
        if r.downloaded_files:
            self.metrics.bytes.inc(r.downloaded_bytes)
            self.metrics.files.inc(r.downloaded_files)
            size = human_bytes(r.downloaded_bytes)
            log.info("%s: downloaded %d file(s) / %s, verified", r.name, r.downloaded_files, size)
        if r.promoted:
            log.info("%s: promoted %s", r.name, commit)
        elif r.up_to_date and not followed:
            log.debug("%s: %s up to date", r.name, commit)

    # ---- configuration ----------------------------------------------------------------------------
    def _reload(self) -> bool:
        """Take a changed models.toml if it is valid; log an invalid one once and keep the last good one."""
        path = self.config.path
        deadline = time.monotonic() + SETTLE_MAX_S
        while (wait := unsettled_s(path)) > 0 and time.monotonic() < deadline:
            time.sleep(wait)  # just written: maybe half-way (truncated, then written in place)
        if (half_written := emptied(path, bool(self.config.manifest.models))) is not None:
            if self._config_error != str(half_written):
                self._config_error = str(half_written)
                log.error("models.toml not applied, the last good configuration stays in force: %s", half_written)
            self._config_text = None  # read again next time
            return False
        try:
            text: str | None = path.read_text(encoding="utf-8")
        except OSError:
            text = None  # an editor between unlink and rename; the watch fires again when it is back
        if text == self._config_text:
            return False
        self._config_text = text
        try:
            cfg = load_config(path, self.options.store)
        except ConfigError as e:
            self._config_error = str(e)
            log.error("models.toml not applied, the last good configuration stays in force: %s", e)
            return False
        self.config, self._config_error = cfg, None
        log.info("configuration reloaded from %s (%d model(s))", path, len(cfg.manifest.models))
        return True

    def _watch(self) -> None:
        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one INFO line per event otherwise
        path = self.config.path

        def is_config(_change: watchfiles.Change, changed: str) -> bool:
            return Path(changed).name == path.name

        try:
            for _ in watchfiles.watch(
                path.parent, watch_filter=is_config, debounce=300, recursive=False,
                stop_event=self._stop, raise_interrupt=False,
            ):
                self._pending_reload = True
                self._wake.set()
        except Exception as e:  # the daemon still checks the file every interval and on SIGHUP
            log.warning("cannot watch %s (%s); changes are picked up every interval and on SIGHUP", path, e)

    def _refresh_locked(self) -> None:
        try:
            lock = read_lock(self.config.lock_path)
        except ConfigError as e:
            log.warning("%s", e)
            return
        self._locked = {name: m.commit for name, m in lock.models.items()}

    # ---- signals ----------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self._stop.is_set():
            return
        log.info("%s: stopping", signal.Signals(signum).name)
        self._stop.set()
        self._cancel.set()
        self._wake.set()
        timer = threading.Timer(STOP_GRACE, self._force_exit)
        timer.daemon = True
        timer.start()

    @staticmethod
    def _force_exit() -> None:
        # A download stalled inside one read: leave it in the temp area. Every store write is atomic and
        # the record is written last, so exiting here never leaves a half-promoted revision.
        log.warning("a download did not stop within %gs; exiting with it left in the temp area", STOP_GRACE)
        logging.shutdown()
        os._exit(0)

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP: reloading and reconciling")
        self._pending_reload = True
        with self._lock:
            self._pending_full = "sighup"
        self._wake.set()

    # ---- what the listener asks (its threads) -----------------------------------------------------
    def webhook_secret(self) -> str | None:
        env = self.config.manifest.daemon.webhook_secret_env
        return os.environ.get(env) or None if env else None

    def on_webhook(self, event: HubEvent) -> dict[str, Any]:
        models = self.config.manifest.pinned
        if not known_repo(event, models):
            log.info("webhook for %r: not in models.toml, ignored", event.repo)
            return {"models": []}
        names = matching_models(event, models)
        # Repo and refs come from the network: logged as reprs, so they cannot forge a log line.
        log.info(
            "webhook for %r %s: %s", event.repo, list(event.refs) or "(head)",
            f"re-resolving {', '.join(sorted(names))}" if names else "no following model of that ref",
        )
        if names:
            with self._lock:
                self._pending_webhook |= names
            self._wake.set()
        return {"models": sorted(names)}

    def locked_commits(self) -> dict[str, str]:
        return dict(self._locked)

    def health(self) -> dict[str, Any]:
        cfg = self.config
        integrity = self.scrubber.health()
        ok = self._failures == 0 and self._config_error is None and not integrity["corrupt"]
        return {
            "status": "ok" if ok else "degraded",
            "config": str(cfg.path),
            "config_error": self._config_error,
            "consecutive_failures": self._failures,
            "last_success": _iso(self._last_success),
            "interval_s": self.interval,
            "integrity": integrity,
            "models": {
                m.name: {"repo": m.repo, "revision": m.revision, "follow": m.follow, "commit": self._locked.get(m.name)}
                for m in cfg.manifest.pinned
            },
        }


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts is not None else None
