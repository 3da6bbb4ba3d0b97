"""Download progress: a rich bar on a terminal, plain lines otherwise (logs, CI).

Labels and file names are printed escaped (control characters as ``\\xNN``, no rich markup), whatever
checked them before: a name must never move the cursor, clear the screen or forge a line.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from sync.paths import printable


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class DownloadProgress:
    """Thread-safe progress for one model's downloads (or another transfer: ``verbs`` name it)."""

    def __init__(
        self, label: str, total: int, files: int, console: Console | None = None,
        verbs: tuple[str, str] = ("downloading", "downloaded"),
    ) -> None:
        self.console = console or Console(stderr=True)
        self.label, self.total, self.files = printable(label, limit=200), total, files
        self.doing, self.done = verbs
        self.done_bytes = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_line = self._start  # a first line after 5 s: a quick transfer prints only start and end
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )

    def __enter__(self) -> DownloadProgress:
        if self._bar:
            self._bar.start()
            self._task = self._bar.add_task(escape(self.label), total=self.total)
        else:
            self._print(f"{self.label}: {self.doing} {self.files} file(s), {human_bytes(self.total)}")
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar:
            self._bar.stop()
        elif t is None:
            elapsed = max(time.monotonic() - self._start, 1e-6)
            self._print(
                f"{self.label}: {self.done} {human_bytes(self.done_bytes)} in {elapsed:.1f}s "
                f"({human_bytes(self.done_bytes / elapsed)}/s)"
            )

    def advance(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n
            if self._bar and self._task is not None:
                self._bar.update(self._task, completed=self.done_bytes)
            elif time.monotonic() - self._last_line > 5:
                self._last_line = time.monotonic()
                pct = 100 * self.done_bytes / self.total if self.total else 100
                self._print(f"{self.label}: {human_bytes(self.done_bytes)} / {human_bytes(self.total)} ({pct:.0f}%)")

    def file_done(self, path: str, size: int) -> None:
        if not self._bar:
            self._print(f"{self.label}: verified {printable(path)} ({human_bytes(size)})")

    def _print(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
