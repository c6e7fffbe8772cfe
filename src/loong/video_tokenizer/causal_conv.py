"""Causal 3D convolutions with an explicit streaming cache (MAGVIT-v2, Yu et al. 2023, sec. 3.2).

Every temporal convolution pads ``k_t - 1`` frames before its input and none after, so output frame
``t`` depends on input frames ``<= t`` only and the first frame is encoded on its own. Because the
padding is causal and normalisation is per frame, a long video can be processed in chunks: each
convolution keeps the input frames it has not consumed yet in a :class:`StreamCache`, and chunked
processing equals the one-shot result exactly.

Axes: B batch, C channels, T frames, H W pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class StreamCache:
    """State carried between chunks of one video: leftover input frames per causal convolution.

    ``first`` is true while the first chunk (the one holding frame 0) is being processed; the
    decoder's temporal upsampling uses it to drop the frame that precedes frame 0.
    """

    def __init__(self) -> None:
        self.first = True
        self._buffers: dict[int, torch.Tensor] = {}

    def pop(self, key: int) -> torch.Tensor | None:
        return self._buffers.pop(key, None)

    def put(self, key: int, frames: torch.Tensor) -> None:
        self._buffers[key] = frames


class CausalConv3d(nn.Module):
    """3D convolution, causal in time and "same"-padded in space.

    Input ``(B, C_in, T, H, W)`` → output ``(B, C_out, T', H / s_h, W / s_w)`` where, for a fresh
    cache, ``T' = floor((T - 1) / s_t) + 1`` (so 1+4k frames → 1+2k frames at stride 2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        k_t, k_h, k_w = kernel_size
        if k_h % 2 == 0 or k_w % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got {kernel_size}")
        self.time_kernel = k_t
        self.time_stride = stride[0]
        # Spatial padding is "same", then stride. Symmetric padding is left to the convolution
        # (no copy); for stride 2 and kernel 3 it is (0, 1), so the H / 2 outputs line up with
        # the top-left pixel of each 2×2 cell, and needs an explicit pad.
        pad_w, pad_h = _same_pad(k_w, stride[2]), _same_pad(k_h, stride[1])
        symmetric = pad_w[0] == pad_w[1] and pad_h[0] == pad_h[1]
        self.spatial_pad = None if symmetric else (*pad_w, *pad_h)
        conv_pad = (0, pad_h[0], pad_w[0]) if symmetric else 0
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=conv_pad
        )

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        # x: (B, C, T, H, W)
        key = id(self)
        past = cache.pop(key) if cache is not None else None
        n_new = x.shape[2]
        if past is None:  # the start of a video: k_t − 1 zero frames before frame 0
            x = F.pad(x, (0, 0, 0, 0, self.time_kernel - 1, 0))
        else:
            x = torch.cat([past, x], dim=2)  # (B, C, T_past + T, H, W)
        n_out = (x.shape[2] - self.time_kernel) // self.time_stride + 1
        if n_out <= 0:
            raise ValueError(
                f"a chunk of {n_new} frames is too short for this causal convolution: stream "
                "chunks whose frame count is a multiple of the temporal compression (4 by default)"
            )
        if cache is not None:
            # Keep the frames the next output window starts from.
            cache.put(key, x[:, :, n_out * self.time_stride :])
        if self.spatial_pad is not None:
            x = F.pad(x, self.spatial_pad)
        return self.conv(x)  # (B, C_out, n_out, H', W')


def _same_pad(kernel: int, stride: int) -> tuple[int, int]:
    total = kernel - stride
    return total // 2, total - total // 2


def space_to_depth(x: torch.Tensor, space: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` → ``(B, C·s·s, T, H / s, W / s)``: each s×s cell becomes one position."""
    return rearrange(x, "b c t (h sh) (w sw) -> b (c sh sw) t h w", sh=space, sw=space)


def depth_to_space(x: torch.Tensor, time: int, space: int) -> torch.Tensor:
    """``(B, C·s_t·s·s, T, H, W)`` → ``(B, C, T·s_t, H·s, W·s)``."""
    return rearrange(
        x, "b (c st sh sw) t h w -> b c (t st) (h sh) (w sw)", st=time, sh=space, sw=space
    )
