"""Preallocated key/value cache for incremental decoding (as in gpt-fast).

Keys and values live in two tensors ``(n_layers, B, n_kv_heads, max_len, head_dim)`` written in
place at the slots ``input_pos`` of each forward: a prefill writes L slots, each decode step one
(or, with speculative drafts, a few).
Slot s holds the token at position s, and the keys are stored after RoPE.

A bool ``valid`` ``(B, max_len)`` records which written slots hold real tokens, so left-padded
prompts in one batch (PAD before the shorter prompts) are never attended to.

The cache also knows on the host whether it is **dense**: slots ``0 .. end − 1`` written in
order, once each, with no padding. A one-token step at slot ``end`` of a dense cache then needs
no mask at all (it attends to every slot below ``end``), which is the decode fast path.

Speculative decoding writes draft tokens after the last one and keeps only those the model
accepts: :meth:`KVCache.truncate` forgets the rest, so the next write continues right after
the last kept slot (and a dense cache stays dense).

Sliding windows over long videos need no cache surgery: the next window's prefix (the text plus
the re-encoded last frames) differs from the tokens already cached, so the window is prefilled
again after :meth:`KVCache.reset`. Keys are stored rotated by their absolute position, which is
why rolling the slots in place would need the positions rebased as well.

Axes: B batch, L new tokens, S cache slots (``max_len``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows and up to ``max_len`` positions."""

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros((batch_size, max_len), dtype=torch.bool, device=device)
        self.video_seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        """Video tokens written so far in each row: the rank the next one continues from (a
        model with ``video_grid`` uses it for the cell embedding of a token fed in order)."""
        self.ids = torch.zeros((batch_size, max_len), dtype=torch.long, device=device)
        """Token ids by slot (a model with ``video_context_dim`` reads its neighbours here)."""
        self.video_start = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        """Each row's slot of its first video token, −1 before its BOV is fed."""
        self.max_len = max_len
        self.next_pos = 0
        """One past the highest slot of the last write."""
        self.end = 0
        """One past the last written slot while the cache is dense."""
        self.dense = True
        """Slots 0 .. end − 1 were written in order, each once, none of them padding."""
        self.stacks: dict[object, Callable[[torch.Tensor], torch.Tensor]] = {}
        """Each block's projections stacked into one (``loong.lm.model``'s
        ``stacked_projection``), built at their first use: a cache serves one generation, during
        which the weights do not change."""

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget every cached token and stacked weight (the buffers stay allocated)."""
        self.stacks.clear()
        self.k.zero_()
        self.v.zero_()
        self.valid.zero_()
        self.video_seen.zero_()
        self.video_start.fill_(-1)
        self.end, self.dense, self.next_pos = 0, True, 0

    def truncate(self, length: int) -> None:
        """Forget slots ``length .. next_pos − 1`` (rejected draft tokens); a dense cache stays
        dense. The forgotten slots must hold video tokens, as drafts do: ``video_seen`` counts
        them off.
        """
        if not 0 <= length <= self.next_pos:
            raise ValueError(f"truncate to {length} slots: the cache holds {self.next_pos}")
        self.valid[:, length : self.next_pos] = False
        self.video_seen -= self.next_pos - length
        self.next_pos = length
        if self.dense:
            self.end = min(self.end, length)

    def mark(
        self, input_pos: torch.Tensor, attention_mask: torch.Tensor | None, token_ids: torch.Tensor
    ) -> None:
        """Record slots ``input_pos`` (L,) as written with ``token_ids`` (B, L);
        ``attention_mask`` (B, L) marks the real ones."""
        lo, hi = (int(v) for v in torch.aminmax(input_pos))  # one host sync per forward
        if hi >= self.max_len:
            raise ValueError(
                f"position {hi} does not fit a KV cache of {self.max_len} slots: allocate a "
                f"longer cache"
            )
        self.ids[:, input_pos] = token_ids
        in_order = lo == self.end and hi - lo + 1 == len(input_pos)  # the next slots, all new
        padded = attention_mask is not None and not bool(attention_mask.all())
        self.dense = self.dense and in_order and not padded
        self.end = hi + 1 if self.dense else self.end
        self.next_pos = hi + 1
        if attention_mask is None:
            self.valid[:, input_pos] = True
        else:
            self.valid[:, input_pos] = attention_mask.to(torch.bool)

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (B, n_kv_heads, L, head_dim) at slots ``input_pos`` (L,) of ``layer``.

        Returns the layer's whole cache, ``(B, n_kv_heads, S, head_dim)`` twice.
        """
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        return k_cache, v_cache
