"""3D discriminator for the tokenizer's GAN loss (StyleGAN-like residual blocks with blur pooling,
as in MAGVIT-v2 sec. 3.3). Not causal: it judges whole clips.

Axes: B batch, C channels, T frames, H W pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class DiscriminatorConfig:
    channels: int = 3
    """Image channels."""
    base_width: int = 64
    """Width of the first block; doubles per block up to max_width."""
    max_width: int = 512
    """Upper bound on block widths."""
    n_blocks: int = 4
    """Residual blocks, each halving H and W (and T while T > 1)."""

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"discriminator.n_blocks must be >= 1, got {self.n_blocks}")


def blur_downsample(x: torch.Tensor) -> torch.Tensor:
    """Anti-aliased 2× downsampling: a [1, 2, 1] blur, then stride 2 (in time only if T > 1)."""
    # x: (B, C, T, H, W) → (B, C, ceil(T/2), H/2, W/2)
    c = x.shape[1]
    k1 = x.new_tensor([1.0, 2.0, 1.0]) / 4
    st = 2 if x.shape[2] > 1 else 1
    kt = k1 if st == 2 else k1.new_ones(1)
    kernel = kt[:, None, None] * k1[None, :, None] * k1[None, None, :]
    kernel = kernel.expand(c, 1, *kernel.shape).contiguous()
    pad_t = 1 if st == 2 else 0
    x = F.pad(x, (1, 1, 1, 1, pad_t, pad_t), mode="replicate")
    return F.conv3d(x, kernel, stride=(st, 2, 2), groups=c)


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, T, H, W) → (B, C_out, T', H/2, W/2)
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = blur_downsample(F.leaky_relu(self.conv2(h), 0.2))
        return (h + self.skip(blur_downsample(x))) / 2**0.5


class Discriminator3D(nn.Module):
    """Video ``(B, C, T, H, W)`` → logits ``(B,)``."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        widths = [
            min(config.base_width * 2**i, config.max_width) for i in range(config.n_blocks + 1)
        ]
        self.conv_in = nn.Conv3d(config.channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(widths[i], widths[i + 1]) for i in range(config.n_blocks)
        )
        self.norm_out = nn.GroupNorm(1, widths[-1])
        self.head = nn.Linear(widths[-1], 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv_in(video), 0.2)
        for block in self.blocks:
            x = block(x)
        x = F.leaky_relu(self.norm_out(x), 0.2)  # (B, C, T', H', W')
        return self.head(x.mean(dim=(2, 3, 4))).squeeze(-1)  # (B,)
