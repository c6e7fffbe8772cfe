"""The training loops' optimiser and learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from loong.train.optim import OptimConfig, adamw


def test_fused_adamw_steps_like_the_plain_one():
    # The loops' fused AdamW against torch's per-tensor loop, over param groups with and
    # without weight decay and a learning rate that changes every step, as in training.
    cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (4, 4, 3)]
    ours = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    plain = [p.detach().clone().requires_grad_() for p in ours]
    fused = adamw([{"params": ours[:1]}, {"params": ours[1:], "weight_decay": 0.0}], cfg)
    reference = torch.optim.AdamW(
        [{"params": plain[:1]}, {"params": plain[1:], "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        foreach=False,
    )
    assert fused.defaults["fused"]
    for step in range(20):
        for opt in (fused, reference):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step, 20)
        grads = [torch.randn(s, generator=g) for s in shapes]
        for params, opt in ((ours, fused), (plain, reference)):
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the weights did move (the comparison is not of untouched tensors)
    start = torch.randn(shapes[0], generator=torch.Generator().manual_seed(0))
    assert (ours[0] - start).abs().max().item() > 1e-2


def test_weight_decay_override():
    p = torch.zeros(3, requires_grad=True)
    assert adamw([p], OptimConfig(weight_decay=0.3)).defaults["weight_decay"] == 0.3
    assert adamw([p], OptimConfig(weight_decay=0.3), weight_decay=0.0).defaults["weight_decay"] == 0


def test_a_step_moves_the_version_counters_as_torchs_default_adamw_does():
    """The fused kernel writes the weights without moving their version counters; the hook
    moves them, so autograd still refuses a backward through weights changed since its
    forward (silently wrong gradients otherwise)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    loss = layer(torch.randn(2, 4, requires_grad=True)).square().sum()
    loss.backward(retain_graph=True)
    opt = adamw(layer.parameters(), OptimConfig(lr=1e-2))
    versions = [p._version for p in layer.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(layer.parameters(), versions, strict=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_rescaled_schedule_runs_the_old_one_at_the_new_pace():
    """``rescaled`` (a budget's re-fits) maps each step back to where it falls in the
    schedule before them; with none, the schedule is the plain one."""
    plain = OptimConfig(lr=1.0, warmup_steps=10, lr_min_ratio=0.1)
    cut = OptimConfig(lr=1.0, warmup_steps=10, lr_min_ratio=0.1, rescaled=[[400, 0.25]])
    assert cut.rescaled == ((400, 0.25),)  # as a TOML or JSON list reads back
    assert [cut.schedule_step(n) for n in (0, 400, 401, 550)] == [0.0, 400.0, 404.0, 1000.0]
    for step in (0, 5, 200, 400):
        assert cut.lr_at(step, 550) == plain.lr_at(step, 1000)
    assert cut.lr_at(475, 550) == pytest.approx(plain.lr_at(700, 1000))
    assert cut.lr_at(550, 550) == pytest.approx(0.1)
    twice = OptimConfig(lr=1.0, warmup_steps=10, rescaled=((400, 0.25), (500, 2.0)))
    assert twice.schedule_step(600) == pytest.approx(400 + (500 + 50 - 400) / 0.25)
    with pytest.raises(ValueError, match=r"optim\.rescaled"):
        OptimConfig(rescaled=((10, 0.0),))
