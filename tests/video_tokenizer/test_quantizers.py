"""Lookup-free quantization (MAGVIT-v2 sec. 3.1) and clustered VQ (Zheng & Vedaldi 2023).

LFQ is checked against vector-quantize-pytorch's ``LFQ`` on the same inputs and against a float64
brute force over all 2^K codes; CVQ against plain VQ on a toy problem with a bad initialisation.
"""

from __future__ import annotations

import math

import pytest
import torch
from vector_quantize_pytorch import FSQ, LFQ

from loong.video_tokenizer.quantize import (
    ClusteredVectorQuantizer,
    FiniteScalarQuantizer,
    LookupFreeQuantizer,
    QuantizerConfig,
    code_stats,
    first_argmin_over_rows,
)

TAU = (
    0.01  # the default entropy temperature; vector-quantize-pytorch's inv_temperature is 1/τ = 100
)


def lfq(bits: int, **kw) -> LookupFreeQuantizer:
    return LookupFreeQuantizer(QuantizerConfig(kind="lfq", latent_dim=bits, **kw))


def cvq(dim: int, size: int, **kw) -> ClusteredVectorQuantizer:
    return ClusteredVectorQuantizer(
        QuantizerConfig(kind="cvq", latent_dim=dim, codebook_size=size, **kw)
    )


def brute_force_entropies(z: torch.Tensor, tau: float) -> tuple[float, float]:
    """Float64 per-sample and batch entropy of q(c|z) ∝ exp(−‖z − c‖²/τ) over all 2^K codes."""
    k = z.shape[-1]
    bits = (torch.arange(2**k)[:, None] >> torch.arange(k)) & 1
    codes = bits.double() * 2 - 1  # (2^K, K), code of index i has bit j = component j
    logq = (-torch.cdist(z.double(), codes).square() / tau).log_softmax(-1)  # (N, 2^K)
    q = logq.exp()
    per_sample = -(q * logq).sum(-1).mean()
    mean_q = q.mean(0)
    batch = -(mean_q * mean_q.clamp_min(1e-300).log()).sum()
    return per_sample.item(), batch.item()


# --- LFQ: codes and indices ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 6, 18, 31])
def test_lfq_indices_codes_round_trip(bits):
    q = lfq(bits)
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 2**bits, (1000,), generator=g)
    indices[:2] = torch.tensor([0, 2**bits - 1])
    codes = q.indices_to_codes(indices)
    assert codes.shape == (1000, bits)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(q.codes_to_indices(codes), indices)


@pytest.mark.parametrize("bits", [6, 18])
def test_lfq_forward_codes_and_indices(bits):
    q = lfq(bits).eval()
    z = torch.randn(4096, bits, generator=torch.Generator().manual_seed(1))
    out = q(z)
    assert out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 2**bits
    assert set(out.quantized.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(out.quantized, torch.sign(z))
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)


def test_lfq_index_bit_i_is_component_i():
    # DESIGN.md: index = Σ_i 2^i·[z_i > 0]; z_i = 0 counts as negative, like its code −1.
    q = lfq(5).eval()
    z = -torch.ones(6, 5)
    for i in range(5):
        z[i, i] = 0.3
    z[5] = 0.0
    out = q(z)
    assert out.indices.tolist() == [1, 2, 4, 8, 16, 0]
    assert torch.equal(out.quantized[5], -torch.ones(5))


@pytest.mark.parametrize("training", [False, True])
def test_lfq_gradient_is_straight_through(training):
    q = lfq(8).train(training)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 8, generator=g).requires_grad_()
    w = torch.randn(64, 8, generator=g)
    (q(z).quantized * w).sum().backward()
    torch.testing.assert_close(z.grad, w, rtol=0, atol=0)


