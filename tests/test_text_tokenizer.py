"""Byte-level BPE: training, lossless round trips, files."""

from __future__ import annotations

import pytest

from loong.text_tokenizer import TextTokenizer

CAPTIONS = [
    "a red ball bounces on a white floor",
    "a blue square slides to the left",
    "a red square and a blue ball move to the right",
    "the camera pans over a green field at sunset",
    "two balls bounce, then a square slides across the floor",
] * 4


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


def test_training_merges_frequent_pairs(tokenizer):
    assert 256 < tokenizer.vocab_size <= 300
    ids = tokenizer.encode("a red ball bounces")
    assert len(ids) < len("a red ball bounces")  # merges shorten the text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@pytest.mark.parametrize(
    "text", ["a red ball bounces on a white floor", "unseen words: café, 東京, 🎈!\n  tabs\t", ""]
)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_save_and_load_round_trip(tokenizer, tmp_path):
    written = tokenizer.save(tmp_path)  # a directory: tokenizer.json inside it
    assert written == tmp_path / "tokenizer.json"
    for path in (tmp_path, written):
        loaded = TextTokenizer.load(path)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.encode(CAPTIONS[3]) == tokenizer.encode(CAPTIONS[3])


def test_missing_or_invalid_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text tokenizer"):
        TextTokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="at least 256"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)
