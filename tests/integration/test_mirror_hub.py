"""The mirror as the inside network's Hub: the stock ``HfApi`` discovers, describes and lists models, ``hf download``
and transformers' ``from_pretrained`` pull them, and ``hf cache ls`` reads the store. A store synced from a mirror and
the same store carried across an air gap as a bundle give the same answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sync.bundle import export_bundle, import_bundle, plan_export
from sync.importer import import_folder
from sync.lock import read_lock
from sync.manifest import load_config
from sync.mirror import MirrorServer, make_mirror
from sync.store import Store
from sync.syncer import Syncer
from tests.conftest import MINILM_REPO, TINY_REPO

pytestmark = pytest.mark.integration

SMALL = "acme/small-cards"
PAGE_SIZE = 2  # three models: list_models must follow a Link page
HF = str(Path(sys.executable).with_name("hf"))


def write_small(folder: Path) -> Path:
    files = {
        "README.md": "---\npipeline_tag: text-classification\nlibrary_name: acme-lib\nlicense: mit\ndate: 2024-01-02\n"
                     "language: [en, fr]\ntags: [sentiment, tiny]\n---\n# Small cards\nA model card.\n",
        "config.json": '{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}\n',
        "weights/model.safetensors": "x" * 1000,
        "nested/a.txt": "a\n",
    }
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def serve(store: Store) -> tuple[MirrorServer, str]:
    server = make_mirror(store, "127.0.0.1", 0, page_size=PAGE_SIZE)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@dataclass
class Sites:
    synced: Store
    imported: Store
    synced_url: str
    imported_url: str
    commits: dict[str, str]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, minilm: Path) -> Iterator[Sites]:
    base = tmp_path_factory.mktemp("hub")
    upstream = Store(base / "upstream")
    commits = {
        TINY_REPO: import_folder(upstream, tiny_llama, TINY_REPO).record.commit,
        MINILM_REPO: import_folder(upstream, minilm, MINILM_REPO).record.commit,
        SMALL: import_folder(upstream, write_small(base / "small"), SMALL, refs=("main", "v1.0")).record.commit,
    }
    servers = []
    server, url = serve(upstream)
    servers.append(server)
    text = f'[store]\npath = "store"\n[upstream]\nendpoint = "{url}"\n'
    for name, repo, rev in (("tiny", TINY_REPO, "main"), ("minilm", MINILM_REPO, "main"), ("small", SMALL, "v1.0")):
        text += f'[[models]]\nname = "{name}"\nrepo = "{repo}"\nrevision = "{rev}"\n'
    (base / "models.toml").write_text(text)
    assert Syncer(load_config(base / "models.toml")).run().ok
    synced = Store(base / "store")
    synced.write_ref(SMALL, "main", commits[SMALL])  # a branch and a tag on one commit
    export_bundle(synced, plan_export(synced, read_lock(base / "models.lock"), None, None), base / "b.tar")
    imported = Store(base / "imported")
    import_bundle(imported, [base / "b.tar"])
    imported.write_ref(SMALL, "main", commits[SMALL])
    server_s, synced_url = serve(synced)
    server_i, imported_url = serve(imported)
    servers += [server_s, server_i]
    try:
        yield Sites(synced, imported, synced_url, imported_url, commits)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


SCENARIO = r"""
import json, sys
from huggingface_hub import HfApi, ModelCard, scan_cache_dir
a = json.loads(sys.argv[1])
api = HfApi(endpoint=a["endpoint"])
ids = lambda it: [m.id for m in it]
out = {
  "all": ids(api.list_models()),
  "search": ids(api.list_models(search="MINI")),
  "author": ids(api.list_models(author="acme")),
  "filter_task": ids(api.list_models(filter="text-generation")),
  "filter_library": ids(api.list_models(filter="sentence-transformers")),
  "filter_two": ids(api.list_models(filter=["bert", "sentiment"])),
  "filter_license": ids(api.list_models(filter="license:mit")),
  "pipeline_tag": ids(api.list_models(pipeline_tag="text-classification")),
  "sort_id": ids(api.list_models(sort="id")),
  "limit": ids(api.list_models(limit=1)),
  "full": sorted(len(m.siblings or []) for m in api.list_models(full=True)),
}
listed = {m.id: m for m in api.list_models()}
out["listed_tags"] = {k: m.tags for k, m in listed.items()}
out["listed_task"] = {k: m.pipeline_tag for k, m in listed.items()}
for repo in a["repos"]:
    info = api.model_info(repo, files_metadata=True)
    out[repo] = {
        "sha": info.sha, "pipeline_tag": info.pipeline_tag, "tags": info.tags, "library_name": info.library_name,
        "has_last_modified": info.last_modified is not None,
        "siblings": [(s.rfilename, s.size, s.blob_id, s.lfs.sha256 if s.lfs else None) for s in info.siblings],
        "files": api.list_repo_files(repo),
        "refs": (lambda r: {k: sorted((x.name, x.ref, x.target_commit) for x in getattr(r, k))
                            for k in ("branches", "tags", "converts", "pull_requests")})(
            api.list_repo_refs(repo, include_pull_requests=True)),
        "card": ModelCard.load(repo, token=False).data.to_dict() if "README.md" in api.list_repo_files(repo) else None,
    }