def test_code_stats_counts_the_codes_used():
    stats = code_stats(torch.tensor([3, 3, 5, 7]), vocab_size=16)
    assert stats["usage"].item() == pytest.approx(3 / 16)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert stats["perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    uniform = code_stats(torch.arange(16).repeat(3), vocab_size=16)
    assert uniform["perplexity"].item() == pytest.approx(16.0, rel=1e-5)
    assert uniform["usage"].item() == 1.0


# --- LFQ: the entropy penalty ----------------------------------------------------------------


def reference_lfq(bits: int, entropy_weight: float, commitment_weight: float) -> LFQ:
    ref = LFQ(
        dim=bits,
        codebook_size=2**bits,
        entropy_loss_weight=entropy_weight,
        commitment_loss_weight=commitment_weight,
        diversity_gamma=1.0,
        spherical=False,
        codebook_scale=1.0,
        num_codebooks=1,
    )
    assert isinstance(ref.project_in, torch.nn.Identity)  # dim == codebook dim: no projection
    return ref.train()


@pytest.mark.parametrize("bits", [8, 10])
@pytest.mark.parametrize("scale", [0.002, 0.05, 1.0])
def test_lfq_matches_vector_quantize_pytorch(bits, scale):
    z = scale * torch.randn(512, bits, generator=torch.Generator().manual_seed(bits))
    ours = lfq(bits, entropy_group_bits=bits, entropy_weight=0.1, commitment_weight=0.25).train()
    ref = reference_lfq(bits, 0.1, 0.25)

    out = ours(z)
    # The reference's index is MSB-first (bit K−1−i is component i): feed it z reversed.
    (ref_q, ref_idx, ref_aux), parts = ref(
        z.flip(-1)[None], inv_temperature=1 / TAU, return_loss_breakdown=True
    )
    assert torch.equal(ref_idx[0], out.indices)
    assert torch.equal(ref_q[0].flip(-1), out.quantized)

    per_sample, batch = ours.entropy_terms(z)
    assert per_sample.item() == pytest.approx(parts.per_sample_entropy.item(), rel=1e-4, abs=1e-6)
    assert batch.item() == pytest.approx(parts.batch_entropy.item(), rel=1e-4)
    # The reference floors every probability at 1e-5 inside the log; ours floors only the
    # per-sample terms (the batch term is exact: see the brute-force tests). The losses differ by
    # that difference of batch entropies alone.
    floor_gap = 0.1 * (batch - parts.batch_entropy).item()
    assert out.loss.item() == pytest.approx(ref_aux.item() - floor_gap, rel=1e-4, abs=1e-5)
    assert out.stats["commitment"].item() == pytest.approx(parts.commitment.item(), rel=1e-5)


@pytest.mark.parametrize("scale", [0.002, 0.005, 0.05])
def test_lfq_entropies_equal_brute_force(scale):
    # Exact where the reference's clamp(min=1e-5) inside a 2^K softmax drifts (scale 0.005, K=10).
    bits = 10
    z = scale * torch.randn(256, bits, generator=torch.Generator().manual_seed(7))
    per_sample, batch = lfq(bits, entropy_group_bits=bits).entropy_terms(z)
    exact_sample, exact_batch = brute_force_entropies(z, TAU)
    assert per_sample.item() == pytest.approx(exact_sample, rel=1e-4)
    assert batch.item() == pytest.approx(exact_batch, rel=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 7, 12])
