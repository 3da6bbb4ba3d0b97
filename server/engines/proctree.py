"""The processes an engine started, found through /proc, so that stopping it leaves nothing behind.

An engine runs in its own process group, and killing that group stops vLLM's workers. Some of what an
engine starts leaves the group, though: a local Ray head that vLLM starts for
``distributed_executor_backend = "ray"`` (when no ``RAY_ADDRESS`` names a cluster) puts its daemons in new
sessions. Those are still the engine's descendants, so they are collected before the engine is signalled
(afterwards they are orphans, reparented away) and killed with it. A Ray cluster the engine did not start
is never among them: its processes descend from its own raylet, not from the engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid reused by another process never matches


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> list[Proc]:
    """Every live process below ``root`` (children, grandchildren, ...), whatever its group or session."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: list[Proc] = []
    todo = [root]
    while todo:
        for proc in children.get(todo.pop(), []):
            found.append(proc)
            todo.append(proc[0])
    return found


def refresh(known: list[Proc], root: int) -> list[Proc]:
    """``known`` processes still alive plus ``root``'s current descendants: orphans of a crash stay known."""
    alive = [p for p in known if (stat := _stat(p[0])) is not None and stat[1] == p[1]]
    return list(dict.fromkeys(alive + descendants(root)))


def kill_all(procs: list[Proc]) -> None:
    """SIGKILL each process that is still the one collected (same pid and start time)."""
    for pid, started in procs:
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
