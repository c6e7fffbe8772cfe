"""Quantizers of the video tokenizer: lookup-free (LFQ), clustered VQ (CVQ) and finite scalar (FSQ).

- LFQ (MAGVIT-v2, Yu et al. 2023, sec. 3.1): a latent ``z ∈ R^K`` becomes the code ``sign(z)``;
  its index is ``Σ_i 2^i·[z_i > 0]``, so the vocabulary is ``2^K`` with no codebook to look up.
  The entropy penalty (eq. 5) is ``E[H(q(c|z))] − γ·H(E[q(c|z)])`` with
  ``q(c|z) ∝ exp(−‖z − c‖² / τ)``. Because ``‖z − c‖² = ‖z‖² + K − 2 z·c``, ``q`` factorises over
  bits, so the per-sample term is an exact sum of K binary entropies. The batch mean of ``q`` does
  not factorise, but each sample's ``q`` is the outer product of its distributions over two
  halves of the bits, so the batch mean over ``2^g`` codes is one matrix product of two
  ``(N, 2^(g/2))`` tables, ``q_hi^T q_lo / N``: exact, without the ``(N, 2^g)`` softmax (memory
  ``N·2^(g/2) + 2^g`` instead of ``N·2^g``). Bits beyond ``entropy_group_bits`` are split into
  groups whose entropies add up: the factorised bound Open-MAGVIT2 uses, exact when one group
  holds all bits.
- CVQ (Zheng & Vedaldi 2023, "Online Clustered Codebook"; Loong's tokenizer): nearest code by
  cosine or L2 distance with a straight-through gradient; every code keeps a running usage
  ``N_k ← γ N_k + (1 − γ) n_k / B`` and moves toward its closest feature in the batch
  ``a_k`` with ``α_k = exp(−N_k·K·10 / (1 − γ) − 1e-3)``, so dead codes revive and used ones stay.
- FSQ (Mentzer et al. 2023, "Finite Scalar Quantization"): component i of ``z ∈ R^D`` is bounded
  by ``tanh`` to ``L_i`` levels and rounded (straight-through); the code is the rounded vector
  scaled into [−1, 1] and its index the mixed-radix number of its digits, so the vocabulary is
  ``Π L_i``. No auxiliary loss and no codebook: every code is reachable by a small move of ``z``,
  and nearby latents get nearby codes, where LFQ's sign keeps one bit a component.

Axes: N flattened tokens, D latent width, K code bits (LFQ) or codebook size (CVQ), G bit groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loong.train.dist import all_reduce_mean


@dataclass(kw_only=True)
class QuantizerConfig:
    kind: str = "lfq"
    """"lfq" (lookup-free, vocabulary 2^latent_dim), "cvq" (clustered VQ codebook) or "fsq"
    (finite scalar, vocabulary Π fsq_levels)."""
    latent_dim: int = 18
    """Width of the quantized latent: the code bits K for LFQ, the code vector width for CVQ."""
    codebook_size: int = 8192
    """CVQ only: number of codes."""
    commitment_weight: float = 0.25
    """Weight β of the commitment loss ‖z − sg(q)‖²."""
    entropy_weight: float = 0.1
    """LFQ only: weight of the entropy penalty."""
    diversity_gamma: float = 1.0
    """LFQ only: γ, weight of the batch entropy inside the penalty."""
    entropy_temperature: float = 0.01
    """LFQ only: τ in q(c|z) ∝ exp(−‖z − c‖²/τ)."""
    entropy_group_bits: int = 18
    """LFQ only: most bits per group of the batch entropy, exact within a group (its batch mean
    of q costs N·2^g multiply-adds and 2^g floats); groups of a larger K add up to a bound."""
    cvq_distance: str = "cosine"
    """CVQ only: "cosine" (codes and latents on the unit sphere) or "l2"."""
    cvq_decay: float = 0.99
    """CVQ only: γ of the running code usage."""
    cvq_anchor_update: bool = True
    """CVQ only: move codes toward batch anchors (off gives plain VQ, for comparison)."""
    fsq_levels: tuple[int, ...] = (7, 5, 5, 5, 5)
    """FSQ only: levels per latent component (latent_dim must equal their number). The FSQ
    paper's choice for ~2^12 codes: 7·5·5·5·5 = 4,375."""

    def __post_init__(self) -> None:
        if self.kind not in ("lfq", "cvq", "fsq"):
            raise ValueError(f'quantizer.kind must be "lfq", "cvq" or "fsq", got {self.kind!r}')
        self.fsq_levels = tuple(int(v) for v in self.fsq_levels)
        if self.kind == "fsq":
            if len(self.fsq_levels) != self.latent_dim:
                raise ValueError(
                    f"FSQ needs one level count per latent component: latent_dim is "
                    f"{self.latent_dim} but fsq_levels {self.fsq_levels} has "
                    f"{len(self.fsq_levels)}: set latent_dim={len(self.fsq_levels)}"
                )
            if min(self.fsq_levels) < 3:
                raise ValueError(f"quantizer.fsq_levels must all be >= 3, got {self.fsq_levels}")
        if self.latent_dim < 1:
            raise ValueError(f"quantizer.latent_dim must be >= 1, got {self.latent_dim}")
        if self.kind == "lfq" and self.latent_dim > 31:
            raise ValueError(
                f"LFQ with {self.latent_dim} bits overflows int32 indices: use at most 31 bits"
            )
        if self.cvq_distance not in ("cosine", "l2"):
            raise ValueError(
                f'quantizer.cvq_distance must be "cosine" or "l2", got {self.cvq_distance!r}'
            )
        if not 0.0 <= self.cvq_decay < 1.0:
            raise ValueError(f"quantizer.cvq_decay must be in [0, 1), got {self.cvq_decay}")
        if self.entropy_group_bits < 1:
            raise ValueError(
                f"quantizer.entropy_group_bits must be >= 1, got {self.entropy_group_bits}"
            )

    @property
    def vocab_size(self) -> int:
        if self.kind == "fsq":
            return math.prod(self.fsq_levels)
        return 2**self.latent_dim if self.kind == "lfq" else self.codebook_size


