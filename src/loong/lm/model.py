"""LLaMA-style decoder over one sequence of text and video tokens (Loong, Wang et al. 2024).

LLaMA (Touvron et al. 2023): pre-norm blocks of RMSNorm → grouped-query attention with rotary
position embedding → residual, RMSNorm → SwiGLU feed-forward → residual; a final RMSNorm and a
linear head; no biases. Parameter names follow Meta's LLaMA (``wq``, ``w1``, ``attention_norm``)
and RoPE rotates the two halves of each head (``rotate_half``, as transformers' LLaMA does), so
weights convert to and from ``LlamaForCausalLM`` by renaming alone (see :mod:`loong.lm.hf`).

Two optional additions for video, off by default; a model with either does not convert to
transformers:

- ``video_grid = (h, w)``: every video token's input also gets a learned embedding of its cell
  in the latent frame (as ViT's learned position embeddings, for the video part only). With
  RoPE alone a token finds its own cell one frame back only by learning the relative offset
  h·w, which a small model trained briefly did not (see BENCHMARKS.md, "Cell embeddings").
- ``video_context_dim = C`` (with ``video_grid``): the input at each position also gets the ids
  around the cell of the video token it predicts: the 3×3 cells around that cell in each of the
  two latent frames before, and the three cells above it in its own frame
  (:data:`CONTEXT_OFFSETS`), each embedded at width C, concatenated and projected to D. In a
  world where an object moves at most one cell a latent frame, the next id of a cell is mostly a
  function of that neighbourhood; a local context of this kind is what convolutional
  autoregressive models (PixelCNN) are built from. It is causal: every neighbour comes before
  the predicted token in raster order.

And one for training only: ``video_code_bits = K`` treats video id v as the LFQ code it stands
for, the ±1 pattern of its K bits, and gives every table indexed by video ids (input embedding,
output head, local-context embedding) a second, shared term: a learned linear function of those
bits. Ids one bit apart then start alike and learn together, so a rare id borrows what its
common neighbours learned. It is a reparametrisation, not a new function class:
:meth:`VideoLM.save_pretrained` folds the bit terms into the plain tables, so an export is an
ordinary model and sampling costs nothing extra.

Axes: B batch, L sequence (new tokens), S key positions (the KV cache's slots), D model width,
N heads, M key/value heads, E head width, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loong.lm.int8 import Int8Linear, has_int8_weights, int8_linear
from loong.lm.kv_cache import KVCache
from loong.lm.vocab import BOV, VocabConfig


@dataclass(kw_only=True)
class VideoLMConfig:
    dim: int = 1536
    """Model width D."""
    n_layers: int = 24
    """Number of transformer blocks."""
    n_heads: int = 16
    """Query heads; dim must be divisible by it."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    ffn_dim: int | None = None
    """SwiGLU hidden width F; None derives LLaMA's: 8/3·dim rounded up to ``multiple_of``."""
    multiple_of: int = 256
    """Rounding of the derived SwiGLU width."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 4608
    """Longest sequence (and default KV cache length); positions must stay below it."""
    tie_embeddings: bool = False
    """Use the token embedding as the output head."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get init_std / sqrt(2·n_layers)."""
    vocab: VocabConfig = field(default_factory=VocabConfig)
    """The joint text + video + special id space; vocab_size derives from it."""
    video_grid: tuple[int, int] | None = None
    """(h, w) of a latent frame. When set, each video token's input also gets a learned
    embedding of its cell in the frame (row · w + column, counted from the sequence's first video
    token), so that "this cell one frame back" is a content match rather than a RoPE offset of
    h·w to learn. None: positions are RoPE's alone, as in LLaMA, which transformers' conversion
    needs."""
    video_context_dim: int = 0
    """Width of the local video context (needs ``video_grid``; 0: off). Each position's input also
    gets the ids around the cell of the video token it predicts: the 3×3 cells around it in each
    of the two latent frames before, and the three cells above it in its own frame, each embedded
    at this width, concatenated and projected to ``dim``. The token a cell gets is mostly a
    function of that neighbourhood (an object moves at most one cell a latent frame); with it
    in the input the model need not learn to find it by attention first."""
    video_code_bits: int = 0
    """Training-time reparametrisation for LFQ video ids (0: off; else K = log2 of
    ``video_vocab_size``): each table row of video id v also gets a learned linear function of
    v's bits as ±1, shared by all ids (see the module docstring). ``save_pretrained`` folds it
    away and writes 0 here."""

    def __post_init__(self) -> None:
        if isinstance(self.vocab, dict):
            self.vocab = VocabConfig(**self.vocab)
        if self.video_grid is not None:
            self.video_grid = tuple(int(v) for v in self.video_grid)
            if len(self.video_grid) != 2 or min(self.video_grid) <= 0:
                raise ValueError(
                    f"video_grid must be (h, w) with positive sides or None, got {self.video_grid}"
                )
        if self.video_context_dim < 0 or (self.video_context_dim and self.video_grid is None):
            raise ValueError(
                f"video_context_dim must be 0 (off) or positive with video_grid set, got "
                f"{self.video_context_dim} with video_grid={self.video_grid}"
            )
        bits = self.video_code_bits
        if bits < 0 or (bits and 2**bits != self.vocab.video_vocab_size):
            raise ValueError(
                f"video_code_bits must be 0 (off) or log2(video_vocab_size) for LFQ ids, got "
                f"{bits} with video_vocab_size={self.vocab.video_vocab_size}: set it to "
                f"{max(self.vocab.video_vocab_size.bit_length() - 1, 0)} for a 2^K-code LFQ "
                f"tokenizer, or 0 for any other"
            )
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0:
            raise ValueError(
                f"dim, n_layers and n_heads must be positive, got {self.dim}, "
                f"{self.n_layers}, {self.n_heads}"
            )
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head width dim/n_heads={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: "
                f"each key/value head serves a whole group of query heads"
            )
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be positive or None, got {self.ffn_dim}")
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """n_kv_heads with None resolved to n_heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width F: ffn_dim, or LLaMA's 8/3·dim rounded up to multiple_of."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


CONTEXT_OFFSETS: tuple[tuple[int, int, int], ...] = (
    *((1, dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)),
    *((2, dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)),
    *((0, -1, dc) for dc in (-1, 0, 1)),
)
"""(latent frames back, rows, columns) from a cell to the cells of its local video context."""

ATTEND_ALL = True
"""Attention "mask" of a one-token step on a dense KV cache: every slot below ``cache.end``."""


# --- building blocks -------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 (as LLaMA and transformers do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op for x · rsqrt(mean(x²) + eps), in float32; the weight in x's dtype
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for ``positions`` (L,) → cos, sin ``(L, 1, E)`` over the halves of a head.

    Both halves hold the same angles; ``sin``'s first half is negated, so that
    :func:`apply_rope` needs only a roll, not ``rotate_half``'s split, negation and concat.
    Computed per call in float32: an outer product of L × E/2, negligible next to attention,
    and it leaves the module with no buffers to rebuild after meta-device initialisation.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (E/2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, E/2)
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat([cos, cos], dim=-1)  # (L, E)
    sin = torch.cat([-sin, sin], dim=-1)
    return cos[:, None].to(dtype), sin[:, None].to(dtype)  # (L, 1, E)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + E/2) of ``x`` (B, L, heads, E) by the tables (L, 1, E).

    ``x.roll(E/2)`` is ``[x2, x1]``; times the signed sin ``[−s, s]`` it is transformers'
    ``rotate_half(x) · sin``, so the result is theirs to the last bit of float arithmetic.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def stacked_projection(
    owner: nn.Module, layers: tuple[nn.Module, ...], cache: KVCache
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projections ``layers`` (``nn.Linear`` or :class:`~loong.lm.int8.Int8Linear`, no
    bias) as one, their outputs concatenated in order: one matmul instead of several in a
    generation step. Built at ``owner``'s first forward with ``cache`` and kept there.

    A KV cache serves one generation, during which the weights do not change, so the stack is
    never stale. Forwards without a cache (training, evaluations during training) run the
    separate projections instead: a stack kept from one such forward to the next would have to
    see every write to the weights, and FSDP2 gathers a block's weights before each forward
    into storage that can come back at the same address with its version counter unmoved.
    """
    stack = cache.stacks.get(owner)
    if stack is None:
        if all(isinstance(m, Int8Linear) for m in layers):
            stack = Int8Linear.cat(layers)
        else:
            stack = functools.partial(F.linear, weight=torch.cat([m.weight for m in layers]))
        cache.stacks[owner] = stack
    return stack


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per row against every key: ``q`` (B, N, 1, E), ``k, v`` (B, M, S, E) →
    (B, N, 1, E), softmax in float32.

    The decode step's attention as three small ops. For a single query the fused CPU kernel
    of SDPA costs ~0.1 ms a call, several times the work; the result is the same (tested).
    Query heads are grouped onto their key/value head (GQA) by a reshape, not a copy.
    """
    b, n, _, e = q.shape
    m = k.shape[1]
    q = q.reshape(b, m, n // m, e)  # (B, M, N/M, E): heads 0..N/M−1 share kv head 0, …
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (e**-0.5)  # (B, M, N/M, S)
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(b, n, 1, e)  # (B, N, 1, E)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; writes to and reads from a KV cache if given."""

    def __init__(self, cfg: VideoLMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        input_pos: torch.Tensor,
    ) -> torch.Tensor:
        # x: (B, L, D); mask: (B, 1, L, S) bool (True = attend), None for plain causal over the
        # new tokens, or ATTEND_ALL: one new token that sees every cached slot below cache.end
        b, length, _ = x.shape
        n, m, e = self.n_heads, self.n_kv_heads, self.head_dim
        if cache is None or torch.is_grad_enabled():
            q = apply_rope(self.wq(x).view(b, length, n, e), cos, sin)  # (B, L, N, E)
            k = apply_rope(self.wk(x).view(b, length, m, e), cos, sin)  # (B, L, M, E)
            v = self.wv(x).view(b, length, m, e)
        else:  # generation: one matmul for q, k, v and one rotation for q and k
            qkv = stacked_projection(self, (self.wq, self.wk, self.wv), cache)(x)
            qkv = qkv.view(b, length, n + 2 * m, e)
            qk = apply_rope(qkv[:, :, : n + m], cos, sin)  # (B, L, N + M, E)
            q, k, v = qk[:, :, :n], qk[:, :, n:], qkv[:, :, n + m :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, N|M, L, E)
        if cache is not None:
            k_all, v_all = cache.update(self.layer, input_pos, k, v)  # (B, M, S, E)
            if mask is ATTEND_ALL:
                k, v = k_all[:, :, : cache.end], v_all[:, :, : cache.end]
            elif mask is not None:  # the mask spans the slots written so far
                k, v = k_all[:, :, : mask.shape[-1]], v_all[:, :, : mask.shape[-1]]
            # With no mask this is a prefill from slot 0: the new keys are the whole context.
        # A cache may hold keys and values in float32 for a lower-precision model: attend in
        # float32 and return to the model's dtype (never otherwise: under autocast q is float32
        # after RoPE and SDPA's output bfloat16, as the memory planner counts).
        dtype = q.dtype if q.dtype != k.dtype else None
        q = q.to(k.dtype)
        if mask is ATTEND_ALL:
            out = decode_attention(q, k, v)  # (B, N, 1, E)
            out = out if dtype is None else out.to(dtype)
            return self.wo(out.transpose(1, 2).reshape(b, length, -1))  # (B, 1, D)
        # Each key/value head serves n_heads / n_kv_heads consecutive query heads; SDPA reads
        # them in place (enable_gqa) rather than from a repeated copy of the cache.
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is ATTEND_ALL else mask,
            is_causal=mask is None,
            enable_gqa=m != n,
        )  # (B, N, L, E)
        out = out if dtype is None else out.to(dtype)
        return self.wo(out.transpose(1, 2).reshape(b, length, -1))  # (B, L, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x) (Shazeer 2020)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        # (B, L, D) → (B, L, F) → (B, L, D); with ``cache`` (generation) w1 and w3 in one matmul
        if cache is None or torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = stacked_projection(self, (self.w1, self.w3), cache)(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: VideoLMConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        input_pos: torch.Tensor,
    ) -> torch.Tensor:
        # x: (B, L, D) → (B, L, D)
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, input_pos)
        return x + self.feed_forward(self.ffn_norm(x), cache)


