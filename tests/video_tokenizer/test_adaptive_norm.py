"""The decoder's adaptive GroupNorm: the latent-grid fast path equals the full-size reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from loong.video_tokenizer.causal_conv import frame_group_norm
from loong.video_tokenizer.model import Norm, stretch_latent


def reference(norm: Norm, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Upsample the latent to every pixel, then scale and shift there (the textbook form)."""
    b = x.shape[0]
    z_full = F.interpolate(
        rearrange(z, "b d t h w -> (b t) d h w"), size=x.shape[-2:], mode="nearest"
    )
    z_full = rearrange(z_full, "(b t) d h w -> b d t h w", b=b)
    return frame_group_norm(norm.norm, x) * (1 + norm.scale(z_full)) + norm.shift(z_full)


@pytest.mark.parametrize("cell", [1, 2, 8])
def test_latent_grid_scale_and_shift_equal_the_full_size_reference(cell):
    torch.manual_seed(0)
    norm = Norm(16, 4, latent_dim=6)
    for conv in (norm.scale, norm.shift):
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.normal_(conv.bias, std=0.1)
    z = torch.randn(2, 6, 5, 3, 4)  # (B, D, T, h, w), already stretched in time
    x = torch.randn(2, 16, 5, 3 * cell, 4 * cell)
    torch.testing.assert_close(norm(x, z), reference(norm, x, z), rtol=1e-5, atol=1e-5)


def test_stretch_latent_is_causal_and_covers_four_frames_per_latent():
    z = torch.arange(3.0).view(1, 1, 3, 1, 1)
    first = stretch_latent(z, 9, first=True).flatten().tolist()
    later = stretch_latent(z, 12, first=False).flatten().tolist()
    assert first == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert later == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
