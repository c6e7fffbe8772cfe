"""Named language-model sizes. One function per preset; the parameter count is in its comment.

The paper sizes use Loong's vocabulary (32,000 text + 8,192 video + 10 special = 40,202), untied
embeddings and plain multi-head attention as LLaMA-7B does; the SwiGLU width of the 700M and 3B
models is set so each lands near its name (LLaMA's 8/3·dim rule would give 803M and 3.87B).
Counts include both embedding matrices.
"""

from __future__ import annotations

from collections.abc import Callable

from loong.config import apply_overrides
from loong.lm.model import VideoLMConfig
from loong.lm.vocab import VocabConfig


def paper_vocab() -> VocabConfig:
    """Loong: 32,000 text + 8,192 video (the tokenizer's codebook) + 10 special = 40,202."""
    return VocabConfig(text_vocab_size=32000, video_vocab_size=8192, n_special=10)


def tiny() -> VideoLMConfig:
    """CPU and shapes world; video ids match the ``tiny`` video tokenizer's 2^12 LFQ codes. 6.3M."""
    return VideoLMConfig(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=2048,
        vocab=VocabConfig(text_vocab_size=2048, video_vocab_size=4096, n_special=10),
    )


def shapes() -> VideoLMConfig:
    """The bundled shapes-world model: ``tiny`` with a 512-id text vocabulary (the captions use
    about 60 words), room for 9 latent frames of 8×8 ids and a caption, and the local video
    context of each predicted cell (``video_context_dim``; it does not convert to
    transformers' LLaMA), and, in training, each video id's rows tied to its 12 LFQ code bits
    (``video_code_bits``; folded away on export). 5.8M params."""
    return VideoLMConfig(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=1024,
        vocab=VocabConfig(text_vocab_size=512, video_vocab_size=4096, n_special=10),
        video_grid=(8, 8),
        video_context_dim=32,
        video_code_bits=12,
    )


def loong_700m() -> VideoLMConfig:
    """24 layers × 1536 wide × 16 heads, SwiGLU 3072. 689.8M params."""
    return VideoLMConfig(
        dim=1536, n_layers=24, n_heads=16, ffn_dim=3072, max_seq_len=4608, vocab=paper_vocab()
    )


def loong_3b() -> VideoLMConfig:
    """32 layers × 3072 wide × 32 heads, SwiGLU 5120. 2.97B params."""
    return VideoLMConfig(
        dim=3072, n_layers=32, n_heads=32, ffn_dim=5120, max_seq_len=4608, vocab=paper_vocab()
    )


def loong_7b() -> VideoLMConfig:
    """LLaMA-7B: 32 layers × 4096 wide × 32 heads, SwiGLU 11008. 6.81B params."""
    return VideoLMConfig(
        dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4608, vocab=paper_vocab()
    )


PRESETS: dict[str, Callable[[], VideoLMConfig]] = {
    "tiny": tiny,
    "shapes": shapes,
    "loong-700m": loong_700m,
    "loong-3b": loong_3b,
    "loong-7b": loong_7b,
}


def lm_preset(name: str, **overrides: object) -> VideoLMConfig:
    """Preset ``name`` with dotted-key ``overrides`` (``vocab__text_vocab_size=1024`` works too)."""
    if name not in PRESETS:
        raise ValueError(f"unknown language model preset {name!r}: choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return apply_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})
