"""Causal 3D CNN video tokenizer (MAGVIT-v2, Yu et al. 2023; also Loong's, Wang et al. 2024).

Encoder: causal conv in → stages of residual blocks (per-frame GroupNorm → SiLU → causal 3×3×3
conv, twice) with strided causal convs between stages (temporal stride only in the last ones) →
norm → 1×1×1 conv to the latent width → quantizer. Decoder: the mirror image, upsampling by
depth-to-space (dropping the frame before frame 0 after each temporal ×2, so 5 → 9 → 17) and
adaptive GroupNorm whose scale and shift come from the quantized latent; its output is pixel
values, or with ``output_levels`` logits over evenly spaced values. With ``local_encoder``
the encoder's downsampling is 2×2 patch merging and its convolutions are 1×1 in space, with a
per-position LayerNorm, so each token sees only its own cell of pixels (and that cell's past).
With ``encoder_history`` the past is bounded too: each latent frame is encoded from a short
window of frames as a fresh clip (:meth:`VideoTokenizer.encode_latents`), so equal content gets
equal codes whatever came before it.

Causality makes 1 + 4k frames → 1 + k latent frames, an image the same as a video's first frame,
and chunked encoding and decoding equal to the one-shot result (see :class:`StreamCache`).

Axes: B batch, C channels, T frames, H W pixels, t h w latent grid, D latent width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from loong.video_tokenizer.causal_conv import (
    CausalConv3d,
    StreamCache,
    depth_to_space,
    space_to_depth,
)
from loong.video_tokenizer.norm import cell_affine, frame_group_norm
from loong.video_tokenizer.quantize import QuantizerConfig, QuantizerOutput, build_quantizer


@dataclass(kw_only=True)
class VideoTokenizerConfig:
    channels: int = 3
    """Image channels (3 for RGB)."""
    patch_size: int = 1
    """Space-to-depth factor before the first conv (and depth-to-space after the last): p×p
    pixels become one position of p²·channels, so no conv runs at full resolution. 1: off."""
    base_width: int = 128
    """Width of the first encoder stage; stage i has base_width · width_mults[i] channels."""
    width_mults: tuple[int, ...] = (1, 2, 2, 4)
    """Width multiplier per stage; len(width_mults) − 1 downsampling steps of 2× in space."""
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """Per downsampling step, whether it also halves time (MAGVIT-v2: only the last ones)."""
    encoder_blocks: int = 4
    """Residual blocks per encoder stage."""
    decoder_blocks: int = 4
    """Residual blocks per decoder stage."""
    num_groups: int = 32
    """GroupNorm groups; every stage width must be divisible by it."""
    local_encoder: bool = False
    """Encoder sees only each token's own cell: 2×2 patch merges instead of strided 3×3 convs,
    spatially 1×1 convs (still causal 3-frame kernels in time) and a per-position channel norm
    instead of GroupNorm. A token is then a function of its f×f pixel cell and that cell's past,
    so identical cells get identical codes (a flat background one code everywhere), which is
    far easier for a language model to predict than codes that shift with content a frame
    away. The decoder keeps its full context either way."""
    encoder_history: int | None = None
    """Latent frames of past the encoder may look back on; None: all (fully causal). With
    k ≥ 0, latent frame t ≥ 1 is encoded from frames r(t − 1 − k) .. rt alone, as a fresh clip
    of 1 + r(k + 1) frames (r the temporal compression): its own r frames, the r·k frames
    before them and one more. Equal content over that span then gets equal codes whatever
    came earlier, so a language model need not learn codes that drift with a token's
    history. Costs (1 + r(k + 1)) / r times the encoder's work on long videos."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """The quantizer between encoder and decoder."""
    output_levels: int = 0
    """0: the decoder regresses every pixel value. n ≥ 2: it gives, per pixel and channel, a
    distribution over n values evenly spaced in [−1, 1], trained by cross-entropy, and a
    reconstruction is the most likely value refined by its two neighbours (see
    :func:`levels_to_video`). Where an edge's place is uncertain a regression draws the mean of
    the places, a soft edge; the most likely value keeps it hard. The head is a 1×1×1 conv."""

    def __post_init__(self) -> None:
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)
        self.width_mults = tuple(self.width_mults)
        self.temporal_downsample = tuple(bool(x) for x in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.width_mults) - 1:
            raise ValueError(
                f"temporal_downsample needs one entry per downsampling step "
                f"(len(width_mults) − 1 = {len(self.width_mults) - 1}), "
                f"got {len(self.temporal_downsample)}"
            )
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.output_levels == 1 or self.output_levels < 0:
            raise ValueError(
                f"output_levels must be 0 (regression) or >= 2, got {self.output_levels}"
            )
        if self.encoder_history is not None and self.encoder_history < 0:
            raise ValueError(
                f"encoder_history must be >= 0 or None (full history), got {self.encoder_history}"
            )
        for w in self.widths:
            if w % self.num_groups:
                raise ValueError(
                    f"stage width {w} is not divisible by num_groups={self.num_groups}: "
                    "change base_width or num_groups"
                )

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in self.width_mults)

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * 2 ** (len(self.width_mults) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size


# --- building blocks -------------------------------------------------------------------------


class Norm(nn.Module):
    """Per-frame GroupNorm; adaptive (scale, shift from the latent) when ``latent_dim`` is set."""

    def __init__(self, channels: int, groups: int, latent_dim: int | None = None) -> None:
        super().__init__()
        self.adaptive = latent_dim is not None
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=not self.adaptive)
        if latent_dim is not None:
            self.scale = nn.Conv3d(latent_dim, channels, 1)
            self.shift = nn.Conv3d(latent_dim, channels, 1)
            # Start as a plain norm: scale 1, shift 0.
            for conv in (self.scale, self.shift):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, T, H, W); z: (B, D, T, h, w) the latent stretched to x's frames
        if not self.adaptive:
            return frame_group_norm(self.norm, x)
        assert z is not None
        # The 1×1×1 convs commute with nearest-neighbour upsampling, so scale and shift are
        # computed on the latent grid (B, C, T, h, w) and applied to each f×f pixel cell: the
        # latent is never upsampled to the pixels.
        x = frame_group_norm(self.norm, x)
        scale = (1 + self.scale(z)).to(x.dtype)
        return cell_affine(x, scale, self.shift(z).to(x.dtype))


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every position: no statistic crosses positions or frames."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, T, H, W)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ResBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        groups: int,
        latent_dim: int | None = None,
        *,
        local: bool = False,
    ) -> None:
        super().__init__()
        # local: 1×1 in space (causal 3 frames in time), per-position norm (see local_encoder)
        kernel = (3, 1, 1) if local else (3, 3, 3)
        self.norm1 = ChannelNorm(in_ch) if local else Norm(in_ch, groups, latent_dim)
        self.conv1 = CausalConv3d(in_ch, out_ch, kernel)
        self.norm2 = ChannelNorm(out_ch) if local else Norm(out_ch, groups, latent_dim)
        self.conv2 = CausalConv3d(out_ch, out_ch, kernel)
        self.skip = CausalConv3d(in_ch, out_ch, (1, 1, 1)) if in_ch != out_ch else None

    def forward(
        self, x: torch.Tensor, cache: StreamCache, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, C_in, T, H, W) → (B, C_out, T, H, W)
        h = self.conv1(F.silu(self.norm1(x, z)), cache)
        h = self.conv2(F.silu(self.norm2(h, z)), cache)
        return h + (self.skip(x, cache) if self.skip is not None else x)


