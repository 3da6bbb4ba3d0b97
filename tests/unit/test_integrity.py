"""The corrupt marker, the read pacing and the verify_interval durations (pure, on tmp disk)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sync.errors import ConfigError
from sync.integrity import Stopped, Throttle, clear_corrupt, corrupt_marks, is_corrupt, mark_corrupt, marker_path
from sync.manifest import parse_manifest
from sync.store import Store

pytestmark = pytest.mark.unit
REPO, COMMIT = "org/model", "a" * 40


def test_mark_is_durable_and_cleared(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert not is_corrupt(store, REPO, COMMIT)
    mark_corrupt(store, REPO, COMMIT, ["w.safetensors"], ["org/model@aaaaaaaaaaaa: w.safetensors: bad"])
    assert is_corrupt(store, REPO, COMMIT) and is_corrupt(tmp_path, REPO, COMMIT)  # a Store or its root
    assert not is_corrupt(store, REPO, "b" * 40) and not is_corrupt(store, "org/other", COMMIT)
    [mark] = corrupt_marks(store)
    assert (mark.repo, mark.commit, mark.files) == (REPO, COMMIT, ("w.safetensors",)) and mark.marked_at
    assert not list(marker_path(store, REPO, COMMIT).parent.glob(".*.tmp"))  # atomic: no temp file left
    assert clear_corrupt(store, REPO, COMMIT) and not clear_corrupt(store, REPO, COMMIT)
    assert not is_corrupt(store, REPO, COMMIT) and corrupt_marks(store) == []


def test_unreadable_marker_still_counts_and_bad_ids_are_not_ours(tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = marker_path(store, REPO, COMMIT)
    path.parent.mkdir(parents=True)
    path.write_text("{torn")
    assert is_corrupt(store, REPO, COMMIT)
    [mark] = corrupt_marks(store)
    assert (mark.repo, mark.commit, mark.problems) == (REPO, COMMIT, ("marker unreadable",))
    assert not is_corrupt(store, "../etc", COMMIT) and not is_corrupt(store, REPO, "main")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingStop(threading.Event):
    """A stop event whose waits advance the fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock, self.waits = clock, list[float]()

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        self.clock.now += timeout or 0.0
        return self.is_set()


def test_throttle_paces_reads_and_stops() -> None:
    clock = FakeClock()
    stop = RecordingStop(clock)
    t = Throttle(1_000_000, stop, clock)
    for _ in range(4):
        t.consume(500_000)
    assert clock.now == pytest.approx(2.0)  # 2 MB at 1 MB/s
    Throttle(None, stop, clock).consume(10**9)
    assert clock.now == pytest.approx(2.0)  # unthrottled: no wait
    stop.set()
    with pytest.raises(Stopped):
        t.consume(1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [('"7d"', 604800), ('"off"', 0), ('"0"', 0), ("0", 0), ('"12h"', 43200), ('"30m"', 1800), ("90", 90),
     ('"1w"', 604800), ('"1.5h"', 5400)],
)
def test_verify_interval_durations(text: str, seconds: float) -> None:
    assert parse_manifest(f"[daemon]\nverify_interval = {text}\n").daemon.verify_interval == seconds


def test_verify_interval_default_is_weekly_and_bad_values_name_the_key() -> None:
    assert parse_manifest("").daemon.verify_interval == 7 * 86400
    for bad in ('"weekly"', "-1", '"5y"', "true"):
        with pytest.raises(ConfigError, match=r"daemon\.verify_interval"):
            parse_manifest(f"[daemon]\nverify_interval = {bad}\n")


def test_verify_and_mark_marks_a_rotten_blob_and_clears_it_once_fixed(tmp_path: Path) -> None:
    from sync.importer import import_folder
    from sync.integrity import verify_and_mark

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / "w.safetensors").write_bytes(b"\x01" * 4096)
    store = Store(tmp_path / "store")
    rec = import_folder(store, folder, REPO).record
    blob = store.file_path(rec, "w.safetensors")
    blob.write_bytes(b"\x02" + b"\x01" * 4095)
    lines = verify_and_mark(store, rec)
    assert len(lines) == 1 and "w.safetensors" in lines[0] and lines == store.verify(rec)  # the same wording
    assert is_corrupt(store, REPO, rec.commit)
    blob.write_bytes(b"\x01" * 4096)
    assert verify_and_mark(store, rec) == [] and not is_corrupt(store, REPO, rec.commit)


def test_a_revision_removed_mid_scan_is_not_marked(tmp_path: Path) -> None:
    """gc or prune removed the revision while the (unlocked) scan read it: confirmed under the lock, not marked."""
    from sync.importer import import_folder
    from sync.integrity import check

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(b"\x01" * 4096)
    store = Store(tmp_path / "store")
    rec = import_folder(store, folder, REPO).record
    Store.remove([store.record_path(REPO, rec.commit), store.file_path(rec, "w.safetensors")])  # what gc does
    assert check(store, rec) == [] and not is_corrupt(store, REPO, rec.commit)
