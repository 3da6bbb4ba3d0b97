"""Token texts, special-token flags and character offsets for the TGI family, from the model's tokenizer.json.

TGI's router tokenizes with the `tokenizers` library itself (for /tokenize offsets and token texts); hubserve
does the same for what vLLM's HTTP API does not return: offsets, the text of a token known only by id (top
tokens, the first prefill token) and which ids are special. `tokenizers` is imported lazily, and every use
has a fallback, so the gateway still works where a model has no tokenizer.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("hubserve.tgi")


class TokenTexts:
    """What the gateway knows about one model's vocabulary: special ids, and (if it loads) the fast tokenizer."""

    def __init__(self, special_ids: frozenset[int], tokenizer: Any | None = None) -> None:
        self.special_ids = special_ids
        self._tokenizer = tokenizer

    @classmethod
    def from_snapshot(cls, snapshot: str | Path) -> TokenTexts:
        folder = Path(snapshot)
        special = _special_ids(folder)
        tokenizer = None
        path = folder / "tokenizer.json"
        if path.is_file():
            try:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # an unusual tokenizer.json must not break generation; offsets degrade
                log.warning("cannot load %s for token texts and offsets: %s", path, e)
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
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False))

    def offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]] | None:
        """``(id, start, stop)`` per token of ``text`` (character offsets), or None without a tokenizer."""
        if self._tokenizer is None:
            return None
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [(int(i), int(s), int(e)) for i, (s, e) in zip(encoding.ids, encoding.offsets, strict=True)]


def _special_ids(folder: Path) -> frozenset[int]:
    """Ids of special tokens, from tokenizer.json's added_tokens and tokenizer_config.json's decoder table."""
    ids: set[int] = set()
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entries = data.get(key) or []
        if isinstance(entries, dict):  # tokenizer_config: {"<id>": {"content", "special", ...}}
            entries = [{"id": k, **v} for k, v in entries.items() if isinstance(v, dict)]
        for entry in entries:
            if isinstance(entry, dict) and entry.get("special"):
                try:
                    ids.add(int(entry["id"]))
                except (KeyError, TypeError, ValueError):
                    continue
    return frozenset(ids)