def test_split_batch_distribution_equals_the_full_softmax(bits):
    # The batch mean of q as q_hi^T q_lo / N: the same values and gradients as the mean of the
    # (N, 2^K) softmax it replaces, and a distribution in index order.
    q = lfq(bits)
    z = (0.02 * torch.randn(300, bits, generator=torch.Generator().manual_seed(bits))).double()
    z.requires_grad_()
    split, full = q.mean_code_distribution(z), q.code_distribution(z).mean(0)
    assert split.shape == (2**bits,)
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-15)
    assert split.sum().item() == pytest.approx(1.0, rel=1e-12)
    w = torch.randn(2**bits, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad_split = torch.autograd.grad((split * w).sum(), z)[0]
    grad_full = torch.autograd.grad((full * w).sum(), z)[0]
    torch.testing.assert_close(grad_split, grad_full, rtol=1e-10, atol=1e-12)
    # The most likely code of a confident latent is its own index.
    sharp = q.indices_to_codes(torch.tensor([2**bits - 2 if bits > 1 else 1]))
    assert q.mean_code_distribution(sharp).argmax().item() == q.codes_to_indices(sharp).item()


def test_default_batch_entropy_is_exact_at_18_bits():
    # MAGVIT-v2's 2^18 codes: one group by default, no (N, 2^18) softmax, float64 brute force.
    z = 0.01 * torch.randn(16, 18, generator=torch.Generator().manual_seed(18))
    per_sample, batch = lfq(18).entropy_terms(z)
    exact_sample, exact_batch = brute_force_entropies(z, TAU)
    assert per_sample.item() == pytest.approx(exact_sample, rel=1e-4)
    assert batch.item() == pytest.approx(exact_batch, rel=1e-4)


@pytest.mark.parametrize("group_bits", [1, 3, 4, 7])
@pytest.mark.parametrize("scale", [0.003, 0.01, 0.1])
def test_grouped_batch_entropy_is_an_upper_bound(group_bits, scale):
    bits = 8
    z = scale * torch.randn(256, bits, generator=torch.Generator().manual_seed(group_bits))
    # Correlated groups: the second half of the bits copies the first.
    z[:128, 4:] = z[:128, :4]
    exact = lfq(bits, entropy_group_bits=bits).entropy_terms(z)[1].item()
    grouped = lfq(bits, entropy_group_bits=group_bits).entropy_terms(z)[1].item()
    assert grouped >= exact - 1e-5
    # Larger groups than K bits change nothing.
    assert lfq(bits, entropy_group_bits=12).entropy_terms(z)[1].item() == pytest.approx(exact)


def test_grouped_batch_entropy_is_exact_for_independent_groups():
    # A batch of every pair (a, b) makes the batch-mean q a product over the two bit groups.
    g = torch.Generator().manual_seed(8)
    a, b = 0.01 * torch.randn(8, 2, generator=g), 0.01 * torch.randn(8, 2, generator=g)
    z = torch.cat([a.repeat_interleave(8, 0), b.repeat(8, 1)], dim=1)  # (64, 4)
    exact = lfq(4, entropy_group_bits=4).entropy_terms(z)[1].item()
    grouped = lfq(4, entropy_group_bits=2).entropy_terms(z)[1].item()
    assert grouped == pytest.approx(exact, rel=1e-5)
    assert exact == pytest.approx(brute_force_entropies(z, TAU)[1], rel=1e-5)

    # Fully dependent groups (b = a): the bound is strict, about twice the exact entropy.
    z_dep = torch.cat([a, a], dim=1) * 10
    exact_dep = lfq(4, entropy_group_bits=4).entropy_terms(z_dep)[1].item()
    grouped_dep = lfq(4, entropy_group_bits=2).entropy_terms(z_dep)[1].item()
    assert grouped_dep > exact_dep + 0.5


def test_entropy_penalty_favours_confident_and_diverse_codes():
    bits = 6
    q = lfq(bits, entropy_weight=0.1, commitment_weight=0.0, entropy_group_bits=bits).train()
    all_codes = q.indices_to_codes(torch.arange(2**bits))  # every code once, confidently
    spread = all_codes.repeat(4, 1)
    collapsed = all_codes[:1].repeat(4 * 2**bits, 1)

    ps_spread, b_spread = q.entropy_terms(spread)
    b_collapsed = q.entropy_terms(collapsed)[1]
    assert ps_spread.item() == pytest.approx(0.0, abs=1e-4)
    assert b_spread.item() == pytest.approx(bits * math.log(2), rel=1e-4)
    assert b_collapsed.item() == pytest.approx(0.0, abs=1e-4)
    # The loss subtracts the batch entropy: diverse is cheaper than collapsed.
    assert q(spread).loss.item() < q(collapsed).loss.item() - 0.1 * bits * math.log(2) * 0.99

    # Minimising the per-sample entropy pushes every latent away from 0 (confident bits).
    z = (
        0.003 * torch.randn(128, bits, generator=torch.Generator().manual_seed(9))
    ).requires_grad_()
    q.entropy_terms(z)[0].backward()
    assert ((z.grad * z) < 0).all()


def test_entropy_penalty_only_in_training():
    q = lfq(6, entropy_weight=0.1, commitment_weight=0.25)
    z = 0.01 * torch.randn(128, 6, generator=torch.Generator().manual_seed(10))
    eval_out = q.eval()(z)
    assert "batch_entropy" not in eval_out.stats
    assert eval_out.loss.item() == pytest.approx(0.25 * (z - torch.sign(z)).square().mean().item())
    train_out = q.train()(z)
    ps, b = train_out.stats["sample_entropy"], train_out.stats["batch_entropy"]
    assert train_out.loss.item() == pytest.approx(eval_out.loss.item() + 0.1 * (ps - b).item())


# --- CVQ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_cvq_nearest_and_indices_to_codes_agree(distance):
    torch.manual_seed(11)
    q = cvq(8, 64, cvq_distance=distance).eval()
    z = torch.randn(500, 8)
    out = q(z)
    codes = q.indices_to_codes(out.indices)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 64
    torch.testing.assert_close(out.quantized, codes)
    # The chosen code is the nearest one, by brute force.
    if distance == "cosine":
        z = torch.nn.functional.normalize(z, dim=-1)
    all_codes = q.indices_to_codes(torch.arange(64))
    d = torch.cdist(z, all_codes)
    torch.testing.assert_close(d.gather(1, out.indices[:, None])[:, 0], d.min(1).values)
    # Every code is its own nearest code.
    assert torch.equal(q.nearest(all_codes)[0], torch.arange(64))
    if distance == "cosine":
        torch.testing.assert_close(all_codes.norm(dim=-1), torch.ones(64))


def test_cvq_l2_gradient_is_straight_through():
    torch.manual_seed(12)
    q = cvq(4, 16, cvq_distance="l2").eval()
    z = torch.randn(32, 4).requires_grad_()
    w = torch.randn(32, 4)
    (q(z).quantized * w).sum().backward()
    torch.testing.assert_close(z.grad, w, rtol=0, atol=0)


def test_cvq_anchor_update_revives_dead_codes_and_keeps_used_ones():
    torch.manual_seed(13)
    q = cvq(2, 4, cvq_distance="l2", cvq_decay=0.99)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0], [-9.0, 9.0]]))
    z = 0.1 * torch.randn(100, 2)  # all nearest to code 0
    z[0] = torch.tensor([0.5, 0.5])  # the closest feature to codes 1 and 2
    z[1] = torch.tensor([-0.5, 0.5])  # the closest feature to code 3
    before = q.codebook.detach().clone()
    q.train()(z)
    # Running usage N ← γN + (1 − γ)·share.
    torch.testing.assert_close(q.usage, torch.tensor([0.01, 0.0, 0.0, 0.0]))
    # Code 0 is used: α = exp(−N·K·10/(1−γ) − 1e-3) ≈ e^−40 keeps it where it was.
    alpha0 = math.exp(-0.01 * 4 * 10 / 0.01 - 1e-3)
    anchor0 = z[(z - before[0]).norm(dim=-1).argmin()]
    torch.testing.assert_close(q.codebook[0], (1 - alpha0) * before[0] + alpha0 * anchor0)
    # Dead codes jump (α = exp(−1e-3)) to their closest batch feature.
    alpha_dead = math.exp(-1e-3)
    for k, anchor in [(1, z[0]), (2, z[0]), (3, z[1])]:
        torch.testing.assert_close(
            q.codebook[k], (1 - alpha_dead) * before[k] + alpha_dead * anchor
        )


