"""Token texts, special-token flags and character offsets for the TGI family, from the model's tokenizer.json.

TGI's router tokenizes with the `tokenizers` library itself (for /tokenize offsets and token texts); hubserve
does the same for what vLLM's HTTP API does not return: offsets, the text of a token known only by id (top
tokens, the first prefill token) and which ids are special. `tokenizers` is imported lazily, and every use
has a fallback, so the gateway still works where a model has no tokenizer.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.tasks.snapshot import snapshot_json
from server.tasks.tokenizer import SnapshotTokenizer, for_snapshot, has_fast_tokenizer

log = logging.getLogger("hubserve.tgi")


class TokenTexts:
    """What the gateway knows about one model's vocabulary: special ids, and (if it loads) the fast tokenizer."""

    def __init__(self, special_ids: frozenset[int], tokenizer: SnapshotTokenizer | None = None) -> None:
        self.special_ids = special_ids
        self._tokenizer = tokenizer

    @classmethod
    def from_snapshot(cls, snapshot: str | Path) -> TokenTexts:
        """The snapshot's tokenizer (server/tasks/tokenizer.py loads each tokenizer.json once) and special ids."""
        tokenizer: SnapshotTokenizer | None = None
        if has_fast_tokenizer(str(snapshot)):
            try:
                tokenizer = for_snapshot(str(snapshot))
            except Exception as e:  # an unusual tokenizer.json must not break generation; offsets degrade
                log.warning("cannot load the tokenizer of %s for token texts and offsets: %s", snapshot, e)
        special = _configured_special_ids(str(snapshot)) | (tokenizer.special_ids if tokenizer else frozenset())
        return cls(special, tokenizer)

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def decode(self, token_id: int) -> str:
        """The text of one token ("" when no tokenizer is loaded)."""
        if self._tokenizer is None:
            return ""
        return self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up=False)

    def offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]] | None:
        """``(id, start, stop)`` per token of ``text`` (character offsets), or None without a tokenizer."""
        if self._tokenizer is None:
            return None
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [(int(i), int(s), int(e)) for i, (s, e) in zip(encoding.ids, encoding.offsets, strict=True)]


def _configured_special_ids(snapshot: str) -> frozenset[int]:
    """Ids of special tokens in tokenizer_config.json's decoder table (also where there is no tokenizer.json)."""
    ids: set[int] = set()
    entries: Any = snapshot_json(snapshot, "tokenizer_config.json").get("added_tokens_decoder") or {}
    if isinstance(entries, dict):  # {"<id>": {"content", "special", ...}}
        for key, entry in entries.items():
            if isinstance(entry, dict) and entry.get("special"):
                try:
                    ids.add(int(key))
                except (TypeError, ValueError):
                    continue
    return frozenset(ids)
