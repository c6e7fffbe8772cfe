"""PSNR and SSIM per video: known values, and the same figures under autocast."""

from __future__ import annotations

import math

import torch

from loong.evaluate.metrics import psnr, ssim


def _videos(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 3, 32, 32, generator=g) * 2 - 1  # (B, C, T, H, W) in [-1, 1]


def test_psnr_is_that_of_8_bit_pixels_per_video():
    target = torch.zeros(2, 3, 2, 8, 8)
    recon = target.clone()
    recon[1] += 0.2  # 0.1 of the [0, 1] range: MSE 0.01, 20 dB
    assert math.isclose(psnr(recon, target)[1].item(), 20.0, rel_tol=1e-5)
    assert psnr(recon, target)[0].item() == 100.0  # identical: the floor's 1e-10 MSE
    assert math.isclose(psnr(target + 5, target)[0].item(), psnr(target + 2, target)[0].item())


def test_ssim_is_one_for_identical_videos_and_falls_with_noise():
    target = _videos()
    assert torch.allclose(ssim(target, target), torch.ones(2))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(target.shape, generator=g)
    little, more = ssim(target + 0.05 * noise, target), ssim(target + 0.3 * noise, target)
    assert (more < little).all() and (little < 1).all()


def test_ssim_is_computed_in_fp32_under_autocast():
    target = _videos()
    recon = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    plain = ssim(recon, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ssim(recon, target)
    assert autocast.dtype == torch.float32
    assert torch.allclose(autocast, plain, atol=1e-6)
