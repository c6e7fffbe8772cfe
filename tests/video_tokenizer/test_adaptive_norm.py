"""The decoder's adaptive GroupNorm: the latent-grid fast path equals the full-size reference,
and the per-cell scale and shift equal their broadcast reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from loong.video_tokenizer.model import Norm, stretch_latent
from loong.video_tokenizer.norm import cell_affine, cell_affine_reference, frame_group_norm


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


def _affine_inputs(cell: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """x (2, 8, 3, 4·cell, 2·cell), scale and shift (2, 8, 3, 4, 2), all requiring gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 4 * cell, 2 * cell, generator=gen)
    scale = 1 + 0.3 * torch.randn(2, 8, 3, 4, 2, generator=gen)
    shift = torch.randn(2, 8, 3, 4, 2, generator=gen)
    return [v.to(dtype).requires_grad_() for v in (x, scale, shift)]


def _affine_run(fn, cell: int, dtype: torch.dtype) -> list[torch.Tensor]:
    inputs = _affine_inputs(cell, torch.bfloat16 if dtype == torch.float64 else dtype)
    inputs = [v.detach().to(dtype).requires_grad_() for v in inputs]  # the same values
    out = fn(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.double() * weights.double()).sum().backward()
    return [out] + [v.grad for v in inputs]


@pytest.mark.parametrize("cell", [1, 2, 4])
def test_cell_affine_equals_the_broadcast_reference_values_and_gradients(cell):
    fast = _affine_run(cell_affine, cell, torch.float32)
    reference = _affine_run(cell_affine_reference, cell, torch.float32)
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cell_affine_in_bf16_is_as_close_to_float64_as_the_reference():
    truth = _affine_run(cell_affine_reference, 4, torch.float64)
    fast = _affine_run(cell_affine, 4, torch.bfloat16)
    reference = _affine_run(cell_affine_reference, 4, torch.bfloat16)
    assert fast[0].dtype == torch.bfloat16 and fast[2].dtype == torch.bfloat16
    for got, want, lib in zip(fast, truth, reference, strict=True):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error <= max((lib.double() - want).abs().max() / want.abs().max(), 1e-2)


def test_cell_affine_keeps_each_cells_values_to_its_cell():
    x, scale, shift = _affine_inputs(4, torch.float32)  # with gradients: the fast path
    scale2 = scale.detach().clone().requires_grad_()
    with torch.no_grad():
        scale2[:, :, :, 1, 0] += 1.0  # cell (1, 0): pixels 4..7 down, 0..3 across
    changed = (cell_affine(x, scale2, shift) != cell_affine(x, scale, shift)).any(dim=(0, 1, 2))
    expected = torch.zeros(16, 8, dtype=torch.bool)
    expected[4:8, 0:4] = True
    assert torch.equal(changed, expected)