class Upsample(nn.Module):
    """2× in space (and optionally time): a causal conv to C_out·s_t·4 channels, depth-to-space."""

    def __init__(self, in_channels: int, out_channels: int, time: bool) -> None:
        super().__init__()
        self.time = 2 if time else 1
        self.conv = CausalConv3d(in_channels, out_channels * self.time * 4)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        # (B, C_in, T, H, W) → (B, C_out, T·s_t, 2H, 2W)
        x = depth_to_space(self.conv(x, cache), self.time, 2)
        if self.time == 2 and cache.first:
            x = x[:, :, 1:]  # frame 0 upsamples alone: drop the frame before it (5 → 9)
        return x


class PatchMerge(nn.Module):
    """2× down in space (and optionally time) that sees only each 2×2 cell: space-to-depth,
    then a causal conv that is 1×1 in space."""

    def __init__(self, in_channels: int, out_channels: int, time: bool) -> None:
        super().__init__()
        self.conv = CausalConv3d(
            in_channels * 4, out_channels, (3, 1, 1), stride=(2 if time else 1, 1, 1)
        )

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        # (B, C_in, T, H, W) → (B, C_out, T', H/2, W/2)
        return self.conv(space_to_depth(x, 2), cache)


def levels_to_video(logits: torch.Tensor) -> torch.Tensor:
    """Level logits ``(B, C, n, T, H, W)`` → video ``(B, C, T, H, W)`` in [−1, 1].

    The most likely of the n levels (evenly spaced in [−1, 1]), refined by the probability-
    weighted mean of it and its two neighbours: sub-level precision where the decoder is sure
    of a value, and no blend of far-apart values where it hesitates between them.
    """
    n = logits.shape[2]
    probs = F.pad(logits.float().softmax(dim=2), (0, 0, 0, 0, 0, 0, 1, 1))  # (B, C, n + 2, T, H, W)
    values = F.pad(torch.linspace(-1, 1, n, device=logits.device), (1, 1))  # (n + 2,)
    best = probs.argmax(dim=2, keepdim=True)  # (B, C, 1, T, H, W), in 1 .. n
    near = best + torch.arange(-1, 2, device=logits.device).view(1, 1, 3, 1, 1, 1)
    weight = probs.gather(2, near)  # (B, C, 3, T, H, W): past either end a weight of 0
    value = (weight * values[near]).sum(dim=2) / weight.sum(dim=2)
    return value.to(logits.dtype)


