"""A model's fast tokenizer in the gateway, from the snapshot's tokenizer.json (``tokenizers``; no transformers).

Token-level tasks on vLLM (token-classification, fill-mask) need more than vLLM's per-token outputs: the
character offset of each token, which tokens are special, which continue a word, and decoding. The gateway
tokenizes the input itself, configured as transformers configures the same tokenizer.json (truncation to the
context, overflowing windows with ``stride``, no padding), sends vLLM the token ids, and so knows exactly what
each output row belongs to. tests/unit/test_snapshot_tokenizer.py checks it against ``AutoTokenizer``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Encoding, Tokenizer

from server.errors import RequestTooLarge
from server.tasks.snapshot import snapshot_json

T = TypeVar("T")

# transformers' clean_up_tokenization (WordPiece tokenizers with clean_up_tokenization_spaces; never BPE).
CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def has_fast_tokenizer(snapshot: str) -> bool:
    return (Path(snapshot) / "tokenizer.json").is_file()


class SnapshotTokenizer:
    """The tokenizer of one snapshot (immutable, so one instance per snapshot: see ``for_snapshot``)."""

    def __init__(self, snapshot: str) -> None:
        root = Path(snapshot)
        self._tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._lock = threading.Lock()  # truncation is tokenizer state: one encode at a time (calls run in threads)
        config = snapshot_json(snapshot, "tokenizer_config.json")
        special = snapshot_json(snapshot, "special_tokens_map.json")
        self.mask_token = _token_text(config.get("mask_token")) or _token_text(special.get("mask_token"))
        unk = _token_text(config.get("unk_token")) or _token_text(special.get("unk_token"))
        self.mask_id = self.token_id(self.mask_token) if self.mask_token else None
        self.unk_id = self.token_id(unk) if unk else None
        length = config.get("model_max_length")
        self.model_max_length = int(length) if isinstance(length, int | float) and 0 < length < 1e12 else None
        model = self._tokenizer.model
        self.word_aware = bool(getattr(model, "continuing_subword_prefix", None))  # WordPiece marks subwords
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and type(model).__name__ != "BPE"

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special in tokenizer.json."""
        return frozenset(int(i) for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special)

    def windows(self, text: str, max_length: int, stride: int = 0) -> list[Encoding]:
        """``text`` cut to ``max_length`` tokens; with ``stride`` every overflowing window too (overlapping by
        ``stride`` tokens), as transformers' ``return_overflowing_tokens`` gives them."""
        with self._lock:
            self._tokenizer.enable_truncation(max_length, stride=stride)
            encoding = self._tokenizer.encode(text)
        return [encoding, *encoding.overflowing] if stride else [encoding]

    def first_token(self, text: str) -> int | None:
        """The first token id of ``text`` without special tokens (fill-mask targets outside the vocabulary)."""
        ids = self.encode(text, add_special_tokens=False).ids
        return ids[0] if ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        """The whole of ``text`` (no truncation)."""
        with self._lock:
            self._tokenizer.no_truncation()
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False, clean_up: bool | None = None) -> str:
        """``ids`` as text; ``clean_up`` (default: as tokenizer_config.json says) joins WordPiece punctuation."""
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up if clean_up is None else clean_up:
            for old, new in CLEANUPS:
                text = text.replace(old, new)
        return text


# Tokenizing is CPU work the event loop must never do (a 4 MB input stalled /health for seconds): it runs in this
# small pool, so at most TOKENIZE_THREADS inputs are tokenized at once whatever the number of requests.
TOKENIZE_THREADS = 2
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=TOKENIZE_THREADS, thread_name_prefix="hubserve-tokenize")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the tokenizer pool, awaited (the request's context, e.g. its key, goes along)."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(ctx.run, fn, *args))


def check_input_size(texts: Iterable[object], cap: int) -> None:
    """RequestTooLarge (413, in the route family's shape) when the texts to tokenize hold more than ``cap``
    characters in all (HUBSERVE_MAX_TOKENIZE_CHARS)."""
    total = sum(len(t) for t in texts if isinstance(t, str))
    if total > cap:
        raise RequestTooLarge(
            f"The input to tokenize has {total} characters, over the limit of {cap} (HUBSERVE_MAX_TOKENIZE_CHARS)."
        )


@functools.lru_cache(maxsize=32)
def for_snapshot(snapshot: str) -> SnapshotTokenizer:
    return SnapshotTokenizer(snapshot)