info = api.get_paths_info(a["small"], ["config.json", "nested", "weights/model.safetensors", "missing.txt"])
out["paths_info"] = [(type(i).__name__, i.path, getattr(i, "size", None), getattr(i, "lfs", None) is not None)
                     for i in info]
print(json.dumps(out, default=str))  # card data may hold YAML dates
"""


def run_scenario(url: str) -> dict[str, Any]:
    args = json.dumps({"endpoint": url, "repos": [TINY_REPO, MINILM_REPO, SMALL], "small": SMALL})
    env = {**os.environ, "HF_ENDPOINT": url}  # ModelCard.load reads it; nothing may reach the public Hub
    res = subprocess.run([sys.executable, "-c", SCENARIO, args], capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(json.loads(res.stdout))


@pytest.fixture(scope="module")
def answers(sites: Sites) -> dict[str, dict[str, Any]]:
    return {"synced": run_scenario(sites.synced_url), "imported": run_scenario(sites.imported_url)}


def test_list_models_filters_sort_and_pages(answers: dict[str, dict[str, Any]]) -> None:
    got = answers["synced"]
    assert got["all"] == sorted([TINY_REPO, MINILM_REPO, SMALL])  # three models over pages of two
    assert got["search"] == [MINILM_REPO]
    assert got["author"] == [SMALL]
    assert got["filter_task"] == [TINY_REPO]
    assert got["filter_library"] == [MINILM_REPO]
    assert got["filter_two"] == [SMALL]
    assert got["filter_license"] == [SMALL]
    assert got["pipeline_tag"] == [SMALL]
    assert got["sort_id"] == sorted([TINY_REPO, MINILM_REPO, SMALL], reverse=True)  # the Hub sorts descending
    assert got["limit"] == [SMALL]
    assert got["full"] == [4, 7, 13]
    assert got["listed_task"] == {TINY_REPO: "text-generation", MINILM_REPO: "sentence-similarity",
                                  SMALL: "text-classification"}


def test_model_info_refs_files_card_and_paths_info(answers: dict[str, dict[str, Any]], sites: Sites) -> None:
    small = answers["synced"][SMALL]
    assert small["sha"] == sites.commits[SMALL] and small["has_last_modified"]
    assert small["pipeline_tag"] == "text-classification" and small["library_name"] == "acme-lib"
    assert small["tags"] == ["acme-lib", "safetensors", "bert", "text-classification", "sentiment", "tiny", "en",
                             "fr", "license:mit"]
    assert small["files"] == ["README.md", "config.json", "nested/a.txt", "weights/model.safetensors"]
    assert tuple(small["siblings"][-1][:2]) == ("weights/model.safetensors", 1000) and small["siblings"][-1][3]
    assert small["refs"] == {
        "branches": [["main", "refs/heads/main", sites.commits[SMALL]]],
        "tags": [["v1.0", "refs/tags/v1.0", sites.commits[SMALL]]], "converts": [], "pull_requests": [],
    }
    assert small["card"]["license"] == "mit" and small["card"]["tags"] == ["sentiment", "tiny"]
    assert answers["synced"]["paths_info"] == [
        ["RepoFile", "config.json", 75, False], ["RepoFolder", "nested", None, False],
        ["RepoFile", "weights/model.safetensors", 1000, True],
    ]
    tiny = answers["synced"][TINY_REPO]
    assert tiny["library_name"] == "transformers" and tiny["tags"][:4] == ["transformers", "safetensors", "llama",
                                                                          "text-generation"]
    assert answers["synced"][MINILM_REPO]["library_name"] == "sentence-transformers"


def test_imported_store_answers_like_the_synced_one(answers: dict[str, dict[str, Any]]) -> None:
    assert answers["imported"] == answers["synced"]


def test_hf_download_and_from_pretrained_against_the_mirror(sites: Sites, tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": sites.imported_url, "HF_HUB_DISABLE_TELEMETRY": "1"}
    res = subprocess.run([HF, "download", TINY_REPO, "--cache-dir", str(tmp_path / "hf"), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    snap = Path(res.stdout.strip().splitlines()[-1])
    assert snap.name == sites.commits[TINY_REPO]
    src = sites.synced.snapshot_dir(TINY_REPO, sites.commits[TINY_REPO])
    for f in src.iterdir():
        assert (snap / f.name).read_bytes() == f.read_bytes()

    script = (
        "import sys, transformers as t\n"
        f"tok = t.AutoTokenizer.from_pretrained('{TINY_REPO}', cache_dir=sys.argv[1])\n"
        f"m = t.AutoModelForCausalLM.from_pretrained('{TINY_REPO}', cache_dir=sys.argv[1])\n"
        "ids = tok('The capital of France', return_tensors='pt').input_ids\n"
        "print('OK', m.generate(ids, max_new_tokens=2, do_sample=False).shape[1] > ids.shape[1])\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tf")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0 and "OK True" in res.stdout, res.stderr[-3000:]


def test_hf_cache_ls_and_scan_read_the_store(sites: Sites) -> None:
    res = subprocess.run([HF, "cache", "ls", "--cache-dir", str(sites.imported.root), "--json", "--show-warnings"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    listed = {r["repo_id"]: sorted(r["refs"]) for r in json.loads(res.stdout)}
    assert listed == {TINY_REPO: ["main"], MINILM_REPO: ["main"], SMALL: ["main", "v1.0"]}
    # hubserve's records sit beside the repos; the tools skip that folder and say so, nothing else.
    warnings = [line for line in res.stderr.splitlines() if "Warning" in line]
    assert all("/.hubserve" in w for w in warnings), warnings
    script = ("import sys; from huggingface_hub import scan_cache_dir; i = scan_cache_dir(sys.argv[1]); "
              "print(sorted((r.repo_id, sorted(x.commit_hash for x in r.revisions)) for r in i.repos))")
    res = subprocess.run([sys.executable, "-c", script, str(sites.imported.root)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = sorted((r, [c]) for r, c in sites.commits.items())
    assert res.stdout.strip() == str(expected)


def test_mirror_workers_share_the_port_and_stop_together(sites: Sites) -> None:
    import psutil

    from bench.bench_sync import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "mirror", "--store", str(sites.imported.root),
                             "--port", str(port), "--workers", "3"], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            children = psutil.Process(proc.pid).children()
            try:
                with urllib.request.urlopen(url + "/api/models", timeout=2) as r:
                    listed = json.load(r)
                if len(children) == 2:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert len(children) == 2 and [m["id"] for m in listed] == sorted(sites.commits)
        for _ in range(20):  # connections land on any of the three processes; all answer the same
            with urllib.request.urlopen(f"{url}/{TINY_REPO}/resolve/main/config.json", timeout=5) as r:
                assert r.headers["X-Repo-Commit"] == sites.commits[TINY_REPO]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
