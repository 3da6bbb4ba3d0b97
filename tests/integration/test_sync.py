"""hubserve sync against a real upstream (a hubserve mirror on loopback), real disk, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from sync.errors import UnsafePathError, VerificationError
from sync.importer import import_folder
from sync.lock import read_lock
from sync.manifest import load_config
from sync.paths import safe_relpath
from sync.store import Store
from sync.syncer import Syncer
from tests.conftest import MINILM_REPO, TINY_REPO, Upstream, copy_folder, hubserve
from tests.fixtures.faulty import FaultyProxy

pytestmark = pytest.mark.integration


def write_manifest(dir_: Path, endpoint: str, models: list[dict[str, object]], store: str = "store") -> Path:
    lines = [f'[store]\npath = "{store}"\n', f'[upstream]\nendpoint = "{endpoint}"\nretries = 4\n']
    for m in models:
        lines.append("[[models]]")
        for k, v in m.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path = dir_ / "models.toml"
    path.write_text("\n".join(lines))
    return path


def tiny_model(**extra: object) -> dict[str, object]:
    return {"name": "tiny", "repo": TINY_REPO, "revision": "main", **extra}


def test_sync_resolves_pin_writes_lock_and_noop_rerun(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    commit = upstream.publish(tiny_llama, TINY_REPO)
    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model()])

    first = hubserve("sync", "--config", str(cfg_path))
    assert first.returncode == 0, first.stderr
    assert commit[:12] in first.stdout and "verified" in first.stdout

    lock_text = (tmp_path / "models.lock").read_text()
    lock = read_lock(tmp_path / "models.lock")
    locked = lock.get("tiny")
    assert locked and locked.commit == commit and locked.revision == "main" and locked.repo == TINY_REPO
    by_path = {f.path: f for f in locked.files}
    assert by_path["model.safetensors"].sha256 and by_path["config.json"].git_sha1
    up_rec = upstream.store.get_revision(TINY_REPO, commit)
    assert up_rec is not None and set(by_path) == {f.path for f in up_rec.files}

    store = Store(tmp_path / "store")
    rec = store.get_revision(TINY_REPO, commit)
    assert rec is not None and store.verify(rec) == []
    assert (store.repo_dir(TINY_REPO) / "refs" / "main").read_text() == commit
    snap = store.snapshot_dir(TINY_REPO, commit)
    assert (snap / "model.safetensors").is_symlink()
    assert (snap / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()

    # Nothing changed: the second run needs no network at all (the upstream is pointed at a closed port).
    cfg_path.write_text(cfg_path.read_text().replace(upstream.url, "http://127.0.0.1:9"))
    second = hubserve("sync", "--config", str(cfg_path))
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert (tmp_path / "models.lock").read_text() == lock_text  # deterministic, untouched


def test_pin_never_moves_silently_and_update_downloads_only_changes(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path
) -> None:
    old = upstream.publish(tiny_llama, TINY_REPO)
    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model()])
    assert hubserve("sync", "--config", str(cfg_path)).returncode == 0

    changed = copy_folder(tiny_llama, tmp_path / "v2")
    (changed / "README.md").write_text("---\npipeline_tag: text-generation\n---\n# tiny llama, v2\n")
    new = upstream.publish(changed, TINY_REPO)
    assert new != old

    again = hubserve("sync", "--config", str(cfg_path))
    assert again.returncode == 0 and "up to date" in again.stdout
    assert read_lock(tmp_path / "models.lock").models["tiny"].commit == old

    cfg = load_config(cfg_path)
    report = Syncer(cfg).run(update={"tiny"})
    result = report.models[0]
    assert result.old_commit == old and result.commit == new
    readme_size = (changed / "README.md").stat().st_size
    assert result.downloaded_files == 1 and result.downloaded_bytes == readme_size
    assert read_lock(tmp_path / "models.lock").models["tiny"].commit == new

    shown = hubserve("sync", "--config", str(cfg_path), "--update", "tiny")
    assert shown.returncode == 0, shown.stderr
    assert f"{new[:12]}" in shown.stdout


def test_40hex_revision_is_used_as_is(tmp_path: Path, upstream: Upstream, tiny_llama: Path, minilm: Path) -> None:
    tiny_commit = upstream.publish(tiny_llama, TINY_REPO)
    mini_commit = upstream.publish(minilm, MINILM_REPO)
    cfg_path = write_manifest(
        tmp_path,
        upstream.url,
        [
            tiny_model(revision=tiny_commit),
            {"name": "minilm", "repo": MINILM_REPO, "revision": mini_commit, "task": "feature-extraction"},
        ],
    )
    res = hubserve("sync", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr
    lock = tomllib.loads((tmp_path / "models.lock").read_text())
    assert [m["name"] for m in lock["models"]] == ["minilm", "tiny"]  # sorted, diff-friendly
    assert {m["commit"] for m in lock["models"]} == {tiny_commit, mini_commit}


def test_store_loads_offline_with_transformers(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    commit = upstream.publish(tiny_llama, TINY_REPO)
    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model()])
    assert hubserve("sync", "--config", str(cfg_path)).returncode == 0
    script = (
        "import sys, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained('{TINY_REPO}', revision='{commit}')\n"
        f"t = transformers.AutoTokenizer.from_pretrained('{TINY_REPO}', revision='{commit}')\n"
        "ids = t('The capital of France', return_tensors='pt').input_ids\n"
        "print('OK', m.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1])\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "store"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK True" in res.stdout


def test_corrupted_upstream_file_is_never_promoted(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    commit = upstream.publish(tiny_llama, TINY_REPO)
    rec = upstream.store.get_revision(TINY_REPO, commit)
    assert rec is not None
    entry = rec.file("model.safetensors")
    assert entry is not None
    blob = upstream.store.blob_path(TINY_REPO, entry.etag)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    blob.write_bytes(bytes(data))

    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model()])
    res = hubserve("sync", "--config", str(cfg_path))
    assert res.returncode == 1
    assert "model.safetensors" in res.stderr and entry.etag in res.stderr and "expected sha256" in res.stderr
    store = Store(tmp_path / "store")
    assert store.get_revision(TINY_REPO, commit) is None
    assert not store.blob_path(TINY_REPO, entry.etag).exists()
    assert "tiny" not in read_lock(tmp_path / "models.lock").models

    with pytest.raises(VerificationError):
        Syncer(load_config(cfg_path)).upstream.download(TINY_REPO, commit, entry, tmp_path / "x.part")


def test_upstream_failing_then_recovering_is_retried(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    commit = upstream.publish(tiny_llama, TINY_REPO)
    with FaultyProxy(upstream.url) as proxy:
        proxy.faults.fail = [(503, {}), (502, {}), (429, {"Retry-After": "1"})]
        proxy.faults.resets = 1
        proxy.faults.truncate = 2
        cfg_path = write_manifest(tmp_path, proxy.url, [tiny_model()])
        started = time.monotonic()
        res = hubserve("sync", "--config", str(cfg_path))
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - started >= 1.0  # Retry-After was obeyed
        statuses = [s for _, _, s in proxy.faults.log]
        assert statuses[:3] == [503, 502, 429]
        ranged = [p for m, p, s in proxy.faults.log if s == 206]
        assert ranged, "a truncated body should be resumed with a Range request"
    store = Store(tmp_path / "store")
    rec = store.get_revision(TINY_REPO, commit)
    assert rec is not None and store.verify(rec) == []


@pytest.mark.parametrize(
    ("status", "code", "expect"),
    [
        (401, "", "token"),
        (403, "GatedRepo", "gated"),
        (404, "RepoNotFound", "not found"),
        (404, "RevisionNotFound", "revision"),
    ],
)
def test_client_errors_are_final_one_line_and_never_leak_the_token(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, status: int, code: str, expect: str
) -> None:
    upstream.publish(tiny_llama, TINY_REPO)
    secret = "hf_SeCrEt_token_value_123"
    with FaultyProxy(upstream.url) as proxy:
        proxy.faults.forbid_paths = {"/api/models/": (status, code)}
        cfg_path = write_manifest(tmp_path, proxy.url, [tiny_model()])
        res = hubserve("sync", "--config", str(cfg_path), env={"HF_TOKEN": secret})
        assert res.returncode == 1
        assert len(proxy.faults.log) == 1  # not retried
        assert proxy.faults.auth_seen == [f"Bearer {secret}"]
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1, res.stderr
    assert TINY_REPO in err_lines[0] and expect in err_lines[0].lower()
    assert secret not in res.stdout + res.stderr
    lock = tmp_path / "models.lock"
    assert not lock.exists() or secret not in lock.read_text()


def test_token_from_manifest_env_is_sent(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    upstream.publish(tiny_llama, TINY_REPO)
    with FaultyProxy(upstream.url) as proxy:
        proxy.faults.require_token = "tok-abc"
        cfg_path = write_manifest(tmp_path, proxy.url, [tiny_model()])
        cfg_path.write_text(cfg_path.read_text().replace("retries = 4", 'retries = 4\ntoken_env = "MY_TOKEN"'))
        res = hubserve("sync", "--config", str(cfg_path), env={"MY_TOKEN": "tok-abc"})
        assert res.returncode == 0, res.stderr
        assert "tok-abc" not in res.stdout + res.stderr


def test_sync_killed_mid_download_keeps_old_revision_and_resumes(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path, minilm: Path
) -> None:
    old = upstream.publish(tiny_llama, TINY_REPO)
    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model()])
    assert hubserve("sync", "--config", str(cfg_path)).returncode == 0

    # A new revision of the repo with a big new weight file.
    v2 = copy_folder(tiny_llama, tmp_path / "v2")
    shutil.copy(minilm / "model.safetensors", v2 / "model.safetensors")
    new = upstream.publish(v2, TINY_REPO)
    store = Store(tmp_path / "store")
    with FaultyProxy(upstream.url) as proxy:
        proxy.faults.bytes_per_s = 8 * 1024 * 1024
        cfg_path.write_text(cfg_path.read_text().replace(upstream.url, proxy.url))
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "sync", "--config", str(cfg_path), "--update"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        parts: list[Path] = []
        while time.monotonic() < deadline:
            parts = [p for p in store.tmp_dir.glob("*.part") if p.stat().st_size > 1024 * 1024]
            if parts:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert parts, "the download never started"
    partial = parts[0].stat().st_size
    assert store.get_revision(TINY_REPO, new) is None
    old_rec = store.get_revision(TINY_REPO, old)
    assert old_rec is not None and store.verify(old_rec) == []
    assert read_lock(tmp_path / "models.lock").models["tiny"].commit == old
    assert hubserve("status", "--config", str(cfg_path)).returncode == 0

    cfg_path.write_text(cfg_path.read_text().replace(proxy.url, upstream.url))
    report = Syncer(load_config(cfg_path)).run(update_all=True)
    assert report.ok, report.models[0].error
    result = report.models[0]
    assert result.commit == new
    assert result.downloaded_bytes == (minilm / "model.safetensors").stat().st_size  # counted from zero...
    new_rec = store.get_revision(TINY_REPO, new)
    assert new_rec is not None and store.verify(new_rec) == []
    assert partial > 0


def test_traversal_paths_from_upstream_are_rejected(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    upstream.publish(tiny_llama, TINY_REPO)
    for evil in ("../../escape.txt", "/etc/passwd", "a\\..\\b", "sub/../../x"):
        with FaultyProxy(upstream.url) as proxy:
            proxy.faults.rewrite_tree = lambda items, evil=evil: [
                {**items[0], "path": evil} if i == 0 else it for i, it in enumerate(items)
            ]
            cfg_path = write_manifest(tmp_path, proxy.url, [tiny_model()])
            res = hubserve("sync", "--config", str(cfg_path))
            assert res.returncode == 1
            assert "unsafe file path" in res.stderr
        with pytest.raises(UnsafePathError):
            safe_relpath(evil)
    assert not (tmp_path / "escape.txt").exists()
    assert Store(tmp_path / "store").revisions() == []


def test_import_rejects_symlink_escape(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("secret")
    (folder / "leak.txt").symlink_to(tmp_path / "secret.txt")
    res = hubserve("import", str(folder), "--repo", "acme/leaky", "--store", str(tmp_path / "store"))
    assert res.returncode == 1
    assert "outside" in res.stderr


def test_pickle_weights_refused_unless_opted_in(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    folder = copy_folder(tiny_llama, tmp_path / "with-bin")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle-bytes" * 100)
    commit = import_folder(upstream.store, folder, TINY_REPO, allow_pickle=True).record.commit
    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model()])
    res = hubserve("sync", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr
    assert "pytorch_model.bin" in res.stdout and "allow_pickle" in res.stdout
    store = Store(tmp_path / "store")
    rec = store.get_revision(TINY_REPO, commit)
    assert rec is not None and rec.file("pytorch_model.bin") is None

    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model(allow_pickle=True)])
    res = hubserve("sync", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr
    rec = store.get_revision(TINY_REPO, commit)
    assert rec is not None and rec.file("pytorch_model.bin") is not None

    only_bin = write_manifest(tmp_path, upstream.url, [tiny_model(include=["*.bin"])])
    res = hubserve("sync", "--config", str(only_bin))
    assert res.returncode == 1 and "allow_pickle" in res.stderr


def test_include_exclude_are_honoured(tmp_path: Path, upstream: Upstream, minilm: Path) -> None:
    commit = upstream.publish(minilm, MINILM_REPO)
    cfg_path = write_manifest(
        tmp_path,
        upstream.url,
        [
            {
                "name": "m",
                "repo": MINILM_REPO,
                "revision": commit,
                "include": ["*.json", "*.safetensors", "vocab.txt"],
                "exclude": ["data_config.json"],
            }
        ],
    )
    assert hubserve("sync", "--config", str(cfg_path)).returncode == 0
    rec = Store(tmp_path / "store").get_revision(MINILM_REPO, commit)
    assert rec is not None
    paths = {f.path for f in rec.files}
    assert "1_Pooling/config.json" in paths and "model.safetensors" in paths and "vocab.txt" in paths
    assert "data_config.json" not in paths and "README.md" not in paths


def test_verify_reports_corruption_and_gc_removes_unpinned(
    tmp_path: Path, upstream: Upstream, tiny_llama: Path
) -> None:
    old = upstream.publish(tiny_llama, TINY_REPO)
    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model()])
    assert hubserve("sync", "--config", str(cfg_path)).returncode == 0
    v2 = copy_folder(tiny_llama, tmp_path / "v2")
    (v2 / "extra.txt").write_text("new file\n")
    new = upstream.publish(v2, TINY_REPO)
    assert hubserve("sync", "--config", str(cfg_path), "--update").returncode == 0
    store = Store(tmp_path / "store")
    assert store.get_revision(TINY_REPO, old) and store.get_revision(TINY_REPO, new)

    ok = hubserve("verify", "--config", str(cfg_path))
    assert ok.returncode == 0 and "2 revision(s) verified" in ok.stdout

    kept = hubserve("gc", "--config", str(cfg_path), "--yes")  # keep_revisions = 2: the previous one stays
    assert kept.returncode == 0 and f"snapshots/{old}" not in kept.stdout
    assert store.get_revision(TINY_REPO, old) is not None
    assert read_lock(tmp_path / "models.lock").models["tiny"].history == (old,)

    cfg_path.write_text(cfg_path.read_text().replace('path = "store"', 'path = "store"\nkeep_revisions = 1'))
    dry = hubserve("gc", "--config", str(cfg_path))
    assert dry.returncode == 0 and f"would remove models--hubserve-test--tiny-llama/snapshots/{old}" in dry.stdout
    assert store.get_revision(TINY_REPO, old) is not None
    done = hubserve("gc", "--config", str(cfg_path), "--yes")
    assert done.returncode == 0, done.stderr
    assert store.get_revision(TINY_REPO, old) is None
    rec = store.get_revision(TINY_REPO, new)
    assert rec is not None and store.verify(rec) == []

    entry = rec.file("config.json")
    assert entry is not None
    blob = store.blob_path(TINY_REPO, entry.etag)
    blob.write_bytes(blob.read_bytes().replace(b"{", b"[", 1))
    bad = hubserve("verify", "--config", str(cfg_path))
    assert bad.returncode == 1 and "config.json" in bad.stderr and entry.etag in bad.stderr


def test_status_shows_states(tmp_path: Path, upstream: Upstream, tiny_llama: Path) -> None:
    commit = upstream.publish(tiny_llama, TINY_REPO)
    cfg_path = write_manifest(tmp_path, upstream.url, [tiny_model(revision=commit)])
    before = hubserve("status", "--config", str(cfg_path))
    assert before.returncode == 0 and "missing" in before.stdout
    assert hubserve("sync", "--config", str(cfg_path)).returncode == 0
    after = hubserve("status", "--config", str(cfg_path))
    assert after.returncode == 0 and "verified" in after.stdout and commit[:12] in after.stdout


def test_bad_manifest_is_exit_2_with_the_key_named(tmp_path: Path) -> None:
    cfg = tmp_path / "models.toml"
    cfg.write_text('[[models]]\nname = "a"\nrepo = "org/a"\nrevison = "main"\n')
    res = hubserve("sync", "--config", str(cfg))
    assert res.returncode == 2
    assert "revison" in res.stderr and "models[0] (a)" in res.stderr and str(cfg) in res.stderr
    cfg.write_text('[[models]]\nname = "a"\nrepo = "not a repo"\n')
    res = hubserve("sync", "--config", str(cfg))
    assert res.returncode == 2 and "repo" in res.stderr and "'not a repo'" in res.stderr


def test_cli_import_prints_commit(tmp_path: Path, tiny_llama: Path) -> None:
    res = hubserve("import", str(tiny_llama), "--repo", TINY_REPO, "--store", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    commit = res.stdout.strip()
    assert len(commit) == 40
    again = hubserve("import", str(tiny_llama), "--repo", TINY_REPO, "--store", str(tmp_path / "s"))
    assert again.stdout.strip() == commit  # same bytes, same commit
    assert Store(tmp_path / "s").get_revision(TINY_REPO, commit) is not None
