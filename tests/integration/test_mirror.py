"""``hubserve mirror`` on loopback, driven by the stock ``huggingface_hub`` clients (2.x here, 1.x in a side
venv) and by raw ``http.client`` requests whose paths nobody normalises. Real store, real files, no mocks."""

from __future__ import annotations

import filecmp
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from sync.importer import import_folder
from sync.mirror import MirrorServer, make_mirror
from sync.store import RevisionRecord, Store
from tests.fixtures.tiny import minilm_dir

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = "acme/small"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TAGGED = "acme/tagged"  # only ever imported under ref v1: `main` must still resolve
GHOST = "acme/ghost"  # blobs and snapshot on disk, record deleted: must not exist for clients
TOKEN = "s3cret-mirror-token"
PAGE_SIZE = 3  # small, so that every client listing follows several `Link: rel="next"` pages
# Older clients in side venvs made once under .cache/ (gitignored): 1.x lists files with trees, 0.x with siblings.
SIDE_CLIENTS = {"hfhub1": "huggingface_hub>=1.30,<2", "hfhub0": "huggingface_hub>=0.36,<1"}


def write_small_repo(folder: Path, extra: dict[str, bytes] | None = None) -> Path:
    files = {
        "config.json": b'{"model_type": "bert"}\n',
        "README.md": b"---\npipeline_tag: feature-extraction\nlibrary_name: acme-lib\ntags: [a, b]\n---\n# small\n",
        "nested/dir/file.txt": b"hello from a nested dir\n",
        "nested/other.json": b"{}\n",
        "weights/model.safetensors": os.urandom(300_000),  # LFS by suffix
        "docs/naïve name #1.txt": b"spaces, a hash and non-ASCII in a path\n",
        "docs/empty.txt": b"",
        **(extra or {}),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


@dataclass
class Seeded:
    store: Store
    small: RevisionRecord
    pr: RevisionRecord  # acme/small at refs/pr/1 only
    minilm: RevisionRecord
    tagged: RevisionRecord
    hidden_commit: str  # a commit of acme/small whose record was deleted


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    base = tmp_path_factory.mktemp("mirror")
    store = Store(base / "store")
    store.ensure()
    small = import_folder(store, write_small_repo(base / "small"), SMALL).record
    pr = import_folder(store, write_small_repo(base / "pr", {"pr-only.txt": b"pr\n"}), SMALL, refs=()).record
    store.write_ref(SMALL, "refs/pr/1", pr.commit)
    hidden = import_folder(store, write_small_repo(base / "hidden", {"h.txt": b"h\n"}), SMALL, refs=()).record
    store.record_path(SMALL, hidden.commit).unlink()
    ghost = import_folder(store, write_small_repo(base / "ghost"), GHOST).record
    store.record_path(GHOST, ghost.commit).unlink()
    tagged = import_folder(store, write_small_repo(base / "tagged"), TAGGED, refs=("v1",)).record
    minilm = import_folder(store, minilm_dir(), MINILM).record
    return Seeded(store, small, pr, minilm, tagged, hidden.commit)


def start(server: MirrorServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def mirror(seeded: Seeded) -> Iterator[tuple[MirrorServer, str]]:
    server = make_mirror(seeded.store, "127.0.0.1", 0, page_size=PAGE_SIZE)
    url = start(server)
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def token_mirror(seeded: Seeded) -> Iterator[str]:
    server = make_mirror(seeded.store, "127.0.0.1", 0, token=TOKEN)
    url = start(server)
    yield url
    server.shutdown()
    server.server_close()


# ---- the stock clients, each in its own interpreter (HF_ENDPOINT is read at import time) -----------------
SCENARIO = r"""
import json, sys
a = json.loads(sys.argv[1])
import huggingface_hub as hh
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.hf_api import RepoFile

ep, cache = a["endpoint"], a["cache"]
api = HfApi(endpoint=ep)

def err(fn):
    try:
        fn()
    except Exception as e:
        return [c.__name__ for c in type(e).__mro__]
    return None

def entry(e):
    if isinstance(e, RepoFile):
        lfs = [e.lfs.sha256, e.lfs.size, e.lfs.pointer_size] if e.lfs else None
        return {"type": "file", "path": e.path, "size": e.size, "oid": e.blob_id, "lfs": lfs}
    return {"type": "directory", "path": e.path, "oid": e.tree_id}

out = {"version": hh.__version__}
out["snap_main"] = snapshot_download(a["small"], cache_dir=cache, endpoint=ep)
out["snap_commit"] = snapshot_download(a["minilm"], revision=a["minilm_commit"], cache_dir=cache, endpoint=ep)
out["pr_file"] = hf_hub_download(a["small"], "pr-only.txt", revision="refs/pr/1", cache_dir=cache, endpoint=ep)
out["lfs_file"] = hf_hub_download(a["small"], "weights/model.safetensors", cache_dir=a["cache2"], endpoint=ep)
out["tagged_v1"] = snapshot_download(a["tagged"], revision="v1", cache_dir=cache, endpoint=ep)
info = api.model_info(a["small"])
out["info"] = {"id": info.id, "sha": info.sha, "pipeline_tag": info.pipeline_tag, "tags": info.tags,
               "library_name": info.library_name, "siblings": sorted(s.rfilename for s in info.siblings)}
info = api.model_info(a["minilm"], files_metadata=True)
out["info_meta"] = {s.rfilename: {"size": s.size, "blob_id": s.blob_id,
                                  "lfs": [s.lfs.sha256, s.lfs.size, s.lfs.pointer_size] if s.lfs else None}
                    for s in info.siblings}
out["info_pr"] = api.model_info(a["small"], revision="refs/pr/1").sha
out["info_tagged_main"] = api.model_info(a["tagged"]).sha
out["tree"] = [entry(e) for e in api.list_repo_tree(a["minilm"], recursive=True)]
out["tree_root"] = [entry(e) for e in api.list_repo_tree(a["small"])]
out["tree_nested"] = [entry(e) for e in api.list_repo_tree(a["small"], path_in_repo="nested")]
fresh = a["cache3"]
out["errors"] = {
    "repo": err(lambda: hf_hub_download("acme/nope", "config.json", cache_dir=fresh, endpoint=ep)),
    "revision": err(lambda: hf_hub_download(a["small"], "config.json", revision="nope", cache_dir=fresh,
                                            endpoint=ep)),
    "entry": err(lambda: hf_hub_download(a["small"], "missing.txt", cache_dir=fresh, endpoint=ep)),
    "ghost_info": err(lambda: api.model_info(a["ghost"])),
    "ghost_snapshot": err(lambda: snapshot_download(a["ghost"], cache_dir=fresh, endpoint=ep)),
    "hidden_info": err(lambda: api.model_info(a["small"], revision=a["hidden"])),
    "hidden_download": err(lambda: hf_hub_download(a["small"], "h.txt", revision=a["hidden"], cache_dir=fresh,
                                                   endpoint=ep)),
}
tep = a["token_endpoint"]
out["token_ok"] = snapshot_download(a["small"], cache_dir=a["cache_tok"], endpoint=tep, token=a["token"])
out["token_info"] = HfApi(endpoint=tep, token=a["token"]).model_info(a["small"]).sha
out["token_missing"] = err(lambda: hf_hub_download(a["small"], "config.json", cache_dir=fresh, endpoint=tep,
                                                   token=False))
out["token_wrong"] = err(lambda: HfApi(endpoint=tep, token="wrong").model_info(a["small"]))
print(json.dumps(out))
"""


def run_client(python: str, seeded: Seeded, mirror_url: str, token_url: str, tmp: Path) -> dict[str, Any]:
    """Run SCENARIO in ``python`` against the mirror; the client's own outputs come back as JSON."""
    args = {
        "endpoint": mirror_url,
        "token_endpoint": token_url,
        "token": TOKEN,
        "small": SMALL,
        "minilm": MINILM,
        "tagged": TAGGED,
        "ghost": GHOST,
        "minilm_commit": seeded.minilm.commit,
        "hidden": seeded.hidden_commit,
        **{k: str(tmp / k) for k in ("cache", "cache2", "cache3", "cache_tok")},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=mirror_url,
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_CACHE=str(tmp / "cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="30",
    )
    res = subprocess.run(
        [python, "-c", SCENARIO, json.dumps(args)], capture_output=True, text=True, env=env, timeout=180
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def side_python(name: str) -> str:
    """The interpreter of side venv ``name`` (built with uv on first use; skipped if it cannot be built)."""
    venv = REPO_ROOT / ".cache" / f"{name}-venv"
    python = venv / "bin" / "python"
    spec = SIDE_CLIENTS[name]
    probe = [str(python), "-c", f"import huggingface_hub as h; assert h.__version__.startswith('{name[-1]}.')"]
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{venv}.lock", timeout=300):
        if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
            return str(python)
        steps = [
            ["uv", "venv", "-q", "--clear", "--python", sys.executable, str(venv)],
            ["uv", "pip", "install", "-q", "--python", str(python), spec],
        ]
        for cmd in steps:
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            except (OSError, subprocess.TimeoutExpired) as e:
                pytest.skip(f"cannot build a venv with {spec}: {e}")
            if res.returncode != 0:
                pytest.skip(f"cannot build a venv with {spec}: {res.stderr.strip()[-500:]}")
    return str(python)


@pytest.fixture(scope="module", params=["hfhub2", "hfhub1", "hfhub0"])
def client(
    request: pytest.FixtureRequest,
    seeded: Seeded,
    mirror: tuple[MirrorServer, str],
    token_mirror: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """What one client version saw: the project's own huggingface_hub (2.x), then the side venvs."""
    python = sys.executable if request.param == "hfhub2" else side_python(request.param)
    out = run_client(python, seeded, mirror[1], token_mirror, tmp_path_factory.mktemp(request.param))
    assert out["version"].startswith(f"{request.param[-1]}."), out["version"]
    return out


def assert_snapshot_matches(snap: Path, store: Store, record: RevisionRecord) -> None:
    """Byte-identical files, laid out as the client's cache: snapshots/<commit>/… → ../../blobs/<our etag>."""
    assert snap.name == record.commit and snap.parent.name == "snapshots"
    repo_cache = snap.parent.parent
    for entry in record.files:
        link = snap / entry.path
        assert link.is_symlink(), entry.path
        assert not os.path.isabs(os.readlink(link))
        assert link.resolve() == (repo_cache / "blobs" / entry.etag).resolve(), entry.path
        assert filecmp.cmp(link, store.file_path(record, entry.path), shallow=False), entry.path
    on_disk = {p.relative_to(snap).as_posix() for p in snap.rglob("*") if not p.is_dir()}
    assert on_disk == {f.path for f in record.files}


def test_snapshot_download_by_main_and_by_commit(client: dict[str, Any], seeded: Seeded) -> None:
    assert_snapshot_matches(Path(client["snap_main"]), seeded.store, seeded.small)
    assert_snapshot_matches(Path(client["snap_commit"]), seeded.store, seeded.minilm)
    refs_main = Path(client["snap_main"]).parents[1] / "refs" / "main"
    assert refs_main.read_text() == seeded.small.commit


def test_hf_hub_download_files_refs_and_tags(client: dict[str, Any], seeded: Seeded) -> None:
    pr_file = Path(client["pr_file"])
    assert pr_file.read_bytes() == b"pr\n" and pr_file.parent.name == seeded.pr.commit
    lfs = Path(client["lfs_file"])
    entry = seeded.small.file("weights/model.safetensors")
    assert entry is not None and lfs.resolve().name == entry.sha256
    assert lfs.read_bytes() == seeded.store.file_path(seeded.small, entry.path).read_bytes()
    assert_snapshot_matches(Path(client["tagged_v1"]), seeded.store, seeded.tagged)


def test_model_info(client: dict[str, Any], seeded: Seeded) -> None:
    info = client["info"]
    assert info["id"] == SMALL and info["sha"] == seeded.small.commit
    assert info["siblings"] == sorted(f.path for f in seeded.small.files)
    assert info["pipeline_tag"] == "feature-extraction" and info["library_name"] == "acme-lib"
    assert info["tags"] == ["acme-lib", "safetensors", "bert", "feature-extraction", "a", "b"]  # Hub-style
    meta = client["info_meta"]
    assert set(meta) == {f.path for f in seeded.minilm.files}
    for f in seeded.minilm.files:
        assert meta[f.path]["size"] == f.size and meta[f.path]["blob_id"] == f.oid
        assert meta[f.path]["lfs"] == ([f.sha256, f.size, f.pointer_size] if f.lfs else None)
    assert meta["model.safetensors"]["lfs"] is not None
    assert client["info_pr"] == seeded.pr.commit
    assert client["info_tagged_main"] == seeded.tagged.commit  # `main` falls back to the newest verified


def test_list_repo_tree_paginated(client: dict[str, Any], seeded: Seeded) -> None:
    tree = client["tree"]
    assert len(tree) > PAGE_SIZE  # the client followed the Link pages
    files = {e["path"]: e for e in tree if e["type"] == "file"}
    assert set(files) == {f.path for f in seeded.minilm.files}
    assert [e["path"] for e in tree if e["type"] == "directory"] == ["1_Pooling"]
    for f in seeded.minilm.files:
        got = files[f.path]
        assert got["size"] == f.size and got["oid"] == f.oid
        assert got["lfs"] == ([f.sha256, f.size, f.pointer_size] if f.lfs else None)
    root = {e["path"]: e["type"] for e in client["tree_root"]}
    assert root == {
        "config.json": "file",
        "README.md": "file",
        "docs": "directory",
        "nested": "directory",
        "weights": "directory",
    }
    assert {e["path"] for e in client["tree_nested"]} == {"nested/dir", "nested/other.json"}


def test_errors_map_to_the_clients_exceptions(client: dict[str, Any]) -> None:
    errors = client["errors"]
    assert "RepositoryNotFoundError" in errors["repo"]
    assert "RevisionNotFoundError" in errors["revision"]
    assert "EntryNotFoundError" in errors["entry"]
    # Revisions without a record do not exist, whatever is on disk.
    assert "RepositoryNotFoundError" in errors["ghost_info"]
    assert "RepositoryNotFoundError" in errors["ghost_snapshot"]
    assert "RevisionNotFoundError" in errors["hidden_info"]
    assert "RevisionNotFoundError" in errors["hidden_download"]


def test_bearer_token(client: dict[str, Any], seeded: Seeded) -> None:
    assert_snapshot_matches(Path(client["token_ok"]), seeded.store, seeded.small)
    assert client["token_info"] == seeded.small.commit
    assert "RepositoryNotFoundError" in client["token_missing"]
    assert "RepositoryNotFoundError" in client["token_wrong"]


# ---- raw HTTP: what exactly goes over the wire ---------------------------------------------------------
def raw(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with ``path`` sent verbatim (http.client does not normalise ``..``)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def no_xet(headers: dict[str, str]) -> None:
    assert not [k for k in headers if k.startswith("x-xet")]
    assert "xet" not in headers.get("link", "")


def test_head_headers_regular_and_lfs(mirror: tuple[MirrorServer, str], seeded: Seeded) -> None:
    url, rec = mirror[1], seeded.small
    regular, lfs = rec.file("config.json"), rec.file("weights/model.safetensors")
    assert regular is not None and lfs is not None
    status, h, body = raw(url, "HEAD", f"/{SMALL}/resolve/main/config.json")
    assert status == 200 and body == b""
    assert h["x-repo-commit"] == rec.commit and h["etag"] == f'"{regular.git_sha1}"'
    assert h["content-length"] == str(regular.size) and h["accept-ranges"] == "bytes"
    assert h["content-type"] == "application/json" and "config.json" in h["content-disposition"]
    assert "x-linked-etag" not in h and "location" not in h
    no_xet(h)
    status, h, _ = raw(url, "HEAD", f"/{SMALL}/resolve/{rec.commit}/weights/model.safetensors")
    assert status == 200 and h["etag"] == f'"{lfs.sha256}"' and h["x-linked-etag"] == f'"{lfs.sha256}"'
    assert h["x-linked-size"] == h["content-length"] == str(lfs.size)
    no_xet(h)
    status, h, body = raw(url, "GET", f"/models/{SMALL}/resolve/main/nested/dir/file.txt")  # the alias
    assert status == 200 and body == b"hello from a nested dir\n"
    status, h, body = raw(url, "GET", f"/{SMALL}/resolve/main/docs/na%C3%AFve%20name%20%231.txt")
    assert status == 200 and body.startswith(b"spaces") and "na%C3%AFve%20name%20%231.txt" in h["content-disposition"]
    status, h, body = raw(url, "GET", f"/{SMALL}/resolve/main/docs/empty.txt")
    assert status == 200 and body == b"" and h["content-length"] == "0"
    assert raw(url, "GET", f"/{SMALL}/resolve/main/docs/empty.txt", {"Range": "bytes=0-"})[0] == 416
    status, h, body = raw(url, "GET", f"/{SMALL}/resolve/refs/pr/1/pr-only.txt")  # unencoded ref
    assert status == 200 and body == b"pr\n" and h["x-repo-commit"] == seeded.pr.commit


def test_range_requests(mirror: tuple[MirrorServer, str], seeded: Seeded) -> None:
    url, rec = mirror[1], seeded.small
    path = f"/{SMALL}/resolve/main/weights/model.safetensors"
    data = seeded.store.file_path(rec, "weights/model.safetensors").read_bytes()
    size = len(data)
    status, h, body = raw(url, "GET", path, {"Range": "bytes=1000-"})
    assert status == 206 and body == data[1000:] and h["content-range"] == f"bytes 1000-{size - 1}/{size}"
    assert h["content-length"] == str(size - 1000)
    status, h, body = raw(url, "GET", path, {"Range": "bytes=10-19"})
    assert status == 206 and body == data[10:20] and h["content-range"] == f"bytes 10-19/{size}"
    status, _, body = raw(url, "GET", path, {"Range": "bytes=-5"})
    assert status == 206 and body == data[-5:]
    status, h, _ = raw(url, "GET", path, {"Range": f"bytes={size}-"})
    assert status == 416 and h["content-range"] == f"bytes */{size}"
    status, _, body = raw(url, "GET", path, {"Range": "bytes=5-1"})  # malformed: ignored, whole file
    assert status == 200 and body == data
    status, _, body = raw(url, "GET", path, {"Range": "bytes=0-", "If-Range": '"not-this-file"'})
    assert status == 200 and body == data


def test_error_headers_and_bodies(mirror: tuple[MirrorServer, str], seeded: Seeded) -> None:
    url = mirror[1]
    cases = [
        ("/acme/nope/resolve/main/config.json", "RepoNotFound"),
        (f"/{SMALL}/resolve/nope/config.json", "RevisionNotFound"),
        (f"/{SMALL}/resolve/{seeded.hidden_commit}/h.txt", "RevisionNotFound"),
        (f"/{GHOST}/resolve/main/config.json", "RepoNotFound"),
        (f"/{SMALL}/resolve/main/h.txt", "EntryNotFound"),
        (f"/api/models/{SMALL}/tree/main/no-such-dir", "EntryNotFound"),
        ("/api/models/acme/nope/revision/main", "RepoNotFound"),
    ]
    for path, code in cases:
        for method in ("GET", "HEAD"):
            status, h, body = raw(url, method, path)
            assert status == 404 and h["x-error-code"] == code, (method, path, h)
            assert h["x-error-message"]
            if method == "GET":
                assert json.loads(body)["error"] == h["x-error-message"]
            if code == "EntryNotFound":
                assert h["x-repo-commit"] == seeded.small.commit
    status, h, body = raw(url, "GET", "/no/such/route/here")
    assert status == 404 and "error" in json.loads(body)
    for method in ("POST", "PUT", "DELETE"):
        status, h, _ = raw(url, method, f"/{SMALL}/resolve/main/config.json")
        assert status == 405 and h["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "path",
    [
        f"/{SMALL}/resolve/main/../../../../etc/passwd",
        f"/{SMALL}/resolve/main/nested/../../../store",
        f"/{SMALL}/resolve/main/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/{SMALL}/resolve/main/nested%2f..%2f..%2f..%2fetc%2fpasswd",
        f"/{SMALL}/resolve/main/%2fetc%2fpasswd",
        f"/{SMALL}/resolve/main/nested%5c..%5cconfig.json",
        f"/{SMALL}/resolve/main/config.json%00.txt",
        f"/{SMALL}/resolve/main/./config.json",
        "/../../etc/resolve/main/passwd",
        "/%2e%2e/%2e%2e/resolve/main/etc/passwd",
        f"/api/models/{SMALL}/tree/main/..%2f..%2f..",
        f"/api/models/{SMALL}/tree/main/../..",
    ],
)
def test_path_traversal_is_refused(mirror: tuple[MirrorServer, str], path: str) -> None:
    status, h, body = raw(mirror[1], "GET", path)
    assert status in (400, 404), (path, status)
    assert "error" in json.loads(body) and h["x-error-message"]
    assert b"root:" not in body


def test_tree_pagination_on_the_wire(mirror: tuple[MirrorServer, str], seeded: Seeded) -> None:
    url = mirror[1]
    status, h, body = raw(url, "GET", f"/api/models/{MINILM}/tree/main?recursive=true&expand=false")
    pages, seen = [json.loads(body)], [h]
    while "link" in h:
        assert h["link"].startswith(f"<{url}/api/models/{MINILM}/tree/{seeded.minilm.commit}?")
        assert h["link"].endswith('>; rel="next"')
        status, h, body = raw(url, "GET", h["link"][1:].split(">")[0].removeprefix(url))
        assert status == 200
        pages.append(json.loads(body))
        seen.append(h)
    assert all(len(p) <= PAGE_SIZE for p in pages) and len(pages) > 2
    entries = [e for p in pages for e in p]
    assert len({e["path"] for e in entries}) == len(entries) == len(seeded.minilm.files) + 1
    assert b"xetHash" not in json.dumps(entries).encode()
    directory = next(e for e in entries if e["type"] == "directory")
    assert directory["size"] == 0 and len(directory["oid"]) == 40
    status, _, body = raw(url, "GET", f"/api/models/{SMALL}/tree/main/nested?recursive=true")
    assert {e["path"] for e in json.loads(body)} == {"nested/dir", "nested/dir/file.txt", "nested/other.json"}


def test_api_routes_and_encoded_refs(mirror: tuple[MirrorServer, str], seeded: Seeded) -> None:
    url = mirror[1]
    status, _, body = raw(url, "GET", f"/api/models/{SMALL}/revision/refs%2Fpr%2F1")
    assert status == 200 and json.loads(body)["sha"] == seeded.pr.commit
    status, h, body = raw(url, "GET", f"/api/models/{SMALL}/tree/refs/pr/1")  # unencoded, as the Hub allows
    assert status == 200 and h["x-repo-commit"] == seeded.pr.commit and json.loads(body)
    status, _, body = raw(url, "GET", f"/api/models/{SMALL}/tree/main?cursor=-3")
    assert status == 400 and "cursor" in json.loads(body)["error"]
    status, _, body = raw(url, "GET", f"/api/models/{SMALL}?blobs=true")
    info = json.loads(body)
    for key in ("id", "modelId", "sha", "siblings", "tags", "private", "disabled", "gated", "lastModified"):
        assert key in info
    lfs = next(s for s in info["siblings"] if s["rfilename"] == "weights/model.safetensors")
    assert set(lfs) == {"rfilename", "size", "blobId", "lfs"} and set(lfs["lfs"]) == {"size", "sha256", "pointerSize"}
    status, _, body = raw(url, "GET", "/api/models")
    listing = {m["id"]: m["sha"] for m in json.loads(body)}
    assert listing == {SMALL: seeded.small.commit, MINILM: seeded.minilm.commit, TAGGED: seeded.tagged.commit}
    assert raw(url, "GET", "/api/agent-harnesses")[2] == b'{"standardEnvVars":[],"harnesses":{}}'
    assert raw(url, "GET", "/health")[0] == 200


def test_token_guards_every_route_but_agent_harnesses(token_mirror: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in (f"/api/models/{SMALL}", f"/{SMALL}/resolve/main/config.json", f"/api/models/{SMALL}/tree/main"):
        status, h, _ = raw(token_mirror, "GET", path)
        assert status == 401 and h["x-error-code"] == "RepoNotFound"
        assert raw(token_mirror, "GET", path, {"Authorization": "Bearer nope"})[0] == 401
        assert raw(token_mirror, "GET", path, auth)[0] == 200
    assert raw(token_mirror, "GET", "/api/agent-harnesses")[0] == 200


def test_keep_alive_and_client_leaving_mid_body(mirror: tuple[MirrorServer, str], seeded: Seeded) -> None:
    server, url = mirror
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    for _ in range(3):  # one connection, several requests
        conn.request("GET", f"/{SMALL}/resolve/main/config.json")
        assert conn.getresponse().read() == b'{"model_type": "bert"}\n'
    conn.close()
    for _ in range(5):  # 87 MiB bodies abandoned after the first bytes
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"GET /{MINILM}/resolve/main/model.safetensors HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536)
        sock.close()
    deadline = time.monotonic() + 10
    while server._conns and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server._conns, "handler threads still stuck on clients that left"
    status, _, body = raw(url, "GET", f"/{SMALL}/resolve/main/config.json")
    assert status == 200 and body == b'{"model_type": "bert"}\n'


def test_serve_mirror_logs_one_line_per_request_without_the_token(seeded: Seeded) -> None:
    """``serve_mirror`` (what ``hubserve mirror`` calls) in its own process, as the CLI runs it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys; from pathlib import Path; from sync.mirror import serve_mirror; from sync.store import Store; "
        "serve_mirror(Store(Path(sys.argv[1])), '127.0.0.1', int(sys.argv[2]), sys.argv[3])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(seeded.store.root), str(port), TOKEN],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, status = f"http://127.0.0.1:{port}", 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = raw(url, "GET", f"/{SMALL}/resolve/main/config.json", {"Authorization": f"Bearer {TOKEN}"})[0]
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    line = next(ln for ln in stderr.splitlines() if f"/{SMALL}/resolve/main/config.json" in ln)
    assert "GET" in line and " 200 " in line and " 23 " in line and "ms" in line
    assert TOKEN not in stderr
