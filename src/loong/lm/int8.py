"""Weight-only int8 for sampling: every projection of the blocks as int8 rows, one scale a row.

A decode step at batch 1 multiplies one row of activations by every weight of the model, so on
a CPU its time is mostly the bytes of weight it reads; int8 weights are a quarter of float32's
and half of bfloat16's. Per output row, symmetric (as gpt-fast's int8 weight-only mode): the
row's scale is ``s = max|w| / 127`` and its weights ``q = round(w / s)`` in [−127, 127], so
``q · s`` is within ``s / 2`` of each weight. Activations stay in the model's float dtype.

The product runs in torch's ``_weight_int8pack_mm`` on a CPU, else as ``F.linear`` on the
dequantized weight (the reference path, which the tests compare the fast one against). On a
CPU the kernel is fast with bfloat16 activations: one token of the 31.5M-parameter benchmark
model took 0.95 ms of matmuls with int8 weights and bfloat16 activations, 3.4 ms in bfloat16
and 7.2 ms in float32, but 9.2 ms with int8 weights and float32 activations (a 2-core AMD EPYC
with AVX-512 BF16; BENCHMARKS.md), which is why :func:`int8_weights` defaults them to bfloat16.

Sampling only: the int8 weights are buffers, never trained, and a model holding them is not
saved (save the float model; convert when loading). An untied head is rounded too; a tied head
(the embedding table), the embeddings and the norms stay in float.

Axes: N output features, K input features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127

Model = TypeVar("Model", bound=nn.Module)


class Int8Linear(nn.Module):
    """``x @ (q · s)ᵀ`` for int8 rows ``q`` (N, K) with scales ``s`` (N,); no bias."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.ndim != 2 or scales.shape != weight.shape[:1]:
            raise ValueError(
                f"Int8Linear needs int8 weights (N, K) and scales (N,), got {weight.dtype} "
                f"{tuple(weight.shape)} and {tuple(scales.shape)}"
            )
        self.register_buffer("weight", weight.contiguous())  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) in the activations' dtype
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> Int8Linear:
        """Round ``linear``'s weight to int8 rows; scales in ``dtype`` (default: the weight's)."""
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias: quantize bias-free layers only")
        w = linear.weight.detach().float()  # (N, K)
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
        q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(q, scales.to(dtype or linear.weight.dtype))

    @classmethod
    def cat(cls, layers: Sequence[Int8Linear]) -> Int8Linear:
        """One layer whose outputs are those of ``layers`` in order (one matmul for several)."""
        return cls(torch.cat([m.weight for m in layers]), torch.cat([m.scales for m in layers]))

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Int8 rows and scales of outputs ``lo .. hi − 1`` (views), for :func:`int8_linear`."""
        return self.weight[lo:hi], self.scales[lo:hi]

    def dequantized(self) -> torch.Tensor:
        """The weight the layer stands for, ``q · s`` (N, K) in the scales' dtype."""
        return dequantize(self.weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales)  # (..., K) → (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def dequantize(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Int8 rows ``weight`` (N, K) times their ``scales`` (N,) → (N, K) in the scales' dtype."""
    return weight.to(scales.dtype) * scales[:, None]


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` (..., K) times int8 rows ``weight`` (N, K) scaled by ``scales`` (N,) → (..., N)."""
    fast = x.device.type == "cpu" and x.dtype == scales.dtype and not x.requires_grad
    if not fast:  # the reference path: other devices, other dtypes, autograd
        return F.linear(x, dequantize(weight, scales).to(x.dtype))
    rows = x.reshape(-1, weight.shape[1]).contiguous()  # (M, K)
    out = torch._weight_int8pack_mm(rows, weight, scales)  # (M, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def int8_weights(model: Model, dtype: torch.dtype = torch.bfloat16) -> Model:
    """Cast ``model`` (a :class:`~loong.lm.model.VideoLM`) to ``dtype`` and replace the linear
    layers of its blocks and an untied head by :class:`Int8Linear` in place; returns it, in
    eval mode.

    Rounded from the weights as they are in ``model`` (float32 weights are not rounded to
    ``dtype`` first)."""
    from loong.lm.model import Block

    if not dtype.is_floating_point:
        raise ValueError(f"dtype is the activations' and must be a float dtype, got {dtype}")
    for block in model.modules():
        if not isinstance(block, Block):
            continue
        for owner, names in (
            (block.attention, ("wq", "wk", "wv", "wo")),
            (block.feed_forward, ("w1", "w2", "w3")),
        ):
            for name in names:
                layer = getattr(owner, name)
                if isinstance(layer, nn.Linear):
                    setattr(owner, name, Int8Linear.from_linear(layer, dtype))
    # An untied head too (in a folded model: code-bit terms would add to its weight)
    output = getattr(model, "output", None)
    if isinstance(output, nn.Linear) and getattr(model, "code_head", None) is None:
        model.output = Int8Linear.from_linear(output, dtype)
    return model.to(dtype).eval()


def has_int8_weights(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is an :class:`Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
