"""`hubserve rollback` and the lock's revision history, through the real CLI against a real mirror."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync.lock import read_lock
from sync.manifest import load_config
from sync.store import Store
from sync.syncer import Syncer
from tests.conftest import TINY_REPO, Upstream, copy_folder, hubserve
from tests.integration.test_sync import tiny_model, write_manifest

pytestmark = pytest.mark.integration


def _publish_v2(tmp_path: Path, upstream: Upstream, tiny_llama: Path, name: str = "v2") -> str:
    folder = copy_folder(tiny_llama, tmp_path / name)
    (folder / "REVISION").write_text(f"{name}\n")
    return upstream.publish(folder, TINY_REPO)


def test_rollback_pins_the_previous_revision_and_holds_against_follow(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path
) -> None:
    v1 = upstream.publish(tiny_llama, TINY_REPO)
    cfg = write_manifest(tmp_path, upstream.url, [tiny_model(follow=True)])
    lock_path = tmp_path / "models.lock"
    assert hubserve("sync", "--config", str(cfg)).returncode == 0
    nothing = hubserve("rollback", "tiny", "--config", str(cfg))
    assert nothing.returncode == 2 and "no earlier verified revision" in nothing.stderr

    v2 = _publish_v2(tmp_path, upstream, tiny_llama)
    moved = hubserve("sync", "--config", str(cfg), "--update", "tiny")
    assert moved.returncode == 0 and f"{v1[:12]} -> {v2[:12]}" in moved.stdout
    assert read_lock(lock_path).models["tiny"].history == (v1,)

    back = hubserve("rollback", "tiny", "--config", str(cfg))
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == f"tiny: {v2[:12]} -> {v1[:12]} (rolled back)"
    locked = read_lock(lock_path).models["tiny"]
    assert (locked.commit, locked.rolled_back_from, locked.history) == (v1, v2, ())
    v1_record = Store(tmp_path / "store").get_revision(TINY_REPO, v1)
    assert v1_record is not None and locked.files == v1_record.files

    # a plain sync keeps the rollback, and so does following the branch while it still points at v2
    assert hubserve("sync", "--config", str(cfg)).returncode == 0
    report = Syncer(load_config(cfg)).run(follow={"tiny"})
    assert report.ok and report.models[0].held_by_rollback
    assert read_lock(lock_path).models["tiny"].commit == v1
    # gc keeps the rolled-back-from revision too
    assert hubserve("gc", "--config", str(cfg), "--yes").returncode == 0
    assert Store(tmp_path / "store").get_revision(TINY_REPO, v2) is not None

    # once the branch moves on, following takes the new commit and forgets the rollback
    v3 = _publish_v2(tmp_path, upstream, tiny_llama, "v3")
    report = Syncer(load_config(cfg)).run(follow={"tiny"})
    assert report.ok and report.models[0].commit == v3 and report.models[0].old_commit == v1
    locked = read_lock(lock_path).models["tiny"]
    assert (locked.commit, locked.rolled_back_from, locked.history[:1]) == (v3, None, (v1,))


def test_rollback_of_a_commit_pinned_in_models_toml(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    v1 = upstream.publish(tiny_llama, TINY_REPO)
    v2 = _publish_v2(tmp_path, upstream, tiny_llama)
    cfg = write_manifest(tmp_path, upstream.url, [tiny_model(revision=v1)])
    assert hubserve("sync", "--config", str(cfg)).returncode == 0
    cfg.write_text(cfg.read_text().replace(v1, v2))
    assert hubserve("sync", "--config", str(cfg)).returncode == 0
    back = hubserve("rollback", "tiny", "--config", str(cfg))
    assert back.returncode == 0, back.stderr
    status = hubserve("status", "--config", str(cfg))
    assert v1[:12] in status.stdout and v2[:12] not in status.stdout  # the lock overrides the 40-hex pin
    assert hubserve("sync", "--config", str(cfg)).returncode == 0
    assert read_lock(tmp_path / "models.lock").models["tiny"].commit == v1
    unknown = hubserve("rollback", "nope", "--config", str(cfg))
    assert unknown.returncode == 2 and "no model named 'nope'" in unknown.stderr
