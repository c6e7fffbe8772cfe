"""Weight-only int8 for sampling: the rounding, the kernel against its reference, the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loong.lm.hf import to_hf_llama
from loong.lm.int8 import Int8Linear, int8_weights
from loong.lm.kv_cache import KVCache
from loong.lm.sampling import generate_video_tokens
from loong.lm.vocab import Vocabulary


def test_int8_rows_are_within_half_a_step_of_the_weights():
    torch.manual_seed(0)
    linear = nn.Linear(48, 20, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0.0  # an all-zero row must not divide by zero
        linear.weight[5] *= 40.0  # rows of very different sizes get their own scales
    q = Int8Linear.from_linear(linear)
    w = linear.weight.detach()
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    assert torch.equal(
        q.weight.abs().amax(dim=1)[[0, 5]], torch.tensor([127, 127], dtype=torch.int8)
    )
    error = (q.dequantized() - w).abs()  # (N, K)
    assert bool((error <= q.scales[:, None] / 2 + 1e-7).all())
    assert torch.equal(q.dequantized()[3], torch.zeros(48))
    with pytest.raises(ValueError, match="no bias"):
        Int8Linear.from_linear(nn.Linear(4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_kernel_equals_the_dequantized_reference(dtype, monkeypatch):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 24, bias=False), dtype)
    x = torch.randn(2, 5, 64).to(dtype)  # (B, L, K)
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        fast = layer(x)  # (B, L, N)
    assert calls, "the CPU kernel did not run"
    reference = F.linear(x.float(), layer.dequantized().float())
    assert fast.shape == (2, 5, 24) and fast.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), reference, atol=tol * reference.abs().max(), rtol=0)


def test_int8_layers_pass_gradients_to_their_inputs_through_the_reference_path():
    layer = Int8Linear.from_linear(nn.Linear(8, 4, bias=False))
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized().sum(0).expand(3, 8))


def test_an_int8_model_decodes_with_its_cache_as_its_full_forward(make_lm):
    """Prefill + one-token steps (q/k/v and w1/w3 stacked as one int8 layer each) against the
    same int8 model's full forward, with float32 activations so that only order of summation
    differs."""
    model = int8_weights(make_lm(), torch.float32)
    assert isinstance(model.layers[1].feed_forward.w2, Int8Linear)
    ids = torch.randint(0, 104, (2, 20), generator=torch.Generator().manual_seed(1))
    cfg = model.config
    cache = KVCache(
        n_layers=cfg.n_layers,
        batch_size=2,
        n_kv_heads=cfg.kv_heads,
        max_len=20,
        head_dim=cfg.head_dim,
    )
    with torch.no_grad():
        full = model(ids)  # (B, L, V)
        steps = [model(ids[:, :12], cache=cache, input_pos=torch.arange(12))]
        for i in range(12, 20):
            steps.append(model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i])))
    assert any(isinstance(s, Int8Linear) for s in cache.stacks.values())
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_an_untied_head_is_rounded_and_sliced_by_id_range_a_tied_one_stays_float(make_lm):
    ids = torch.randint(0, 104, (2, 10), generator=torch.Generator().manual_seed(3))
    model = int8_weights(make_lm(), torch.float32)
    assert isinstance(model.output, Int8Linear)
    with torch.no_grad():
        full, part = model(ids), model(ids, last_only=True, id_range=(40, 104))
    torch.testing.assert_close(part, full[:, -1:, 40:104], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="id_range"):
        model(ids, id_range=(40, 200))
    tied = int8_weights(make_lm(tie_embeddings=True), torch.float32)
    assert tied.output is None and isinstance(tied.layers[0].attention.wo, Int8Linear)
    with torch.no_grad():
        assert tied(ids).shape == (2, 10, tied.config.vocab_size)


def test_int8_logits_stay_near_the_float_models(make_lm):
    """At the training init's weight sizes (the fixture's std 0.3 makes a chaotic network, in
    which rounding the blocks to bfloat16 alone moves the logits by 3%)."""
    model = make_lm()
    model.init_weights()
    ids = torch.randint(0, 104, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids)
        rounded = int8_weights(model, torch.float32)(ids)
    # Rows rounded to 1/254 of their largest weight move these logits by about 0.6% of their
    # largest; a wrong scale or a misplaced row would move them by their own size.
    error = (rounded - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.02, error
    assert (rounded.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_a_model_with_int8_weights_is_not_saved_converted_or_trained(make_lm, tmp_path):
    model = int8_weights(make_lm())
    assert next(model.tok_embeddings.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="save the float model"):
        model.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="convert the float model"):
        to_hf_llama(model)
    assert not any(p.dtype == torch.int8 for p in model.parameters())  # buffers, never trained


def test_int8_generation_is_seeded_and_samples_video_ids(make_lm):
    model = int8_weights(make_lm())
    vocab = Vocabulary(model.config.vocab)
    prompt = vocab.layout([3, 7, 11], None).token_ids[None]  # (1, L)
    runs = [
        generate_video_tokens(model, prompt, 24, vocab=vocab, seed=s, speculate=4, draft_lag=4)
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert bool(vocab.is_video(runs[0]).all())