@dataclass
class QuantizerOutput:
    """What a quantizer returns for latents ``(N, D)``."""

    quantized: torch.Tensor
    """(N, D) codes, with a straight-through gradient to the input."""
    indices: torch.Tensor
    """(N,) int64 code indices."""
    loss: torch.Tensor
    """Scalar: the weighted quantizer loss (commitment + entropy or codebook terms)."""
    stats: dict[str, torch.Tensor]
    """Detached scalars to log: perplexity, batch usage and the loss terms."""


def code_stats(indices: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """Perplexity of the batch's code histogram and the share of the vocabulary it uses."""
    # Counting only the codes present keeps this cheap for a 2^18 vocabulary.
    counts = torch.unique(indices.flatten(), return_counts=True)[1].float()
    p = counts / counts.sum()
    entropy = -(p * torch.log(p)).sum()
    return {"perplexity": entropy.exp(), "usage": counts.new_tensor(len(counts) / vocab_size)}


def _entropy(p: torch.Tensor, dim: int = -1, floor: float = 1e-5) -> torch.Tensor:
    """Entropy of distributions ``p`` along ``dim``, nats; probabilities under ``floor`` enter
    the log as ``floor`` (the per-sample terms' 1e-5 is vector-quantize-pytorch's)."""
    return -(p * torch.log(p.clamp(min=floor))).sum(dim)


class LookupFreeQuantizer(nn.Module):
    """LFQ: ``z (N, K)`` → codes in ``{−1, +1}^K`` and indices in ``[0, 2^K)``."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        k = config.latent_dim
        self.register_buffer("bit_values", 2 ** torch.arange(k), persistent=False)  # (K,)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` → codes ``(..., K)`` in {−1, +1}."""
        bits = (indices.unsqueeze(-1) & self.bit_values) != 0
        return bits.float() * 2 - 1

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (or latents) ``(..., K)`` → indices ``(...)``: bit i set where component i > 0."""
        return ((codes > 0).long() * self.bit_values).sum(-1)

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-sample entropy and batch entropy of ``q(c|z)`` for ``z (N, K)``, in nats."""
        cfg = self.config
        z = z.float()
        # Per sample, exact: bit i is +1 with probability sigmoid(4 z_i / τ).
        p_bit = torch.sigmoid(4 * z / cfg.entropy_temperature)  # (N, K)
        per_sample = _entropy(torch.stack([p_bit, 1 - p_bit], -1)).sum(-1).mean()
        # Batch: the mean of q over the batch, one 2^g-wide distribution per group of bits.
        batch = z.new_zeros(())
        for zg in z.split(cfg.entropy_group_bits, dim=-1):  # (N, g)
            mean_q = all_reduce_mean(self.mean_code_distribution(zg))  # (2^g,)
            # No 1e-5 floor here: 2^18 codes average 4e-6 each, and a floor would count them as
            # more common than they are (0.1 nats too little for an even spread).
            batch = batch + _entropy(mean_q, floor=torch.finfo(mean_q.dtype).tiny)
        return per_sample, batch

    def code_distribution(self, z: torch.Tensor) -> torch.Tensor:
        """``q(c|z)`` over the ``2^g`` codes of ``z (N, g)``'s bits: ``(N, 2^g)``, index order."""
        codes = self.indices_to_codes(torch.arange(2 ** z.shape[-1], device=z.device))
        codes = codes[:, : z.shape[-1]].to(z.dtype)  # (2^g, g)
        return (2 * z @ codes.T / self.config.entropy_temperature).softmax(-1)

    def mean_code_distribution(self, z: torch.Tensor) -> torch.Tensor:
        """The batch mean of ``q(c|z)`` over the ``2^g`` codes of ``z (N, g)``: ``(2^g,)``.

        A code's logit is a sum over its bits, so a sample's ``q`` over all g bits is the outer
        product of its ``q`` over the low half (``2^a`` codes) and over the high half (``2^b``);
        the batch mean is then ``q_hi^T q_lo / N``, whose entry ``[hi, lo]`` is code
        ``lo + 2^a·hi``. Equal to ``code_distribution(z).mean(0)``.
        """
        a = (z.shape[-1] + 1) // 2
        q_lo = self.code_distribution(z[:, :a])  # (N, 2^a)
        if a == z.shape[-1]:
            return q_lo.mean(0)
        q_hi = self.code_distribution(z[:, a:])  # (N, 2^b)
        return (q_hi.T @ q_lo).flatten() / z.shape[0]  # (2^b · 2^a,)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        # z: (N, K)
        cfg = self.config
        codes = torch.where(z > 0, 1.0, -1.0).to(z.dtype)  # (N, K)
        indices = self.codes_to_indices(z)  # (N,)
        quantized = z + (codes - z).detach()  # straight-through
        commitment = F.mse_loss(z.float(), codes.float())
        stats = code_stats(indices, cfg.vocab_size)
        loss = cfg.commitment_weight * commitment
        stats["commitment"] = commitment.detach()
        if self.training and cfg.entropy_weight > 0:
            per_sample, batch = self.entropy_terms(z)
            loss = loss + cfg.entropy_weight * (per_sample - cfg.diversity_gamma * batch)
            stats["sample_entropy"] = per_sample.detach()
            stats["batch_entropy"] = batch.detach()
        return QuantizerOutput(quantized, indices, loss, stats)


class ClusteredVectorQuantizer(nn.Module):
    """CVQ: ``z (N, D)`` → nearest of ``K`` codes ``(N, D)`` and indices in ``[0, K)``."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        k, d = config.codebook_size, config.latent_dim
        self.codebook = nn.Parameter(torch.randn(k, d) / d**0.5)  # (K, D)
        self.register_buffer("usage", torch.zeros(k))  # (K,) running N_k

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.cvq_distance == "cosine" else x

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` → codes ``(..., D)``."""
        return self._normalise(self.codebook)[indices]

    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(N,)`` of the nearest codes and the distance matrix ``(N, K)``."""
        z, e = self._normalise(z.float()), self._normalise(self.codebook.float())
        # |z|² + |e|² − 2 z·e as one broadcast add and one addmm: (N, K) is the largest tensor
        # of a quantizer step, and each pass over it counts
        dist = torch.addmm((z * z).sum(-1, keepdim=True) + (e * e).sum(-1), z, e.T, alpha=-2)
        # min's indices are argmin's (the first of equal values), at a third of its time
        return dist.min(-1).indices, dist

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        # z: (N, D)
        cfg = self.config
        # A clone, so that the anchor update below may change the parameter in place while
        # autograd still holds the values this forward used.
        codebook = self.codebook.clone()  # (K, D)
        indices, dist = self.nearest(z)
        z_n = self._normalise(z)
        codes = self._normalise(codebook)[indices]  # (N, D)
        codebook_loss = F.mse_loss(codes.float(), z_n.detach().float())
        commitment = F.mse_loss(z_n.float(), codes.detach().float())
        quantized = z_n + (codes - z_n).detach()
        # Only training steps move codes: encoding under no_grad leaves the model as it was.
        if self.training and torch.is_grad_enabled() and cfg.cvq_anchor_update:
            self._anchor_update(z.detach(), indices, dist.detach())
        stats = code_stats(indices, cfg.codebook_size)
        stats["commitment"] = commitment.detach()
        stats["codebook_loss"] = codebook_loss.detach()
        loss = codebook_loss + cfg.commitment_weight * commitment
        return QuantizerOutput(quantized, indices, loss, stats)

    @torch.no_grad()
    def _anchor_update(self, z: torch.Tensor, indices: torch.Tensor, dist: torch.Tensor) -> None:
        cfg = self.config
        k = cfg.codebook_size
        counts = torch.bincount(indices, minlength=k).float()  # (K,)
        share = all_reduce_mean(counts / indices.numel())
        self.usage.mul_(cfg.cvq_decay).add_((1 - cfg.cvq_decay) * share)
        # Each code's anchor is its closest feature in the batch (Zheng & Vedaldi, eq. 7).
        # With data parallelism every rank sees different anchors; averaging the updated
        # codebooks keeps replicas identical.
        anchors = z[first_argmin_over_rows(dist)]  # (K, D)
        alpha = torch.exp(-self.usage * k * 10 / (1 - cfg.cvq_decay) - 1e-3).unsqueeze(-1)
        new = (1 - alpha) * self.codebook.float() + alpha * anchors.float()
        self.codebook.copy_(all_reduce_mean(new).to(self.codebook.dtype))


def first_argmin_over_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmin(0)`` for a 2-D ``x (N, K)``: the first row holding each column's minimum.

    torch's argmin over the outer dimension walks each column with a stride of K; the column
    minima (``amin``) vectorise along the rows, and the first row equal to its column's minimum
    is then another vectorised ``amin``: 2.5× faster for a CVQ step's ``(768, 4096)``. (A column
    holding NaN, which equals nothing, gets the last row: an index in range, as argmin's is.)
    """
    n = x.shape[0]
    rows = torch.arange(n, device=x.device, dtype=torch.int32 if n < 2**31 else torch.int64)
    first = torch.where(x == x.amin(0), rows[:, None], n).amin(0)  # (K,)
    return first.clamp_max(n - 1).long()


class FiniteScalarQuantizer(nn.Module):
    """FSQ: ``z (N, D)`` → codes with component i on ``L_i`` levels in [−1, 1], and indices in
    ``[0, Π L_i)``."""

    EPS = 1e-3
    """Widens the tanh bound a little so the outermost levels are reached (as the paper does)."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        levels = torch.tensor(config.fsq_levels)  # (D,)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)  # (D,)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """``z (N, D)`` → values whose rounding lands on L_i integers: −L/2 .. L/2 − 1 for even
        L (shifted so that z = 0 is not a rounding boundary), −(L−1)/2 .. (L−1)/2 for odd."""
        half = (self.levels - 1) * (1 + self.EPS) / 2
        offset = (self.levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` → codes ``(..., D)`` in [−1, 1]."""
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels  # (..., D) in 0 .. L−1
        half_width = self.levels // 2
        return (digits - half_width).float() / half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(..., D)`` → indices ``(...)``."""
        half_width = self.levels // 2
        digits = (codes * half_width).round().long() + half_width  # (..., D) in 0 .. L−1
        return (digits * self.basis).sum(-1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        # z: (N, D)
        bounded = self.bound(z.float())
        level = bounded.round()  # (N, D) integers −L/2 .. L/2 − 1 (even L), ±(L−1)/2 (odd)
        rounded = bounded + (level - bounded).detach()  # straight-through
        half_width = self.levels // 2
        codes = (rounded / half_width).to(z.dtype)  # (N, D) in [−1, 1]
        indices = ((level.long() + half_width) * self.basis).sum(-1)  # (N,) mixed radix
        stats = code_stats(indices, self.config.vocab_size)
        return QuantizerOutput(codes, indices, z.new_zeros((), dtype=torch.float32), stats)


def build_quantizer(
    config: QuantizerConfig,
) -> LookupFreeQuantizer | ClusteredVectorQuantizer | FiniteScalarQuantizer:
    if config.kind == "lfq":
        return LookupFreeQuantizer(config)
    if config.kind == "fsq":
        return FiniteScalarQuantizer(config)
    return ClusteredVectorQuantizer(config)
