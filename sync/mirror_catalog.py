"""What the mirror knows about each repo without the Hub: tags, task, library, refs, and model search.

Air-gapped stores have no Hub metadata beyond what sync or a bundle recorded, so the facts the Hub would
show are rebuilt from the store itself: the revision record (pipeline tag, refs), the README's front
matter (tags, library_name, license, language, datasets, base_model) and config.json (model_type).
Everything here is a function of immutable verified revisions, so it is cached per (repo, commit).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sync.hub_protocol import (
    HttpError,
    card_data,
    find_revision,
    hub_time,
    newest_main,
    sibling,
    small_file,
    tree_file,
    tree_listing,
)
from sync.paths import is_commit, safe_relpath
from sync.store import RevisionRecord, Store

CONFIG_MAX = 1 << 20
SORT_KEYS = {"lastModified", "createdAt", "downloads", "likes", "trendingScore", "id", "modelId"}
_TAG_LIKE = re.compile(r"^v?\d+(\.\d+)*([-.+][0-9A-Za-z.-]+)?$")


@dataclass(frozen=True)
class RepoFacts:
    """The Hub's descriptive fields for one revision."""

    tags: tuple[str, ...]
    pipeline_tag: str | None
    library_name: str | None
    model_type: str | None


@lru_cache(maxsize=256)
def config_json(store: Store, record: RevisionRecord) -> dict[str, Any]:
    try:
        data = json.loads(small_file(store, record, "config.json", CONFIG_MAX) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if isinstance(v, str | int | float)] if isinstance(value, list) else []


def _library(record: RevisionRecord, card: dict[str, Any]) -> str | None:
    if isinstance(card.get("library_name"), str):
        return str(card["library_name"])
    names = {f.path for f in record.files}
    if names & {"modules.json", "config_sentence_transformers.json"}:
        return "sentence-transformers"
    if "config.json" in names:
        return "transformers"
    return None


@lru_cache(maxsize=256)
def repo_facts(store: Store, record: RevisionRecord) -> RepoFacts:
    """Tags in the Hub's style: library, weight formats, model type, task, card tags, license, languages."""
    card, config = card_data(store, record), config_json(store, record)
    library = _library(record, card)
    pipeline_tag = record.pipeline_tag or (card["pipeline_tag"] if isinstance(card.get("pipeline_tag"), str) else None)
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    suffixes = {f.path.rsplit(".", 1)[-1].lower() for f in record.files if "." in f.path}
    tags: list[str] = [library] if library else []
    tags += [fmt for fmt in ("safetensors", "gguf", "onnx") if fmt in suffixes]
    tags += [model_type] if model_type else []
    tags += [pipeline_tag] if pipeline_tag else []
    tags += _strings(card.get("tags"))
    tags += _strings(card.get("language"))
    tags += [f"license:{v}" for v in _strings(card.get("license"))]
    tags += [f"dataset:{v}" for v in _strings(card.get("datasets"))]
    tags += [f"base_model:{v}" for v in _strings(card.get("base_model"))]
    return RepoFacts(tuple(dict.fromkeys(tags)), pipeline_tag, library, model_type)


def describe(store: Store, record: RevisionRecord) -> dict[str, Any]:
    """The fields the Hub returns for a model in listings and model_info (minus siblings)."""
    facts = repo_facts(store, record)
    out: dict[str, Any] = {
        "_id": record.commit[:24],
        "id": record.repo,
        "modelId": record.repo,
        "author": record.repo.split("/")[0],
        "sha": record.commit,
        "lastModified": hub_time(record.verified_at),
        "createdAt": hub_time(record.verified_at),
        "private": False,
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "trendingScore": 0,
        "tags": list(facts.tags),
        "usedStorage": record.size,
    }
    if facts.pipeline_tag:
        out["pipeline_tag"] = facts.pipeline_tag
    if facts.library_name:
        out["library_name"] = facts.library_name
    return out


def model_info(store: Store, record: RevisionRecord, blobs: bool) -> dict[str, Any]:
    """``GET /api/models/{repo}[/revision/{rev}]``: the description plus siblings and the card's data."""
    info = describe(store, record)
    info["siblings"] = [sibling(f, blobs) for f in sorted(record.files, key=lambda f: f.path)]
    card = card_data(store, record)
    if card:
        info["cardData"] = card
    config = config_json(store, record)
    if config.get("model_type") or config.get("architectures"):
        info["config"] = {k: config[k] for k in ("model_type", "architectures") if k in config}
    return info


