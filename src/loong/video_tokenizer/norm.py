"""Per-frame GroupNorm, and the per-cell scale and shift of the decoder's adaptive norm.

Causality needs GroupNorm statistics of each frame on its own (MAGVIT-v2, sec. 3.2):
:func:`frame_group_norm` runs torch's GroupNorm kernels on the frames as a batch. The decoder's
adaptive norm then scales and shifts each f×f cell of pixels by values computed from the latent
above it. As a broadcast over a ``(…, h, f, w, f)`` view (:func:`cell_affine_reference`) the
innermost loops of that product and of its gradients' sums run over the f pixels of a cell,
too few to vectorise; in a CPU training step :func:`cell_affine` upsamples the cell values once
and sums their gradients with a pooling kernel, which makes a training step of the ``shapes``
tokenizers 1.10–1.13× faster on a 2-core CPU (``benchmarks/tokenizer_step.py``; BENCHMARKS.md).
Tests hold it to the reference.

Axes: B batch, C channels, T frames, H W pixels, h w the cells (H/f, W/f).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def frame_group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm applied to each frame on its own, so statistics never mix frames (causality)."""
    b = x.shape[0]
    x = rearrange(x, "b c t h w -> (b t) c h w")
    x = norm(x)
    return rearrange(x, "(b t) c h w -> b c t h w", b=b)


def cell_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x · scale + shift`` with one scale and shift a cell of f×f pixels.

    ``x (B, C, T, H, W)``; ``scale, shift (B, C, T, H/f, W/f)``, all of one dtype. Equal to
    :func:`cell_affine_reference`; faster where it counts, a CPU training step. Without
    gradients, or on another device, it is the reference: a forward alone gains little from
    the upsampling, and at 128×128 in float32 the upsampled temporaries cost it twice the
    broadcast's time (BENCHMARKS.md).
    """
    if x.shape[-2:] == scale.shape[-2:]:  # one pixel a cell: a plain addcmul
        return torch.addcmul(shift, x, scale)
    training = torch.is_grad_enabled() and any(v.requires_grad for v in (x, scale, shift))
    if not training or x.device.type != "cpu":
        return cell_affine_reference(x, scale, shift)
    return _CellAffine.apply(x, scale, shift)


def cell_affine_reference(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """:func:`cell_affine` as a broadcast over a ``(B, C, T, h, f, w, f)`` view."""
    b, c, t, height, width = x.shape
    h, w = scale.shape[-2:]
    x = x.view(b, c, t, h, height // h, w, width // w)
    out = torch.addcmul(shift[:, :, :, :, None, :, None], x, scale[:, :, :, :, None, :, None])
    return out.view(b, c, t, height, width)


def _upsample_cells(v: torch.Tensor, f: int) -> torch.Tensor:
    # (B, C, T, h, w) → (B, C, T, h·f, w·f), each value repeated over its cell
    return v.repeat_interleave(f, dim=-1).repeat_interleave(f, dim=-2)


def _sum_cells(v: torch.Tensor, f: int) -> torch.Tensor:
    # (B, C, T, H, W) → (B, C, T, H/f, W/f), each cell summed
    b, c, t, height, width = v.shape
    cells = F.avg_pool2d(v.reshape(b * c * t, height, width), f, divisor_override=1)
    return cells.view(b, c, t, height // f, width // f)


class _CellAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift):  # type: ignore[override]
        f = x.shape[-1] // scale.shape[-1]
        ctx.f = f
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, scale)
        return torch.addcmul(_upsample_cells(shift, f), x, _upsample_cells(scale, f))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        f = ctx.f
        grad = grad.contiguous()
        grad_x = grad * _upsample_cells(scale, f) if ctx.needs_input_grad[0] else None
        grad_scale = _sum_cells(grad * x, f) if ctx.needs_input_grad[1] else None
        grad_shift = _sum_cells(grad, f) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_shift
