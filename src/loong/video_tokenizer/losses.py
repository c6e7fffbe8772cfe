"""Tokenizer losses (VQGAN, Esser et al. 2021; MAGVIT-v2, Yu et al. 2023).

- reconstruction: L1 or L2 in pixel space, optionally weighted up near the clip's edges
  (``edge_weights``: where a corner is, the pixel loss pays for only a handful of pixels), and
  optionally with the gradient difference loss (Mathieu et al. 2016), which compares the
  magnitudes of neighbouring-pixel differences and so penalises edges that the pixel loss lets
  blur; or, for a decoder with ``output_levels``, cross-entropy against each pixel value's
  nearest level;
- perceptual: distances between VGG16 features of frames (LPIPS-style, without learned layer
  weights), on only when the user gives a weights file: nothing is downloaded;
- GAN: hinge loss on a 3D discriminator; the generator term is scaled by VQGAN's adaptive weight
  λ = ‖∇L_rec‖ / (‖∇L_G‖ + 1e-4) at the decoder's last layer, clamped to [0, 1e4];
- LeCam regularisation (Tseng et al. 2021) of the discriminator against EMAs of its outputs.

Axes: B batch, C channels, T frames, H W pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from loong.train.dist import all_reduce_mean
from loong.video_tokenizer.model import video_to_levels


def reconstruction_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    kind: str = "l1",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean L1 or L2 error; with ``weights`` (broadcast against ``recon``, e.g. from
    :func:`edge_weights`), the weighted mean Σ w·err / Σ w."""
    if kind == "l1":
        err = (recon - target).abs()
    elif kind == "l2":
        err = (recon - target).square()
    else:
        raise ValueError(f'reconstruction loss must be "l1" or "l2", got {kind!r}')
    return _weighted_mean(err, weights)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Σ w·v / Σ w with ``weights`` broadcast against ``values``; the plain mean without."""
    if weights is None:
        return values.mean()
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum()


def edge_weights(target: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel weights 1 + strength · r, with r ∈ [0, 1] the range of ``target (B, C, T, H, W)``
    (values in [-1, 1]) over each pixel's 3×3 neighbourhood, the largest over channels.

    Returns (B, 1, T, H, W). A flat region weighs 1; both sides of a full-contrast edge weigh
    1 + strength. Small objects on a flat background are a few percent of the pixels and their
    corners a few of those, so a plain pixel loss learns a rounded blob first and pays little to
    sharpen it; the weights move the loss onto the outlines. A function of the clip alone, so it
    carries no gradient.
    """
    frames = rearrange(target.detach().float(), "b c t h w -> (b t) c h w")
    hi = F.max_pool2d(frames, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-frames, 3, stride=1, padding=1)
    spread = ((hi - lo) / 2).amax(dim=1, keepdim=True).clamp(0.0, 1.0)  # (B·T, 1, H, W)
    spread = rearrange(spread, "(b t) c h w -> b c t h w", b=target.shape[0])
    return 1.0 + strength * spread


def level_loss(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of level logits ``(B, C, n, T, H, W)`` against the nearest of the n
    levels to each value of ``target (B, C, T, H, W)``; with ``weights``, as in
    :func:`reconstruction_loss`, the weighted mean."""
    levels = video_to_levels(target, logits.shape[2])  # (B, C, T, H, W)
    ce = F.cross_entropy(logits.float().transpose(1, 2), levels, reduction="none")
    return _weighted_mean(ce, weights)  # ce: (B, C, T, H, W)


def gradient_difference_loss(
    recon: torch.Tensor, target: torch.Tensor, kind: str = "l1"
) -> torch.Tensor:
    """Σ over the two spatial axes of the mean | |∂ recon| − |∂ target| | (``"l1"``) or its square.

    ``recon``, ``target``: (..., H, W). A blurred edge has smaller differences than the sharp
    one it stands for; a pixel loss pays little for it when the edge's place is uncertain.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f'gradient difference loss must be "l1" or "l2", got {kind!r}')
    loss = recon.new_zeros(())
    for dim in (-1, -2):
        gap = recon.diff(dim=dim).abs() - target.diff(dim=dim).abs()
        loss = loss + (gap.abs() if kind == "l1" else gap.square()).mean()
    return loss


# --- perceptual loss -------------------------------------------------------------------------

# VGG16's convolutional trunk as (out_channels or "M" for max-pool); module indices match
# torchvision's `vgg16().features`, so its state dict (keys `features.N.weight`) loads as is.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class VGG16Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        # images: (N, 3, H, W) in [−1, 1] → feature maps at the taps
        x = ((images + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out


class PerceptualLoss(nn.Module):
    """Mean over taps of the squared distance between channel-normalised VGG16 features."""

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        self.net = VGG16Features()
        self.net.load_state_dict(load_vgg16_weights(weights_path), strict=False)
        self.net.requires_grad_(False).eval()

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # recon, target: (B, C, T, H, W) → scalar
        x = rearrange(recon, "b c t h w -> (b t) c h w")
        y = rearrange(target, "b c t h w -> (b t) c h w")
        loss = recon.new_zeros(())
        for fx, fy in zip(self.net(x), self.net(y), strict=True):
            fx, fy = F.normalize(fx, dim=1, eps=1e-10), F.normalize(fy, dim=1, eps=1e-10)
            loss = loss + (fx - fy).square().sum(1).mean()
        return loss

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()  # a fixed feature network
        return self


def load_vgg16_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read VGG16 weights (torchvision key names) from .safetensors or a tensors-only .pth file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{path} is not a tensors-only state dict ({e}); save VGG16's state_dict() "
                "with torch.save or as .safetensors"
            ) from None
    state = {k: v for k, v in state.items() if k.startswith("features.")}
    expected = {k for k in VGG16Features().state_dict() if k.startswith("features.")}
    if set(state) != expected:
        raise ValueError(
            f"{path} does not hold VGG16 features: expected keys like 'features.0.weight' "
            f"(torchvision's vgg16().state_dict()), missing {sorted(expected - set(state))[:4]}"
        )
    return state


# --- adversarial losses ----------------------------------------------------------------------


def discriminator_hinge_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


class LeCam(nn.Module):
    """LeCam regulariser: keeps D(real) near the EMA of D(fake) and vice versa."""

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # means over the global batch: the same on every rank
            self.ema_real.lerp_(all_reduce_mean(real.mean().float()), 1 - self.decay)
            self.ema_fake.lerp_(all_reduce_mean(fake.mean().float()), 1 - self.decay)
        return (
            F.relu(real - self.ema_fake).square().mean()
            + F.relu(self.ema_real - fake).square().mean()
        )


def adaptive_generator_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's λ = ‖∇L_rec‖ / (‖∇L_G‖ + 1e-4) at ``last_layer``, detached, clamped to [0, max].

    With data parallelism the gradients are averaged over ranks first: they are then those of
    the global batch, and λ is the same on every rank.
    """
    rec_grad = all_reduce_mean(torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0])
    g_grad = all_reduce_mean(torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0])
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
