"""The training loops' optimiser and learning-rate schedule."""

from __future__ import annotations

import torch

from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.vocab import VocabConfig
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


def test_a_step_marks_the_weights_updated_for_the_lms_cached_weights():
    # The fused kernel leaves version counters alone; the LM's no-grad path caches q/k/v and
    # gate/up weights keyed on them, so without the hook an evaluation after a step would use
    # the weights from before it.
    torch.manual_seed(0)
    config = VideoLMConfig(
        dim=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=32,
        vocab=VocabConfig(text_vocab_size=40, video_vocab_size=16, n_special=10),
    )
    model = VideoLM(config)
    ids = torch.randint(0, 56, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = adamw(model.parameters(), OptimConfig(lr=1e-2))
    versions = [p._version for p in model.parameters()]
    with torch.no_grad():
        model(ids)  # builds the cache
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    assert all(p._version > v for p, v in zip(model.parameters(), versions, strict=True))
    with torch.no_grad():
        after = model(ids)
        fresh = VideoLM(config)
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(after, fresh(ids), rtol=0, atol=0)
