"""Byte-level BPE text tokenizer, trained here because the language model is trained from scratch.

It wraps Hugging Face's ``tokenizers``: the trainer and encoder are fast (Rust), the library is
maintained, and ``tokenizer.json`` is the standard file other tools read. Byte-level BPE (GPT-2)
starts from the 256 byte values, so any string encodes and ``decode(encode(s)) == s``.

The text vocabulary holds no special tokens: BOS, EOS, BOV, EOV and PAD live in the language
model's joint id space (:mod:`loong.lm.vocab`), after the text and video ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
N_BYTES = 256


class TextTokenizer:
    """Text ↔ text ids in ``[0, vocab_size)``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
    ) -> TextTokenizer:
        """Learn byte-level BPE merges from ``texts`` up to ``vocab_size`` tokens.

        A small corpus may stop short of ``vocab_size`` (no pair left to merge); the language
        model's ``text_vocab_size`` only has to be at least :attr:`vocab_size`.
        """
        if vocab_size < N_BYTES:
            raise ValueError(
                f"vocab_size must be at least {N_BYTES} (one token per byte), got {vocab_size}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file, or a directory to write it into)."""
        path = _resolve(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Read a file written by :meth:`save` (``path`` may be its directory)."""
        path = _resolve(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no text tokenizer at {path}: train one with TextTokenizer.train(...).save(path)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        if not isinstance(tokenizer.model, models.BPE):
            raise ValueError(
                f"{path} holds a {type(tokenizer.model).__name__} tokenizer, not byte-level BPE"
            )
        return cls(tokenizer)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path
