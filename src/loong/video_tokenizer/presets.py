"""Named tokenizer sizes. One function per preset; the parameter count is in its comment."""

from __future__ import annotations

from collections.abc import Callable

from loong.config import apply_overrides
from loong.video_tokenizer.model import VideoTokenizerConfig
from loong.video_tokenizer.quantize import QuantizerConfig


def tiny() -> VideoTokenizerConfig:
    """CPU and shapes world: 64×64 → 8×8 tokens a latent frame, 2^12 codes. 2.5M params."""
    return VideoTokenizerConfig(
        base_width=16,
        width_mults=(1, 2, 4, 4),
        temporal_downsample=(False, True, True),
        encoder_blocks=1,
        decoder_blocks=1,
        num_groups=8,
        # Lighter entropy and commitment terms than MAGVIT-v2's 0.1 / 0.25: at this size their
        # gradients swamp the reconstruction's at the encoder (~100× at initialisation), and
        # the short CPU runs this preset is for learned markedly slower with them.
        quantizer=QuantizerConfig(
            kind="lfq", latent_dim=12, entropy_weight=0.01, commitment_weight=0.05
        ),
    )


def shapes() -> VideoTokenizerConfig:
    """The bundled shapes-world model: ``tiny``'s grid and codes at about half the CPU time a
    step. 2×2 pixels enter as one position (``patch_size=2``), so no conv runs at 64×64 and the
    stages can be twice as wide. 64×64 → 8×8 tokens a latent frame, 2^12 codes. 3.7M params.

    A local encoder: each token sees only its own 8×8-pixel cell (and that cell's past), so a
    flat background gets one id everywhere and keeps it from frame to frame. With the usual
    whole-frame encoder 7% of a latent frame's ids were its most common one and 10% repeated
    the id one latent frame earlier; the language model spent its capacity predicting those ids
    and lost the object within a second (``benchmarks/token_stability.py``; BENCHMARKS.md).

    32 groups in the decoder (one channel a group in its last stage): shapes-world frames are
    flat with small objects, and with 4 channels a group the objects' colours came out grey
    long after their outlines were right (``benchmarks/tokenizer_overfit.py``)."""
    return VideoTokenizerConfig(
        patch_size=2,
        base_width=32,
        width_mults=(1, 2, 4),
        temporal_downsample=(True, True),
        encoder_blocks=2,
        decoder_blocks=1,
        num_groups=32,
        local_encoder=True,
        quantizer=QuantizerConfig(
            kind="lfq", latent_dim=12, entropy_weight=0.01, commitment_weight=0.05
        ),
    )


def loong_246m() -> VideoTokenizerConfig:
    """Paper scale: 65×128×128 → 17×16×16, CVQ with 8,192 codes as in Loong. 246.3M params."""
    return VideoTokenizerConfig(
        base_width=128,
        width_mults=(1, 2, 2, 4),
        temporal_downsample=(False, True, True),
        encoder_blocks=4,
        # MAGVIT-v2's decoder is the heavier half; one more block per stage lands on 246M.
        decoder_blocks=5,
        num_groups=32,
        quantizer=QuantizerConfig(kind="cvq", latent_dim=32, codebook_size=8192),
    )


PRESETS: dict[str, Callable[[], VideoTokenizerConfig]] = {
    "tiny": tiny,
    "shapes": shapes,
    "loong-246m": loong_246m,
}


def tokenizer_preset(name: str, **overrides: object) -> VideoTokenizerConfig:
    """Preset ``name`` with dotted-key ``overrides`` (``quantizer__kind="cvq"`` also works)."""
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}: choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return apply_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})
