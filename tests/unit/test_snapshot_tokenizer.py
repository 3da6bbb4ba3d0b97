"""server/tasks/tokenizer.py against transformers' AutoTokenizer on the same snapshot: the gateway's token ids,
offsets, special tokens, overflowing windows and decoding must be exactly what the worker (and transformers'
pipelines) see, or vLLM's per-token outputs would be mapped to the wrong characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.tasks.tokenizer import SnapshotTokenizer
from tests.fixtures import task_models as tm
from tests.fixtures.tiny import minilm_dir

pytestmark = pytest.mark.unit

TEXTS = [
    "My name is Wolfgang and I live in Berlin, near the Brandenburger Tor.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis isn't a word you'd say; he's sure they've gone.",
    "Zürich café naïve \u2013 ☃ emoji 🤗 and [UNK]-like tokens ###",
    " leading and  double  spaces ",
    "",
]


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def snapshot(request: pytest.FixtureRequest) -> Path:
    return minilm_dir() if request.param == "wordpiece" else tm.bart_dir()


def test_windows_match_transformers(snapshot: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(snapshot))
    ours = SnapshotTokenizer(str(snapshot))
    long_text = " ".join(TEXTS[:3]) * 6
    for text, max_length, stride in [*((t, 64, 0) for t in TEXTS), (long_text, 32, 0), (long_text, 32, 8),
                                     (long_text, 48, 16)]:
        kwargs = {"stride": stride, "return_overflowing_tokens": True} if stride else {}
        want = reference([text], truncation=True, max_length=max_length, return_offsets_mapping=True,
                         return_special_tokens_mask=True, **kwargs)
        got = ours.windows(text, max_length, stride)
        assert [w.ids for w in got] == want["input_ids"], (text, max_length, stride)
        assert [[tuple(o) for o in w.offsets] for w in got] == [[tuple(o) for o in row]
                                                                for row in want["offset_mapping"]]
        assert [w.special_tokens_mask for w in got] == want["special_tokens_mask"]
        assert [w.tokens for w in got] == [reference.convert_ids_to_tokens(row) for row in want["input_ids"]]
        if stride:
            assert len(got) > 1


def test_decoding_and_special_tokens_match_transformers(snapshot: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(snapshot))
    ours = SnapshotTokenizer(str(snapshot))
    assert ours.mask_token == reference.mask_token and ours.mask_id == reference.mask_token_id
    assert ours.unk_id == reference.unk_token_id
    for text in TEXTS:
        ids = reference(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
        tokens = reference.convert_ids_to_tokens(ids)
        assert ours.tokens_to_string(tokens) == reference.convert_tokens_to_string(tokens)
        assert [ours.decode([i]) for i in ids] == [reference.decode([i]) for i in ids]
    for target in ("paris", "Wolfgang", "café"):
        first = reference(target, add_special_tokens=False)["input_ids"][0]
        assert ours.first_token(target) == first


def test_word_awareness_follows_the_tokenizer_model() -> None:
    assert SnapshotTokenizer(str(minilm_dir())).word_aware  # WordPiece marks continuing subwords with ##
    assert not SnapshotTokenizer(str(tm.bart_dir())).word_aware
