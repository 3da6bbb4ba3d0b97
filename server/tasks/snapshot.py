"""The one reader of a snapshot's small JSON files (config.json, tokenizer_config.json, preprocessor_config.json,
config_sentence_transformers.json, ...), cached: a verified snapshot never changes, so each file is parsed once.

Answers are shared between callers: read them, never mutate them. A missing, unreadable or non-object file
reads as ``{}``. tokenizer.json is not read here: server/tasks/tokenizer.py loads it once per snapshot.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

MAX_CACHED_BYTES = 4 * 1024**2  # bigger files are parsed but not kept


def snapshot_json(snapshot: str, name: str) -> dict[str, Any]:
    """The JSON object in ``snapshot/name`` ({} when it is missing or not a JSON object)."""
    cached = _cached(snapshot, name)
    return cached if cached is not None else _parse(Path(snapshot) / name)


@functools.lru_cache(maxsize=1024)
def _cached(snapshot: str, name: str) -> dict[str, Any] | None:
    """The parsed file, or None for a file too big to keep (it is parsed at each call instead)."""
    path = Path(snapshot) / name
    try:
        if path.stat().st_size > MAX_CACHED_BYTES:
            return None
    except OSError:
        return {}
    return _parse(path)


def _parse(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_config(snapshot: str) -> dict[str, Any]:
    """The snapshot's config.json."""
    return snapshot_json(snapshot, "config.json")


def architecture(snapshot: str) -> str | None:
    """The first architecture named by config.json, if any."""
    names = model_config(snapshot).get("architectures")
    return str(names[0]) if isinstance(names, list) and names else None