# ---- GET /api/models ------------------------------------------------------------------------------
def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def search_models(store: Store, query: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Every repo's newest ``main`` that matches ``HfApi.list_models``' search, author, filter and
    pipeline_tag, sorted as asked (descending unless ``direction=1``; by id when no sort is given)."""
    search = (_one(query, "search") or "").lower()
    author = (_one(query, "author") or "").lower()
    wanted = [t for v in query.get("filter", []) for t in v.split(",") if t]
    task = _one(query, "pipeline_tag")
    sort = _one(query, "sort")
    if sort is not None and sort not in SORT_KEYS:
        raise HttpError(400, f"sort={sort!r} is not supported; use one of {', '.join(sorted(SORT_KEYS))}")
    full = any(_one(query, k) in ("1", "true", "True") for k in ("full",))
    items = []
    for repo in store.repos():
        record = newest_main(store, repo)
        if record is None:
            continue
        item = describe(store, record)
        if search and search not in repo.lower():
            continue
        if author and item["author"].lower() != author:
            continue
        if task and item.get("pipeline_tag") != task:
            continue
        if any(t not in item["tags"] and t != item.get("pipeline_tag") for t in wanted):
            continue
        items.append(_shape(store, record, item, query, full))
    key = "id" if sort in (None, "modelId") else sort
    descending = sort is not None and _one(query, "direction") != "1"
    items.sort(key=lambda i: (i.get(key, 0), i["id"]) if key != "id" else i["id"], reverse=descending)
    return items


def _shape(store: Store, record: RevisionRecord, item: dict[str, Any], query: dict[str, list[str]],
           full: bool) -> dict[str, Any]:
    """Apply ``full``, ``cardData``, ``config`` and ``expand`` as the Hub does for listings."""
    if full or "siblings" in query.get("expand", []):
        item["siblings"] = [sibling(f, False) for f in sorted(record.files, key=lambda f: f.path)]
    if _one(query, "cardData") in ("1", "true", "True") or "cardData" in query.get("expand", []):
        item["cardData"] = card_data(store, record)
    if _one(query, "config") in ("1", "true", "True") or "config" in query.get("expand", []):
        item["config"] = {k: v for k, v in config_json(store, record).items() if k in ("model_type", "architectures")}
    expand = query.get("expand")
    if expand:
        item = {k: v for k, v in item.items() if k in ("_id", "id", *expand)}
    return item


# ---- GET /api/models/{repo}/refs ------------------------------------------------------------------
def list_refs(store: Store, repo: str, include_prs: bool) -> dict[str, list[dict[str, str]]]:
    """The refs of a repo that point at verified revisions, in ``list_repo_refs``' shape.

    The store keeps ref names only, not whether a name was a branch or a tag: ``refs/pr/N`` are pull
    requests, ``refs/convert/*`` conversions, version-like names (``v1``, ``1.2.0``) tags, the rest branches.
    """
    newest = find_revision(store, repo, "main")  # 404 RepoNotFound for an unknown repo
    out: dict[str, list[dict[str, str]]] = {"branches": [], "converts": [], "tags": []}
    prs: list[dict[str, str]] = []
    refs_dir = store.repo_dir(repo) / "refs"
    names = sorted(p.relative_to(refs_dir).as_posix() for p in refs_dir.rglob("*") if p.is_file()) if \
        refs_dir.is_dir() else []
    seen_main = False
    for name in names:
        commit = store.read_ref(repo, name)
        if commit is None or store.get_revision(repo, commit) is None:
            continue
        if name.startswith("refs/pr/"):
            prs.append({"name": name, "ref": name, "targetCommit": commit})
        elif name.startswith("refs/convert/"):
            out["converts"].append({"name": name[len("refs/convert/"):], "ref": name, "targetCommit": commit})
        elif _TAG_LIKE.match(name):
            out["tags"].append({"name": name, "ref": f"refs/tags/{name}", "targetCommit": commit})
        elif not name.startswith("refs/"):
            seen_main |= name == "main"
            out["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit})
    if not seen_main:  # what `main` answers on this mirror (see find_revision)
        out["branches"].insert(0, {"name": "main", "ref": "refs/heads/main", "targetCommit": newest.commit})
    if include_prs:
        out["pullRequests"] = prs
    return out


# ---- POST /api/models/{repo}/paths-info/{rev} -----------------------------------------------------
def paths_info(record: RevisionRecord, paths: list[str]) -> list[dict[str, Any]]:
    """Tree entries for the given paths (files or directories); unknown paths are left out, as on the Hub."""
    listing = {e["path"]: e for e in tree_listing(record)}
    out = []
    for raw in dict.fromkeys(paths):
        path = raw.strip("/")
        try:
            path = safe_relpath(path)
        except Exception:
            raise HttpError(400, f"invalid path {raw!r}") from None
        entry = record.file(path)
        if entry is not None:
            out.append(tree_file(entry))
        elif path in listing:
            out.append(listing[path])
    return out


def revision_label(store: Store, record: RevisionRecord) -> str:
    """The refs naming a revision, for people (the page): ``main, v1`` or the short commit."""
    names = [r for r in record.refs if not is_commit(r)]
    if store.read_ref(record.repo, "main") == record.commit and "main" not in names:
        names.insert(0, "main")
    return ", ".join(names)
