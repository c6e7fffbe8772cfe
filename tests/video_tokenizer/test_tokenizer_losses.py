"""Tokenizer losses (VQGAN, MAGVIT-v2) and the 3D discriminator, on toy inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from loong.video_tokenizer.discriminator import (
    Discriminator3D,
    DiscriminatorConfig,
    blur_downsample,
)
from loong.video_tokenizer.losses import (
    LeCam,
    PerceptualLoss,
    VGG16Features,
    adaptive_generator_weight,
    discriminator_hinge_loss,
    edge_weights,
    generator_loss,
    gradient_difference_loss,
    level_loss,
    load_vgg16_weights,
    reconstruction_loss,
)
from loong.video_tokenizer.model import video_to_levels


def test_reconstruction_loss_kinds():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    assert reconstruction_loss(a, b, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(a, b, "l2").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match='"l1" or "l2"'):
        reconstruction_loss(a, b, "huber")


def _square(blur: int) -> torch.Tensor:
    """A 16×16 frame (1, 1, 16, 16) holding a bright square, its edges box-blurred over ``blur``."""
    frame = torch.zeros(1, 1, 16, 16)
    frame[..., 4:12, 4:12] = 1.0
    if blur > 1:
        frame = torch.nn.functional.avg_pool2d(frame, blur, stride=1, padding=blur // 2)
    return frame


def test_gradient_difference_loss_is_zero_on_the_target_and_grows_with_blur():
    sharp = _square(1)
    losses = [gradient_difference_loss(_square(b), sharp, "l1").item() for b in (1, 3, 5)]
    assert losses[0] == 0.0
    assert 0.0 < losses[1] < losses[2]
    # a constant offset keeps every edge: the pixel loss pays for it, this loss does not
    assert gradient_difference_loss(sharp + 0.3, sharp, "l2").item() == pytest.approx(0.0)
    assert reconstruction_loss(sharp + 0.3, sharp, "l2").item() > 0.0
    with pytest.raises(ValueError, match='"l1" or "l2"'):
        gradient_difference_loss(sharp, sharp, "huber")


def test_edge_weights_mark_both_sides_of_an_edge_by_its_contrast():
    # (B, C, T, H, W) = (1, 3, 2, 16, 16) in [-1, 1]: a black frame holding a white 8×8 square
    # (contrast 2, the most), and a frame whose square differs by 0.5 in one channel only
    clip = torch.full((1, 3, 2, 16, 16), -1.0)
    clip[:, :, 0, 4:12, 4:12] = 1.0
    clip[:, 1, 1, 4:12, 4:12] = -0.5
    w = edge_weights(clip, 4.0)
    assert w.shape == (1, 1, 2, 16, 16)
    near = torch.zeros(16, 16, dtype=torch.bool)
    near[3:13, 3:13] = True
    near[5:11, 5:11] = False  # one pixel either side of the outline
    assert torch.equal(w[0, 0, 0][near], torch.full((int(near.sum()),), 5.0))
    assert torch.equal(w[0, 0, 0][~near], torch.ones(int((~near).sum())))
    assert torch.allclose(w[0, 0, 1][near], torch.full((int(near.sum()),), 2.0))  # 1 + 4 · 0.25
    assert torch.equal(edge_weights(torch.zeros(1, 3, 1, 4, 4), 4.0), torch.ones(1, 1, 1, 4, 4))


def test_weighted_losses_are_weighted_means():
    recon, target = torch.zeros(2, 3, 1, 4, 4), torch.zeros(2, 3, 1, 4, 4)
    recon[..., :2] = 1.0  # wrong (by 1) on the left half only
    ones = torch.ones(2, 1, 1, 4, 4)
    left = torch.zeros(2, 1, 1, 4, 4)
    left[..., :2] = 1.0
    for kind in ("l1", "l2"):
        plain = reconstruction_loss(recon, target, kind).item()
        assert plain == pytest.approx(0.5)
        assert reconstruction_loss(recon, target, kind, ones).item() == pytest.approx(plain)
        assert reconstruction_loss(recon, target, kind, left).item() == pytest.approx(1.0)
        assert reconstruction_loss(recon, target, kind, 1 - left).item() == 0.0
        # weight 3 on the wrong half: 3/4 of the weight is on an error of 1
        assert reconstruction_loss(recon, target, kind, 1 + 2 * left).item() == pytest.approx(0.75)
    logits = torch.randn(2, 3, 8, 1, 4, 4)
    assert level_loss(logits, target, ones).item() == pytest.approx(
        level_loss(logits, target).item(), rel=1e-5
    )
    # all the weight on one pixel: that pixel's cross-entropy, averaged over B and C
    pixel = torch.zeros(2, 1, 1, 4, 4)
    pixel[..., 1, 2] = 1.0
    levels = video_to_levels(target, 8)[..., 0, 1, 2].flatten()  # (B·C,)
    ce = F.cross_entropy(logits[..., 0, 1, 2].flatten(0, 1), levels)
    assert level_loss(logits, target, pixel).item() == pytest.approx(ce.item(), rel=1e-5)


def test_gradient_difference_loss_by_hand():
    # two identical rows: along H every difference is 0; along W the recon's are 0.5, 0.5 and
    # the target's 0, 1, so each gap is 0.5
    recon = torch.tensor([[0.0, 0.5, 1.0]]).repeat(2, 1)
    target = torch.tensor([[0.0, 0.0, 1.0]]).repeat(2, 1)
    assert gradient_difference_loss(recon, target, "l1").item() == pytest.approx(0.5)
    assert gradient_difference_loss(recon, target, "l2").item() == pytest.approx(0.25)


def test_adaptive_generator_weight_is_the_ratio_of_gradient_norms():
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x, target = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    out = layer(x)  # (8, 3)
    rec = (out - target).square().mean()
    g_loss = -(out * torch.linspace(-1, 2, 3)).mean()

    # By hand: ∂/∂W mean((Wx + b − t)²) = 2 (out − t)ᵀ x / (N·C)
    # and ∂/∂W −mean(out·c) = −c Σ_n xₙᵀ / (N·C).
    n, c = out.shape
    rec_grad = 2 / (n * c) * (out - target).detach().T @ x
    g_grad = -(torch.linspace(-1, 2, 3)[:, None] * x.sum(0)[None, :]) / (n * c)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)

    weight = adaptive_generator_weight(rec, g_loss, layer.weight)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    # The graph is kept for the real backward that follows.
    (rec + weight * g_loss).backward()
    assert layer.weight.grad is not None


def test_adaptive_generator_weight_is_clamped():
    layer = torch.nn.Linear(4, 2)
    out = layer(torch.ones(3, 4))
    rec = out.square().mean() + 10.0
    flat = 0.0 * out.sum()  # zero generator gradient: λ = ‖∇L_rec‖ / 1e-4, clamped
    assert adaptive_generator_weight(rec, flat, layer.weight, max_weight=7.0).item() == 7.0


def test_lecam_emas_move_toward_the_means():
    lecam = LeCam(decay=0.9)
    real, fake = torch.full((16,), 2.0), torch.full((16,), -3.0)
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2)  # lerp from 0 by 1 − decay
    assert lecam.ema_fake.item() == pytest.approx(-0.3)
    for _ in range(200):
        reg = lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(2.0, abs=1e-6)
    assert lecam.ema_fake.item() == pytest.approx(-3.0, abs=1e-6)
    # relu(real − ema_fake)² + relu(ema_real − fake)² with the EMAs at the means: 5² + 5².
    assert reg.item() == pytest.approx(50.0, rel=1e-4)
    # Only the EMAs are state; the regulariser differentiates through its inputs.
    real = real.clone().requires_grad_()
    lecam(real, fake).backward()
    assert (real.grad > 0).all()


def test_discriminator_hinge_loss():
    assert discriminator_hinge_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])) == 0
    # Each side's margin violation counts: relu(1 − 0.5) + relu(1 + 0) = 1.5.
    assert discriminator_hinge_loss(torch.tensor([0.5]), torch.tensor([0.0])).item() == 1.5
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0


@pytest.fixture
def vgg_weights(tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in VGG16Features().state_dict().items() if k.startswith("features.")}
    path = tmp_path / "vgg16.safetensors"
    save_file(state, str(path))
    return path, state


def test_perceptual_loss(vgg_weights):
    path, state = vgg_weights
    loss_fn = PerceptualLoss(path)
    assert torch.equal(loss_fn.net.features[0].weight, state["features.0.weight"])
    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 2, 32, 32, generator=g) * 2 - 1
    assert loss_fn(target, target).item() == pytest.approx(0.0, abs=1e-10)
    recon = (target + 0.3 * torch.randn(target.shape, generator=g)).requires_grad_()
    loss = loss_fn(recon, target)
    assert loss.item() > 1e-4
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())  # the feature net stays fixed
    assert not loss_fn.train().net.training


def test_perceptual_weights_with_wrong_keys_raise(tmp_path):
    path = tmp_path / "not-vgg.safetensors"
    save_file({"features.0.weight": torch.zeros(2, 3, 3, 3), "other": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="does not hold VGG16 features"):
        PerceptualLoss(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_vgg16_weights(tmp_path / "missing.safetensors")


def test_vgg16_weights_load_from_tensors_only_pth(vgg_weights, tmp_path):
    _, state = vgg_weights
    torch.save(state, tmp_path / "vgg16.pth")
    loaded = load_vgg16_weights(tmp_path / "vgg16.pth")
    assert loaded.keys() == state.keys()


def test_discriminator_maps_videos_and_images_to_one_logit():
    torch.manual_seed(0)
    disc = Discriminator3D(DiscriminatorConfig(base_width=8, max_width=32, n_blocks=3))
    video = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    logits = disc(video)
    assert logits.shape == (2,)
    assert disc(video[:, :, :1]).shape == (2,)
    # Batch items are judged independently.
    torch.testing.assert_close(disc(video[1:]), logits[1:], rtol=1e-5, atol=1e-6)
    logits.sum().backward()
    assert disc.conv_in.weight.grad.abs().sum() > 0


def test_blur_downsample_shapes_and_constants():
    x = torch.full((1, 2, 9, 8, 8), 3.0)
    y = blur_downsample(x)
    assert y.shape == (1, 2, 5, 4, 4)
    torch.testing.assert_close(y, torch.full_like(y, 3.0))  # a normalised blur keeps constants
    assert blur_downsample(x[:, :, :1]).shape == (1, 2, 1, 4, 4)