def _train_toy_quantizer(distance: str, anchor_update: bool, dim: int) -> tuple[int, float]:
    """Codes used on a fresh batch and the mean quantization error after 150 Adam steps."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(16, dim, generator=g)

    def batch(n: int) -> torch.Tensor:
        return centers[torch.randint(0, 16, (n,), generator=g)] + 0.3 * torch.randn(
            n, dim, generator=g
        )

    torch.manual_seed(0)
    q = cvq(dim, 64, cvq_distance=distance, cvq_anchor_update=anchor_update)
    with torch.no_grad():  # a bad start: every code far from the data, in one corner (or cone)
        if distance == "l2":
            q.codebook.copy_(6.0 + 0.5 * torch.randn(64, dim, generator=g))
        else:
            q.codebook.copy_(3.0 + 0.1 * torch.randn(64, dim, generator=g))
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    q.train()
    for _ in range(150):
        loss = q(batch(256)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        z = batch(2048)
        idx = q(z).indices
        z = q._normalise(z)
        err = (z - q.indices_to_codes(idx)).square().sum(-1).mean().item()
    return int(idx.unique().numel()), err


@pytest.mark.parametrize(
    ("distance", "dim"),
    [
        ("l2", 2),
        ("l2", 8),
        ("cosine", 8),
    ],
)
def test_cvq_revives_dead_codes_where_plain_vq_does_not(distance, dim):
    used_cvq, err_cvq = _train_toy_quantizer(distance, True, dim)
    used_vq, err_vq = _train_toy_quantizer(distance, False, dim)
    assert used_cvq >= 2 * used_vq
    assert used_cvq >= 24
    assert err_cvq < 0.5 * err_vq


def test_cvq_cosine_training_step_backpropagates():
    torch.manual_seed(14)
    q = cvq(8, 32, cvq_distance="cosine").train()
    z = torch.randn(64, 8, requires_grad=True)
    q(z).loss.backward()
    assert q.codebook.grad is not None and z.grad is not None


def test_cvq_l2_training_step_backpropagates():
    torch.manual_seed(15)
    q = cvq(8, 32, cvq_distance="l2").train()
    z = torch.randn(64, 8, requires_grad=True)
    q(z).loss.backward()
    assert q.codebook.grad is not None and z.grad.abs().sum() > 0


def test_quantizer_config_validation():
    with pytest.raises(ValueError, match='"lfq", "cvq" or "fsq"'):
        QuantizerConfig(kind="rvq")
    with pytest.raises(ValueError, match="set latent_dim=5"):
        QuantizerConfig(kind="fsq", latent_dim=4)
    with pytest.raises(ValueError, match=">= 3"):
        QuantizerConfig(kind="fsq", latent_dim=2, fsq_levels=(2, 4))
    assert QuantizerConfig(kind="fsq", latent_dim=5).vocab_size == 7 * 5**4
    with pytest.raises(ValueError, match="at most 31 bits"):
        QuantizerConfig(kind="lfq", latent_dim=32)
    with pytest.raises(ValueError, match='"cosine" or "l2"'):
        QuantizerConfig(kind="cvq", cvq_distance="dot")
    assert QuantizerConfig(kind="lfq", latent_dim=18).vocab_size == 2**18
    assert QuantizerConfig(kind="cvq", codebook_size=8192).vocab_size == 8192


# --- FSQ -------------------------------------------------------------------------------------


def fsq(levels: tuple[int, ...]) -> FiniteScalarQuantizer:
    return FiniteScalarQuantizer(
        QuantizerConfig(kind="fsq", latent_dim=len(levels), fsq_levels=levels)
    )


@pytest.mark.parametrize("levels", [(7, 5, 5, 5, 5), (8, 6, 5), (3, 4)])
def test_fsq_matches_vector_quantize_pytorch(levels):
    torch.manual_seed(0)
    z = torch.randn(2000, len(levels)) * 2
    ours = fsq(levels)(z)
    codes, indices = FSQ(levels=list(levels))(z[None])
    torch.testing.assert_close(ours.quantized, codes[0], atol=0, rtol=0)
    assert torch.equal(ours.indices, indices[0].long())


@pytest.mark.parametrize("levels", [(7, 5, 5, 5, 5), (8, 6, 5)])
def test_fsq_every_index_round_trips_and_is_reachable(levels):
    q = fsq(levels)
    n = q.config.vocab_size
    codes = q.indices_to_codes(torch.arange(n))  # (n, D)
    assert codes.abs().max() <= 1 and len(torch.unique(codes, dim=0)) == n
    assert torch.equal(q.codes_to_indices(codes), torch.arange(n))
    # Each code is reached from a latent: the inverse of the bound, at the level's centre.
    half = (q.levels - 1) * (1 + q.EPS) / 2
    offset = (q.levels % 2 == 0).float() * 0.5
    target = codes * (q.levels // 2) + offset  # the rounded value + offset, inside ±half
    z = torch.atanh(target / half) - torch.atanh(offset / half)
    out = q(z)
    assert torch.equal(out.indices, torch.arange(n))
    assert out.stats["usage"].item() == 1.0


def test_fsq_gradient_is_straight_through_and_adds_no_loss():
    q = fsq((7, 5, 5))
    z = torch.randn(64, 3, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward()
    assert z.grad is not None and (z.grad > 0).all()  # tanh' > 0 through the rounding
    assert out.loss.item() == 0.0


def test_first_argmin_over_rows_equals_argmin_over_dim_0_ties_included():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (300, 700), generator=gen).float()  # many ties in every column
    x[:, 3] = 7.0  # a column of equal values: row 0
    assert torch.equal(first_argmin_over_rows(x), x.argmin(0))
    x = torch.randn(768, 4096, generator=gen)
    assert torch.equal(first_argmin_over_rows(x), x.argmin(0))
    x[5, 7] = float("nan")  # a broken latent: still an index in range
    assert 0 <= first_argmin_over_rows(x)[7] < 768