# --- the model -------------------------------------------------------------------------------


class VideoLM(nn.Module):
    """Token ids ``(B, L)`` → next-token logits ``(B, L, V)`` over text, video and special ids.

    Training calls ``model(token_ids)`` (plain causal attention). Generation prefills a
    :class:`KVCache` and then feeds one token a step with ``cache`` and ``input_pos``; see
    :func:`loong.lm.sampling.generate_video_tokens`.
    """

    def __init__(self, config: VideoLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied: logits use tok_embeddings.weight, so the state dict holds the matrix once.
        self.output = (
            None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        )
        grid = config.video_grid
        self.cell_embeddings = None if grid is None else nn.Embedding(grid[0] * grid[1], config.dim)
        width = config.video_context_dim
        # one id past the video range stands for "no cell there" (outside the frame or video)
        self.context_embeddings = (
            nn.Embedding(config.vocab.video_vocab_size + 1, width) if width else None
        )
        self.context_proj = (
            nn.Linear(len(CONTEXT_OFFSETS) * width, config.dim, bias=False) if width else None
        )
        # video_code_bits: each (K → table width) map adds to the rows of the video ids
        bits = config.video_code_bits
        self.code_embedding = nn.Linear(bits, config.dim, bias=False) if bits else None
        untied = bits and not config.tie_embeddings
        self.code_head = nn.Linear(bits, config.dim, bias=False) if untied else None
        self.code_context = nn.Linear(bits, width, bias=False) if bits and width else None
        self._offsets: dict[torch.device, torch.Tensor] = {}
        if not self.tok_embeddings.weight.is_meta:  # meta tensors hold no values to draw
            self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual projections scaled by 1/sqrt(2·n_layers) (GPT-2).

        Call again after ``to_empty`` when the model was built on the meta device.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:
            for proj in (block.attention.wo, block.feed_forward.w2):
                nn.init.normal_(
                    proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers)
                )
        for code in (self.code_embedding, self.code_head, self.code_context):
            if code is not None:  # a sum of K ±1 terms: as wide a spread as one table row
                nn.init.normal_(code.weight, mean=0.0, std=std / math.sqrt(code.in_features))

    def forward(
        self,
        token_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        output_mask: torch.Tensor | None = None,
        id_range: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, L, V)`` for ``token_ids`` ``(B, L)``.

        - ``input_pos`` (L,): positions (and cache slots) of the tokens; default ``0..L−1``.
        - ``cache``: keys and values are written at ``input_pos``; the tokens attend to every
          cached slot up to their own.
        - ``attention_mask`` (B, L) bool, False for padding: padded keys are never attended to
          (each padded query attends to itself only, to stay finite). Left-pad prompts of
          unequal length: RoPE attention depends only on position differences, so a row
          shifted right by its padding gets the logits it would get alone.
        - ``last_only``: logits of the last position only, ``(B, 1, V)`` (sampling).
        - ``output_mask`` (B, L) bool: logits of the True positions only, ``(N, V)`` in row-major
          order (training: the positions whose next token is a target). The head, the widest
          matrix product, is never applied to the other positions.
        - ``id_range`` ``(lo, hi)``: logits of ids ``lo .. hi − 1`` only, ``(B, L, hi − lo)``:
          the head's other rows are never multiplied (sampling video ids).
        """
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be (B, L), got shape {tuple(token_ids.shape)}")
        b, length = token_ids.shape
        device = token_ids.device
        if input_pos is None:
            input_pos = torch.arange(length, device=device)
        if input_pos.shape != (length,):
            raise ValueError(
                f"input_pos must be ({length},), one position per new token, got "
                f"{tuple(input_pos.shape)}"
            )
        if attention_mask is not None and attention_mask.shape != (b, length):
            raise ValueError(
                f"attention_mask must be ({b}, {length}) like token_ids, got "
                f"{tuple(attention_mask.shape)}"
            )
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"the KV cache holds {cache.batch_size} rows, got {b}")
        if output_mask is not None:
            if last_only:
                raise ValueError("pass last_only or output_mask, not both")
            if output_mask.shape != (b, length) or output_mask.dtype != torch.bool:
                raise ValueError(
                    f"output_mask must be a bool ({b}, {length}) like token_ids, got "
                    f"{output_mask.dtype} {tuple(output_mask.shape)}"
                )
        x = F.embedding(token_ids, self._embedding_table())  # (B, L, D)
        if self.cell_embeddings is not None:  # before cache.mark: it reads the previous write
            x = x + self._cell_embedding(token_ids, input_pos, cache)
        if cache is not None:
            cache.mark(input_pos, attention_mask, token_ids)
        if self.context_embeddings is not None:  # after cache.mark: it reads this call's ids
            x = x + self._video_context(token_ids, input_pos, cache)
        mask = self._mask(input_pos, attention_mask, cache)  # (B, 1, L, S) or None
        cos, sin = rope_cos_sin(input_pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, input_pos)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        elif output_mask is not None:
            x = x[output_mask]  # (N, D)
        x = self.norm(x)
        lo, hi = (0, self.config.vocab_size) if id_range is None else id_range
        if not 0 <= lo < hi <= self.config.vocab_size:
            raise ValueError(
                f"id_range {id_range} is empty or outside [0, {self.config.vocab_size})"
            )
        if isinstance(self.output, Int8Linear):  # sampling with int8 weights (loong.lm.int8)
            return int8_linear(x, *self.output.rows(lo, hi))
        return F.linear(x, self._head_weight()[lo:hi])  # (B, L, V), (N, V) or (…, hi − lo)

    # -- tables indexed by ids (with video_code_bits: plain rows + the shared bit terms)

    def _video_codes(self, like: torch.Tensor) -> torch.Tensor:
        """Video id v's LFQ code, bit k of v as ±1 (as the tokenizer's ``LFQ.indices_to_codes``
        gives it): ``(V_video, K)`` in ``like``'s dtype."""
        ids = torch.arange(self.config.vocab.video_vocab_size, device=like.device)
        bits = torch.arange(self.config.video_code_bits, device=like.device)
        return (((ids[:, None] >> bits) & 1) * 2 - 1).to(like.dtype)

    def _with_code_terms(
        self, table: torch.Tensor, code: nn.Linear | None, lo: int
    ) -> torch.Tensor:
        """``table`` ``(V', W)`` with ``code``'s bit term added to the video ids' rows, which
        start at row ``lo``."""
        if code is None:
            return table
        hi = lo + self.config.vocab.video_vocab_size
        extra = F.linear(self._video_codes(code.weight), code.weight)  # (V_video, W)
        return torch.cat([table[:lo], table[lo:hi] + extra.to(table.dtype), table[hi:]])

    def _embedding_table(self) -> torch.Tensor:
        """The input embedding ``(V, D)``."""
        lo = self.config.vocab.text_vocab_size
        return self._with_code_terms(self.tok_embeddings.weight, self.code_embedding, lo)

    def _head_weight(self) -> torch.Tensor:
        """The output head ``(V, D)``: the embedding table when tied."""
        if self.output is None:
            return self._embedding_table()
        lo = self.config.vocab.text_vocab_size
        return self._with_code_terms(self.output.weight, self.code_head, lo)

    def _context_table(self) -> torch.Tensor:
        """The local-context embedding ``(V_video + 1, C)``; its last row is "no cell"."""
        return self._with_code_terms(self.context_embeddings.weight, self.code_context, 0)

    def folded(self) -> VideoLM:
        """This model without ``video_code_bits``: the same function, the bit terms summed into
        the plain tables (a model without them is returned as is)."""
        if not self.config.video_code_bits:
            return self
        with torch.no_grad():
            state = {k: v for k, v in self.state_dict().items() if not k.startswith("code_")}
            state["tok_embeddings.weight"] = self._embedding_table().detach().clone()
            if self.output is not None:
                state["output.weight"] = self._head_weight().detach().clone()
            if self.context_embeddings is not None:
                state["context_embeddings.weight"] = self._context_table().detach().clone()
        with torch.device("meta"):
            plain = VideoLM(dataclasses.replace(self.config, video_code_bits=0))
        plain.load_state_dict(state, assign=True)
        return plain.train(self.training)

    def _cell_embedding(
        self, token_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        """Each video token's cell embedding, zero elsewhere: ``(B, L, D)``.

        A video token's cell is its rank among the row's video tokens modulo h·w, so every
        sequence's video part must start at a latent frame's first cell (the layout's and the
        sliding window's do). A cached forward carries the rank on in ``cache.video_seen``, so
        it must start at slot 0 or continue where the cache's last write ended.
        """
        lo = self.config.vocab.text_vocab_size  # video ids are lo .. lo + video_vocab_size − 1
        is_video = (token_ids >= lo) & (token_ids < lo + self.config.vocab.video_vocab_size)
        rank = is_video.long().cumsum(dim=1) - 1  # (B, L) rank among this call's video tokens
        if cache is not None:
            start = int(input_pos[0])
            if start not in (0, cache.next_pos):
                raise ValueError(
                    f"with video_grid a cached forward must start at slot 0 or continue at slot "
                    f"{cache.next_pos}, got {start}: the cell of a video token is counted from "
                    f"the tokens fed before it"
                )
            if start == 0:
                cache.video_seen.zero_()
            rank = rank + cache.video_seen[:, None]
            cache.video_seen += is_video.sum(dim=1)
        cells = self.cell_embeddings(rank.clamp(min=0) % self.cell_embeddings.num_embeddings)
        return cells * is_video[..., None].to(cells.dtype)  # (B, L, D)

    def _video_context(
        self, token_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        """The embedded local video context of the token each position predicts: ``(B, L, D)``,
        zero before each row's BOV."""
        index, active = self.video_context_index(token_ids, input_pos, cache)  # (B, L, K), (B, L)
        context = F.embedding(index, self._context_table()).flatten(2)  # (B, L, K·C)
        return self.context_proj(context) * active[..., None].to(context.dtype)  # (B, L, D)

    def video_context_index(
        self, token_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Video indices ``(B, L, K)`` of the cells around the token each position predicts, at
        :data:`CONTEXT_OFFSETS` (``video_vocab_size`` where there is no cell), and ``(B, L)``
        True from each row's BOV on (past EOV too, where the cells are those of frames past the
        video's end: no cells, or the video's last ones).

        The video part is contiguous from the slot after BOV, so the cell at rank r (latent frame
        r // h·w, raster order within it) sits at slot ``start + r``. A cached forward reads the
        ids from ``cache.ids``, which ``cache.mark`` has written (this call's included);
        ``cache.video_start`` keeps each row's start from the call that fed its BOV (a call from
        slot 0 clears it). Without a
        cache, ``input_pos`` must be contiguous and the call must hold the row's BOV (a forward
        over a whole sequence, as training and the reference paths run).
        """
        if self.config.video_grid is None:
            raise ValueError("video_context_index needs a model with video_grid set")
        h, w = self.config.video_grid
        vocab = self.config.vocab
        lo, n_video = vocab.text_vocab_size, vocab.video_vocab_size
        is_bov = token_ids == lo + n_video + BOV  # (B, L)
        first_bov = input_pos[is_bov.long().argmax(dim=1)]  # (B,) slot of the row's first BOV
        here = torch.where(is_bov.any(dim=1), first_bov + 1, -1)  # (B,) video start or −1
        if cache is None:
            start, history, offset = here, token_ids, int(input_pos[0])
        else:
            if int(input_pos[0]) == 0:
                cache.video_start.fill_(-1)
            cache.video_start.copy_(torch.where(cache.video_start < 0, here, cache.video_start))
            start, history, offset = cache.video_start, cache.ids, 0
        rank = input_pos[None, :] + 1 - start[:, None]  # (B, L) rank of the predicted token
        active = (start[:, None] >= 0) & (rank >= 0)  # (B, L)
        frame, row, col = rank // (h * w), (rank % (h * w)) // w, rank % w
        dt, dr, dc = self._context_offsets(token_ids.device)  # (K,) each
        t, r, c = frame[..., None] - dt, row[..., None] + dr, col[..., None] + dc  # (B, L, K)
        inside = active[..., None] & (t >= 0) & (r >= 0) & (r < h) & (c >= 0) & (c < w)
        slot = start[:, None, None] + t * (h * w) + r * w + c - offset  # (B, L, K)
        inside = inside & (slot >= 0) & (slot < history.shape[1])
        ids = history.gather(1, slot.clamp(0, history.shape[1] - 1).flatten(1)).view(slot.shape)
        index = ids - lo
        index = torch.where(inside & (index >= 0) & (index < n_video), index, n_video)
        return index, active

    def _context_offsets(self, device: torch.device) -> torch.Tensor:
        """:data:`CONTEXT_OFFSETS` as a ``(3, K)`` tensor on ``device``, made once per device (no
        host-to-device copy each decode step)."""
        if device not in self._offsets:
            self._offsets[device] = torch.tensor(CONTEXT_OFFSETS, device=device).T.contiguous()
        return self._offsets[device]

    @staticmethod
    def _mask(
        input_pos: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor | bool | None:
        """Bool attention mask ``(B, 1, L, S)``; None where plain causal attention is exact;
        ``ATTEND_ALL`` where one new token sees exactly the slots below ``cache.end``. With a
        cache, S is the slots written so far (``cache.next_pos``), not the whole cache.

        None (the fused ``is_causal`` path) needs the new tokens to be the whole context from
        position 0 without padding: training, or a KV-cache prefill from slot 0. ``ATTEND_ALL``
        needs a dense cache (see :class:`KVCache`) the token was just appended to.
        """
        if cache is not None and cache.dense:  # mark() has run: a dense cache ends at the token
            if int(input_pos[0]) == 0:
                return None
            if len(input_pos) == 1:
                return ATTEND_ALL
        if attention_mask is None:
            if cache is None:
                return None
            if input_pos.shape[0] > 1 and int(input_pos[0]) == 0:
                return None
        if cache is None:
            key_pos = input_pos  # (S,) = (L,)
            key_valid = attention_mask  # (B, S)
        else:  # mark() has run: no slot at or past next_pos is written, nor attended to
            key_pos = torch.arange(cache.next_pos, device=input_pos.device)
            key_valid = cache.valid[:, : cache.next_pos]
        mask = key_pos[None, :] <= input_pos[:, None]  # (L, S) causal
        mask = mask[None] & key_valid[:, None, :]  # (B, L, S)
        mask = mask | (key_pos[None, :] == input_pos[:, None])  # a token always sees itself
        return mask[:, None]  # (B, 1, L, S)

    # -- construction and files

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> VideoLM:
        """An untrained model of a named size (see :mod:`loong.lm.presets`)."""
        from loong.lm.presets import lm_preset

        return cls(lm_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VideoLM:
        """Load ``config.json`` + ``model.safetensors`` written by :meth:`save_pretrained`."""
        from loong.pretrained import load_pretrained

        config, state = load_pretrained(directory, VideoLMConfig, kind="video_lm")
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        return model.to(device).eval()

    def save_pretrained(self, directory: str | Path) -> None:
        from loong.pretrained import save_pretrained

        if has_int8_weights(self):
            raise ValueError(
                "this model holds int8 weights (loong.lm.int8.int8_weights), which are for "
                "sampling: save the float model and convert it after loading"
            )
        model = self.folded()  # an export never holds training-only parameters
        save_pretrained(model, model.config, directory, kind="video_lm")

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` leaves out the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n
