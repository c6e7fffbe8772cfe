"""Language-model test fixtures: one CPU thread, and seeded models of a few thousand parameters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.vocab import VocabConfig


def small_lm_config(**fields: object) -> VideoLMConfig:
    """dim 32, 2 layers, 4 heads (2 key/value heads), 40 text + 64 video + 10 special ids."""
    values: dict[str, object] = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 64,
        "vocab": VocabConfig(text_vocab_size=40, video_vocab_size=64, n_special=10),
    }
    values.update(fields)
    return VideoLMConfig(**values)


@pytest.fixture
def make_lm() -> Callable[..., VideoLM]:
    """Factory: ``make_lm(seed=0, **config_fields)`` → a seeded small ``VideoLM`` in eval mode.

    Weights are drawn with std 0.3 instead of the training init's 0.02, so logits vary enough
    across positions for the comparisons below to mean something.
    """

    def make(seed: int = 0, **fields: object) -> VideoLM:
        torch.manual_seed(seed)
        model = VideoLM(small_lm_config(**fields))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(1.0, 0.1)  # not all ones, so a swapped norm would show
                else:
                    p.normal_(0.0, 0.3)
        return model.eval()

    return make
