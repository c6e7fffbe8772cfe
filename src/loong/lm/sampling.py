"""Sampling video tokens from a :class:`VideoLM`, as small named functions (after gpt-fast).

Loong samples with temperature and top-k; top-p and classifier-free guidance follow LlamaGen
(guided logits = uncond + scale · (cond − uncond), trained with caption dropout so the model also
knows the empty caption). Inside the video part only video ids may be sampled, so every other id
is masked to −inf before sampling.

Axes: B batch, L prompt length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loong.lm.kv_cache import KVCache
from loong.lm.model import VideoLM
from loong.lm.vocab import Vocabulary


def logits_to_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Logits ``(..., V)`` → probabilities ``(..., V)`` after temperature, top-k and top-p.

    top-k keeps the k largest logits (ties with the k-th are kept too); top-p then keeps the
    smallest set of most likely ids whose probability mass reaches p (Holtzman et al. 2020).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here, got {temperature}: use sample() for 0")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the mass before it already reaches p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def multinomial_sample_one(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw per row of ``probs`` ``(B, V)`` → ids ``(B,)``, without a host sync.

    argmax(p / q) with q ~ Exp(1) picks id i with probability p_i (the exponential race).
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / q, dim=-1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-token logits ``(B, V)`` → sampled ids ``(B,)``; temperature 0 or top_k=1 is argmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 or top_k == 1:
        return torch.argmax(logits, dim=-1)
    return multinomial_sample_one(logits_to_probs(logits, temperature, top_k, top_p), generator)


def restrict_to_range(logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Logits ``(..., V)`` with every id outside ``[lo, hi)`` set to −inf (a new tensor)."""
    if not 0 <= lo < hi <= logits.shape[-1]:
        raise ValueError(f"id range [{lo}, {hi}) is empty or outside [0, {logits.shape[-1]})")
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill((ids < lo) | (ids >= hi), float("-inf"))


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale · (cond − uncond)``; scale 1 gives ``cond``."""
    return uncond + scale * (cond - uncond)


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    """1-D id tensors of any lengths → ``(len(rows), longest)`` with ``pad_id`` on the left."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), pad_id, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, length - len(r) :] = r
    return out


@torch.no_grad()
def generate_video_tokens(
    model: VideoLM,
    prompt_ids: torch.Tensor,
    n_tokens: int,
    *,
    vocab: Vocabulary,
    uncond_ids: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample ``n_tokens`` video ids after ``prompt_ids`` ``(B, L)`` → ``(B, n_tokens)`` ids.

    1. Prompts: rows of ``prompt_ids`` (usually ``vocab.layout(text_ids, None)``, ending in BOV)
       may be left-padded with PAD to a common length (:func:`left_pad`). With
       ``guidance_scale != 1`` the unconditional rows (``uncond_ids``, default the empty caption
       ``[BOS] [BOV]``) join the batch, left-padded to the same length; at scale 1 they are
       not run, since guidance 1 is the conditional model.
    2. Prefill: one forward over all rows fills a KV cache of ``L + n_tokens`` slots.
    3. Decode: each step guides (if asked), samples among video ids only (the head computes
       no other logits) with a
       ``torch.Generator`` seeded by ``seed`` (same seed, same tokens), and feeds the token to
       every row (conditional and unconditional alike) for the next step.

    ``on_token(step, ids (B,))`` is called after each sampled token, e.g. to stream frames.
    The result holds ids in the joint space; ``vocab.ids_to_video(ids, (h, w))`` gives indices.
    """
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be (B, L), got shape {tuple(prompt_ids.shape)}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    b, device = prompt_ids.shape[0], prompt_ids.device
    guided = guidance_scale != 1.0

    # 1. prompts
    if guided:
        if uncond_ids is None:
            uncond_ids = vocab.layout([], None).token_ids.expand(b, -1)
        if uncond_ids.ndim != 2 or uncond_ids.shape[0] != b:
            raise ValueError(
                f"uncond_ids must be ({b}, L_u), one row per prompt, got {tuple(uncond_ids.shape)}"
            )
        rows = [r[r != vocab.pad] for r in (*prompt_ids, *uncond_ids.to(device))]
        ids = left_pad(rows, vocab.pad)  # (2B, L)
    else:
        ids = prompt_ids.long()  # (B, L)
    rows_total, length = ids.shape
    if length + n_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({length}) + n_tokens ({n_tokens}) exceeds max_seq_len="
            f"{model.config.max_seq_len}: generate fewer tokens or slide a window"
        )
    mask = ids != vocab.pad  # (rows, L)
    attention_mask = None if bool(mask.all()) else mask

    # 2. prefill
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cache = KVCache(
        n_layers=cfg.n_layers,
        batch_size=rows_total,
        n_kv_heads=cfg.kv_heads,
        max_len=length + n_tokens,
        head_dim=cfg.head_dim,
        dtype=dtype,
        device=device,
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    # Only video ids may be sampled: the head computes just their logits (ids lo .. hi − 1).
    lo, hi = vocab.video_id_range
    head = {"last_only": True, "id_range": (lo, hi)}
    logits = model(
        ids,
        cache=cache,
        input_pos=torch.arange(length, device=device),
        attention_mask=attention_mask,
        **head,
    )[:, -1]  # (rows, V_video)

    # 3. decode
    out = torch.empty((b, n_tokens), dtype=torch.long, device=device)
    for step in range(n_tokens):
        logits = logits.float()  # guidance and sampling in float32 whatever the model's dtype
        if guided:
            logits = cfg_logits(logits[:b], logits[b:], guidance_scale)  # (B, V_video)
        next_ids = lo + sample(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )  # (B,)
        out[:, step] = next_ids
        if on_token is not None:
            on_token(step, next_ids)
        if step == n_tokens - 1:
            break
        feed = next_ids.repeat(2) if guided else next_ids  # (rows,)
        pos = torch.tensor([length + step], device=device)
        logits = model(feed[:, None], cache=cache, input_pos=pos, **head)[:, -1]
    return out