def video_to_levels(video: torch.Tensor, n: int) -> torch.Tensor:
    """Video ``(B, C, T, H, W)`` in [−1, 1] → index of the nearest of n levels, same shape."""
    return ((video.float().clamp(-1, 1) + 1) * ((n - 1) / 2)).round().long()


def stretch_latent(z: torch.Tensor, frames: int, first: bool) -> torch.Tensor:
    """Repeat latent frames ``(B, D, t, h, w)`` to ``(B, D, frames, h, w)``, causally.

    Frame 0 comes from latent frame 0 and each later latent frame covers the next ``r`` frames
    (in a chunk after the first, every latent frame covers ``r``).
    """
    t = z.shape[2]
    index = torch.arange(frames, device=z.device)
    if first:
        r = (frames - 1) // max(t - 1, 1)
        index = (index + r - 1) // r if t > 1 else torch.zeros_like(index)
    else:
        index = index // (frames // t)
    return z.index_select(2, index)


# --- encoder and decoder ---------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VideoTokenizerConfig) -> None:
        super().__init__()
        widths = cfg.widths
        self.patch_size = cfg.patch_size
        local = cfg.local_encoder
        kernel_in = (3, 1, 1) if local else (3, 3, 3)
        self.conv_in = CausalConv3d(cfg.channels * cfg.patch_size**2, widths[0], kernel_in)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        in_ch = widths[0]
        for i, w in enumerate(widths):
            blocks = [
                ResBlock(in_ch if j == 0 else w, w, cfg.num_groups, local=local)
                for j in range(cfg.encoder_blocks)
            ]
            self.stages.append(nn.ModuleList(blocks))
            in_ch = w
            if i < len(widths) - 1:
                time = cfg.temporal_downsample[i]
                stride = (2 if time else 1, 2, 2)
                self.downsamples.append(
                    PatchMerge(w, w, time)
                    if local
                    else CausalConv3d(w, w, (3, 3, 3), stride=stride)
                )
        self.norm_out = ChannelNorm(widths[-1]) if local else Norm(widths[-1], cfg.num_groups)
        self.conv_out = CausalConv3d(widths[-1], cfg.quantizer.latent_dim, (1, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        # x: (B, C, T, H, W) → (B, D, t, h, w)
        p = self.patch_size
        if p > 1:
            x = space_to_depth(x, p)
        x = self.conv_in(x, cache)
        for i, blocks in enumerate(self.stages):
            for block in blocks:
                x = block(x, cache)
            if i < len(self.downsamples):
                x = self.downsamples[i](x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: VideoTokenizerConfig) -> None:
        super().__init__()
        widths = cfg.widths[::-1]
        d = cfg.quantizer.latent_dim
        temporal = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(d, widths[0])
        self.stages = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        in_ch = widths[0]
        for i, w in enumerate(widths):
            blocks = [
                ResBlock(in_ch if j == 0 else w, w, cfg.num_groups, latent_dim=d)
                for j in range(cfg.decoder_blocks)
            ]
            self.stages.append(nn.ModuleList(blocks))
            in_ch = w
            if i < len(widths) - 1:
                # The upsampling conv already narrows to the next stage's width, which keeps
                # the costliest conv (C_out·4·s_t outputs at the larger grid) affordable.
                self.upsamples.append(Upsample(w, widths[i + 1], temporal[i]))
                in_ch = widths[i + 1]
        self.norm_out = Norm(widths[-1], cfg.num_groups, latent_dim=d)
        self.patch_size = cfg.patch_size
        self.levels = cfg.output_levels
        out = cfg.channels * cfg.patch_size**2
        self.conv_out = (
            CausalConv3d(widths[-1], out * self.levels, (1, 1, 1))
            if self.levels
            else CausalConv3d(widths[-1], out)
        )

    def forward(self, z: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        # z: (B, D, t, h, w) quantized → values (B, C, T, H, W), or with output_levels n the
        # level logits (B, C, n, T, H, W)
        x = self.conv_in(z, cache)
        for i, blocks in enumerate(self.stages):
            zi = stretch_latent(z, x.shape[2], cache.first)  # (B, D, T_i, h, w)
            for block in blocks:
                x = block(x, cache, zi)
            if i < len(self.upsamples):
                x = self.upsamples[i](x, cache)
        zi = stretch_latent(z, x.shape[2], cache.first)
        x = self.conv_out(F.silu(self.norm_out(x, zi)), cache)
        x = depth_to_space(x, 1, self.patch_size) if self.patch_size > 1 else x
        if self.levels:  # channel c·n + level, the order depth_to_space leaves them in
            x = x.unflatten(1, (-1, self.levels))  # (B, C, n, T, H, W)
        return x

    def video(self, z: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """Quantized latent ``(B, D, t, h, w)`` → video ``(B, C, T, H, W)`` (not clamped)."""
        x = self(z, cache)
        return levels_to_video(x) if self.levels else x

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight VQGAN's adaptive GAN weight takes gradient norms at."""
        return self.conv_out.conv.weight


# --- the tokenizer ---------------------------------------------------------------------------


@dataclass
class TokenizerOutput:
    recon: torch.Tensor
    """(B, C, T, H, W) reconstruction in [−1, 1] (not clamped)."""
    logits: torch.Tensor | None
    """(B, C, n, T, H, W) level logits when the decoder has ``output_levels``; else None."""
    indices: torch.Tensor | None
    """(B, t, h, w) token indices; None when the latent was not quantized."""
    quantizer_loss: torch.Tensor
    """Scalar weighted quantizer loss."""
    stats: dict[str, torch.Tensor]
    """Detached scalars to log (codebook perplexity and usage, loss terms)."""


class VideoTokenizer(nn.Module):
    """Video ``(B, C, T, H, W)`` in [−1, 1], ``T = 1 + 4k`` → indices ``(B, 1 + k, H/8, W/8)``.

    ``forward`` is the training path (reconstruction plus quantizer loss); ``encode`` and
    ``decode`` are the inference API and take ``chunk_frames`` / ``chunk_latents`` to bound
    memory on long videos with a result equal to the one-shot one.
    """

    def __init__(self, config: VideoTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(config.quantizer)
        self.decoder = Decoder(config)

    # -- construction and files

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> VideoTokenizer:
        """An untrained tokenizer of a named size (see :mod:`loong.video_tokenizer.presets`)."""
        from loong.video_tokenizer.presets import tokenizer_preset

        return cls(tokenizer_preset(name, **overrides))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu"
    ) -> VideoTokenizer:
        """Load ``config.json`` + ``model.safetensors`` written by :meth:`save_pretrained`."""
        from loong.pretrained import load_pretrained

        config, state = load_pretrained(directory, VideoTokenizerConfig, kind="video_tokenizer")
        model = cls(config)
        model.load_state_dict(state)
        return model.to(device).eval()

    def save_pretrained(self, directory: str | Path) -> None:
        from loong.pretrained import save_pretrained

        save_pretrained(self, self.config, directory, kind="video_tokenizer")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- shapes

    def check_video(self, video: torch.Tensor, *, first_chunk: bool = True) -> None:
        """Raise a ValueError naming the fix when ``video`` is not ``(B, C, 1 + 4k, H, W)``."""
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != cfg.channels:
            raise ValueError(
                f"video must be (B, {cfg.channels}, T, H, W) float in [-1, 1], got shape "
                f"{tuple(video.shape)}; a single clip (C, T, H, W) needs video.unsqueeze(0)"
            )
        t, h, w = video.shape[2:]
        r, s = cfg.temporal_compression, cfg.spatial_compression
        if first_chunk and (t - 1) % r:
            lo = t - (t - 1) % r
            raise ValueError(f"frames must be 1+{r}k, got {t}: pass {lo} or {lo + r}")
        if not first_chunk and t % r:
            raise ValueError(f"a chunk after the first must hold a multiple of {r} frames, got {t}")
        if h % s or w % s:
            raise ValueError(
                f"height and width must be multiples of {s}, got {h}×{w}: crop or resize"
            )

    # -- training path

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Latent ``(B, D, t, h, w)`` → the quantized latent (same shape and dtype) and quantizer
        output. The quantizer runs in fp32 even under autocast: LFQ's entropy logits are
        latents over a temperature of 0.01, and CVQ's nearest code a difference of distances,
        both of which bf16 rounds away."""
        b, _, t, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            out = self.quantizer(rearrange(z.float(), "b d t h w -> (b t h w) d"))
        quantized = rearrange(out.quantized, "(b t h w) d -> b d t h w", b=b, t=t, h=h, w=w)
        quantized = quantized.to(z.dtype)
        out.indices = out.indices.view(b, t, h, w)
        return quantized, out

    def encode_latents(self, video: torch.Tensor, *, first: bool = True) -> torch.Tensor:
        """Video ``(B, C, T, H, W)`` → continuous latent ``(B, D, t, h, w)`` in one pass.

        With ``encoder_history`` k set, every latent frame is encoded from its own window (see
        the config): frame 0 alone, latent frames 1 .. k from the prefixes they end, and the
        rest from windows of ``1 + r(k + 1)`` frames, batched. ``first=False`` means ``video``
        is a later stretch of a longer video whose first ``1 + rk`` frames are context only:
        the result is then its last ``(T − 1 − rk) / r`` latent frames, every one a full window.
        """
        k = self.config.encoder_history
        if k is None:
            return self.encoder(video, StreamCache())
        r = self.config.temporal_compression
        b, n = video.shape[0], (video.shape[2] - 1) // r  # latent frames after frame 0
        parts = []
        if first:
            parts.append(self.encoder(video[:, :, :1], StreamCache()))  # (B, D, 1, h, w)
            for t in range(1, min(k, n) + 1):  # too early for a full window: the prefix
                parts.append(self.encoder(video[:, :, : 1 + r * t], StreamCache())[:, :, -1:])
        if n > k:
            span = 1 + r * (k + 1)
            windows = video.unfold(2, span, r)  # (B, C, n − k, H, W, span)
            windows = rearrange(windows, "b c n h w s -> (b n) c s h w")
            z = self.encoder(windows, StreamCache())[:, :, -1]  # (B·(n − k), D, h, w)
            parts.append(rearrange(z, "(b n) d h w -> b d n h w", b=b))
        return torch.cat(parts, dim=2)

    def forward(self, video: torch.Tensor, *, quantize: bool = True) -> TokenizerOutput:
        """Encode, quantize and decode ``video`` (B, C, T, H, W). ``quantize=False`` decodes the
        encoder's continuous latent instead (no indices, no quantizer loss): the warm start of
        training's ``continuous_steps``."""
        self.check_video(video)
        z = self.encode_latents(video)  # (B, D, t, h, w)
        if quantize:
            z, q = self.quantize(z)
            indices, loss, stats = q.indices, q.loss, q.stats
        else:
            indices, loss, stats = None, z.new_zeros((), dtype=torch.float32), {}
        out = self.decoder(z, StreamCache())  # (B, C, T, H, W) or (B, C, n, T, H, W)
        logits = out if self.config.output_levels else None
        recon = levels_to_video(out) if logits is not None else out
        return TokenizerOutput(recon, logits, indices, loss, stats)

    # -- inference API

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, t, h, w)`` → quantized latent ``(B, D, t, h, w)``."""
        vocab = self.config.vocab_size
        if indices.min() < 0 or indices.max() >= vocab:
            raise ValueError(
                f"video token indices must lie in [0, {vocab}), got [{int(indices.min())}, "
                f"{int(indices.max())}]: were they offset into a language model's id space?"
            )
        codes = self.quantizer.indices_to_codes(indices.long())  # (B, t, h, w, D)
        return rearrange(codes, "b t h w d -> b d t h w").to(self.decoder.conv_in.conv.weight.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, chunk_frames: int | None = None) -> torch.Tensor:
        """Video ``(B, C, 1 + 4k, H, W)`` in [−1, 1] → indices ``(B, 1 + k, H/8, W/8)``.

        ``chunk_frames`` (a multiple of 4) bounds memory: frame 0 plus the next ``chunk_frames``
        frames go first, then ``chunk_frames`` at a time; the result equals the one-shot one.
        """
        self.check_video(video)
        t = video.shape[2]
        if chunk_frames is None:
            ends = [t]
        elif chunk_frames <= 0 or chunk_frames % self.config.temporal_compression:
            raise ValueError(
                f"chunk_frames must be a positive multiple of {self.config.temporal_compression}, "
                f"got {chunk_frames}"
            )
        else:
            ends = [*range(1 + chunk_frames, t, chunk_frames), t]
        encoder = StreamingEncoder(self)
        start, chunks = 0, []
        for end in ends:
            chunks.append(encoder(video[:, :, start:end]))
            start = end
        return torch.cat(chunks, dim=1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, *, chunk_latents: int | None = None) -> torch.Tensor:
        """Indices ``(B, t, h, w)`` → video ``(B, C, 1 + 4(t − 1), 8h, 8w)`` clamped to [−1, 1]."""
        if indices.ndim != 4:
            raise ValueError(f"indices must be (B, t, h, w), got shape {tuple(indices.shape)}")
        decoder = StreamingDecoder(self)
        step = chunk_latents or indices.shape[1]
        if step <= 0:
            raise ValueError(f"chunk_latents must be positive, got {chunk_latents}")
        return torch.cat([decoder(c) for c in indices.split(step, dim=1)], dim=2)


class StreamingEncoder:
    """Encodes one video chunk by chunk: first ``1 + 4k`` frames, then ``4k`` at a time."""

    def __init__(self, tokenizer: VideoTokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache = StreamCache()
        self.tail: torch.Tensor | None = None
        """With ``encoder_history``: the last frames seen, as many as the next window needs."""

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, C, T, H, W) → indices (B, t, h, w)
        tok = self.tokenizer
        tok.check_video(video, first_chunk=self.cache.first)
        k = tok.config.encoder_history
        if k is None:
            z = tok.encoder(video, self.cache)
        else:
            # The windows of this chunk's latent frames reach back 1 + rk frames before it.
            # While fewer than that came before, the frames so far are a prefix from frame 0.
            r = tok.config.temporal_compression
            keep = 1 + r * k
            whole = video if self.tail is None else torch.cat([self.tail, video], dim=2)
            prefix = self.tail is None or self.tail.shape[2] < keep
            new = 1 + (video.shape[2] - 1) // r if self.tail is None else video.shape[2] // r
            z = tok.encode_latents(whole, first=prefix)[:, :, -new:]  # (B, D, new, h, w)
            self.tail = whole[:, :, -keep:]
        self.cache.first = False
        return tok.quantize(z)[1].indices


class StreamingDecoder:
    """Decodes one video's indices chunk by chunk, frames out as soon as their tokens are in.

    The first call with ``t`` latent frames gives ``1 + 4(t − 1)`` frames, later calls ``4t``.
    """

    def __init__(self, tokenizer: VideoTokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache = StreamCache()

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        # indices: (B, t, h, w) → video (B, C, T, H, W) in [−1, 1]
        z = self.tokenizer.indices_to_latents(indices)
        video = self.tokenizer.decoder.video(z, self.cache)
        self.cache.first = False
        return video.clamp(-1, 1)
