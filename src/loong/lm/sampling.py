"""Sampling video tokens from a :class:`VideoLM`, as small named functions (after gpt-fast).

Loong samples with temperature and top-k; top-p and classifier-free guidance follow LlamaGen
(guided logits = uncond + scale · (cond − uncond), trained with caption dropout so the model also
knows the empty caption). Inside the video part only video ids may be sampled, so every other id
is masked to −inf before sampling.

**Frame-copy speculative decoding.** Most cells of a latent frame repeat the cell above them in
time (a still background), so the id one latent frame back (``draft_lag = h·w`` positions) is a
free draft of the next id. Each decode step feeds the last sampled id together with up to
``speculate`` such drafts, and speculative sampling (Leviathan et al. 2023; Chen et al. 2023)
keeps draft i with probability p_i(draft i), else draws from p_i with the draft removed and
stops. With a draft that is one id (its own distribution a point mass) this is exactly the
model's distribution, token by token, whatever the drafts: only the speed depends on them. At
temperature 0 a draft is kept when it is the argmax, so greedy output is the same ids as
without drafts (up to float rounding: a forward of several ids may break a near tie of two
logits the other way than a one-id step). One forward of k + 1 tokens costs far less than
k + 1 one-token forwards on a CPU or a GPU at batch 1, so every accepted draft is nearly free.

Axes: B batch, L prompt length, K drafts, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

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


def verify_drafts(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Speculative sampling against one-id drafts → ids ``(B, K + 1)`` and ``n`` in 1 .. K + 1.

    ``logits`` ``(B, K + 1, V)``: position i's logits given the drafts before it; ``drafts``
    ``(B, K)`` ids in 0 .. V − 1. Row b's id at position i is draft i when kept (with
    probability p_i(draft), or when it is the argmax at temperature 0), else a draw from p_i
    without the draft; the last position is a plain draw. The first ``n`` ids are the output:
    every row kept drafts 0 .. n − 2, and position n − 1 is where some row stopped (or the
    plain draw). Each is a draw from the model's own distribution given the ids before it.
    """
    if logits.ndim != 3 or drafts.shape != (logits.shape[0], logits.shape[1] - 1):
        raise ValueError(
            f"logits (B, K + 1, V) and drafts (B, K) disagree: {tuple(logits.shape)} and "
            f"{tuple(drafts.shape)}"
        )
    k = drafts.shape[1]
    if temperature == 0 or top_k == 1:
        ids = torch.argmax(logits, dim=-1)  # (B, K + 1)
        kept = ids[:, :k] == drafts  # (B, K)
    else:
        probs = logits_to_probs(logits, temperature, top_k, top_p)  # (B, K + 1, V)
        p_draft = probs[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, K)
        u = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
        kept = u < p_draft
        residual = probs[:, :k].scatter(-1, drafts[..., None], 0.0)  # p without the draft
        fresh = multinomial_sample_one(torch.cat([residual, probs[:, k:]], dim=1), generator)
        ids = torch.cat([torch.where(kept, drafts, fresh[:, :k]), fresh[:, k:]], dim=1)
    all_kept = kept.all(dim=0)  # (K,)
    n = k + 1 if bool(all_kept.all()) else int(torch.argmin(all_kept.int())) + 1  # host sync
    return ids, n


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


def prefill(
    model: VideoLM, ids: torch.Tensor, n_tokens: int, *, vocab: Vocabulary
) -> tuple[KVCache, torch.Tensor]:
    """Run rows ``ids`` ``(R, L)`` (PAD on the left allowed) into a new KV cache with room for
    ``n_tokens`` more → the cache and the last position's logits of the video ids ``(R, V_video)``.

    Only video ids may be sampled next, so the head computes no other logits.
    """
    rows, length = ids.shape
    cfg = model.config
    # On a CPU the cache, and the attention over it, are float32 whatever the model's dtype:
    # there one query against the cache took twice as long in bfloat16 as in float32.
    dtype = torch.float32 if ids.device.type == "cpu" else next(model.parameters()).dtype
    cache = KVCache(
        n_layers=cfg.n_layers,
        batch_size=rows,
        n_kv_heads=cfg.kv_heads,
        max_len=length + n_tokens,
        head_dim=cfg.head_dim,
        dtype=dtype,
        device=ids.device,
    )
    mask = ids != vocab.pad  # (R, L)
    logits = model(
        ids,
        cache=cache,
        input_pos=torch.arange(length, device=ids.device),
        attention_mask=None if bool(mask.all()) else mask,
        last_only=True,
        id_range=vocab.video_id_range,
    )[:, -1]  # (R, V_video)
    return cache, logits


def check_drafts(speculate: int, draft_lag: int | None) -> None:
    """Reject a bad ``speculate`` / ``draft_lag`` pair before any work is done."""
    if speculate < 0:
        raise ValueError(f"speculate must be >= 0 (0 is off), got {speculate}")
    if speculate and (draft_lag is None or draft_lag < 1):
        raise ValueError(
            f"speculate={speculate} needs draft_lag >= 1, got {draft_lag}: pass draft_lag=h·w "
            f"(ids per latent frame) or speculate=0"
        )


def decode_video_ids(
    model: VideoLM,
    cache: KVCache,
    logits: torch.Tensor,
    history: torch.Tensor,
    n_tokens: int,
    *,
    id_range: tuple[int, int],
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    speculate: int = 0,
    draft_lag: int | None = None,
) -> Iterator[torch.Tensor]:
    """Decode ``n_tokens`` video ids after a prefill: an iterator of chunks ``(B, n)`` as sampled.

    ``cache`` holds the prefilled prompt rows (the B prompts, then B unconditional rows when
    ``guidance_scale != 1``); ``logits`` ``(R, V_video)`` are the prefill's last-position logits
    over the ids ``id_range``; ``history`` ``(B, L)`` is what the B prompt rows were fed. With
    ``speculate > 0`` and ``draft_lag`` set, each step also feeds up to ``speculate`` drafts, the
    ids ``draft_lag`` positions back (see the module docstring); a draft must come from a video
    id, so the first latent frame after a text-only prompt is sampled one id at a time. The
    number of drafts adapts: the budget doubles (up to ``speculate``) after a step that kept
    all its drafts, and after one that did not it falls to half the drafts fed (at least 1),
    since a long forward whose drafts are soon rejected costs more than the one-id steps it
    replaces. Arguments are checked before the first id is sampled (callers that prefill
    first check them before, with :func:`check_drafts`).
    Ids are in the joint space. Chunks add up to exactly ``n_tokens`` ids.
    """
    check_drafts(speculate, draft_lag)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    b, length = history.shape
    lo, hi = id_range
    guided = guidance_scale != 1.0
    pick = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}

    def guide(x: torch.Tensor) -> torch.Tensor:  # (R, ..., V) → (B, ..., V), float32
        x = x.float()  # guidance and sampling in float32 whatever the model's dtype
        return cfg_logits(x[:b], x[b:], guidance_scale) if guided else x

    # Drafts come from the sequence so far; columns from first_video on hold video ids in all
    # rows (the prompt's video prefix, then everything sampled).
    seq = torch.cat([history.long(), history.new_zeros((b, n_tokens))], dim=1)  # (B, L + n)
    is_video = ((history >= lo) & (history < hi)).all(dim=0).tolist()
    first_video = length
    while first_video > 0 and is_video[first_video - 1]:
        first_video -= 1

    last = lo + sample(guide(logits), **pick)  # (B,)
    seq[:, length] = last
    yield last[:, None]
    done, pos = 1, cache.next_pos  # pos: the slot ``last`` goes to
    budget = speculate  # drafts per step: doubled while all are kept, halved after a rejection
    while done < n_tokens:
        # 1. drafts: the ids one lag back, when they are video ids already known
        source = length + done - (draft_lag or 0)
        k = min(budget, n_tokens - done - 1, draft_lag or 0) if source >= first_video else 0
        feed = torch.cat([last[:, None], seq[:, source : source + k]], dim=1)  # (B, 1 + K)
        # 2. one forward over the last id and the drafts, every row alike
        rows = torch.cat([feed, feed]) if guided else feed
        input_pos = torch.arange(pos, pos + k + 1, device=feed.device)
        out = model(rows, cache=cache, input_pos=input_pos, last_only=k == 0, id_range=id_range)
        # 3. keep the drafts the model accepts, then one id of its own
        if k == 0:
            ids, n = (lo + sample(guide(out[:, -1]), **pick))[:, None], 1
        else:
            ids, n = verify_drafts(guide(out), feed[:, 1:] - lo, **pick)
            ids = ids[:, :n] + lo
            if n < k + 1:
                cache.truncate(pos + n)  # slots of the rejected drafts
            # A long forward whose drafts are soon rejected costs more than it saves
            budget = min(speculate, 2 * budget) if n == k + 1 else max(1, k // 2)
        seq[:, length + done : length + done + n] = ids
        done, pos, last = done + n, pos + n, ids[:, -1]
        yield ids


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
    speculate: int = 0,
    draft_lag: int | None = None,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample ``n_tokens`` video ids after ``prompt_ids`` ``(B, L)`` → ``(B, n_tokens)`` ids.

    1. Prompts: rows of ``prompt_ids`` (usually ``vocab.layout(text_ids, None)``, ending in BOV)
       may be left-padded with PAD to a common length (:func:`left_pad`). With
       ``guidance_scale != 1`` the unconditional rows (``uncond_ids``, default the empty caption
       ``[BOS] [BOV]``) join the batch, left-padded to the same length; at scale 1 they are
       not run, since guidance 1 is the conditional model.
    2. Prefill: one forward over all rows fills a KV cache of ``L + n_tokens`` slots.
    3. Decode (:func:`decode_video_ids`): each step guides (if asked), samples among video ids
       only (the head computes no other logits) with a ``torch.Generator`` seeded by ``seed``
       (same seed, same tokens), and feeds the token to every row (conditional and
       unconditional alike) for the next step. ``speculate`` drafts per step, copied from
       ``draft_lag`` (= h·w) positions back, make it faster with the same distribution.

    ``on_token(step, ids (B,))`` is called after each sampled token, e.g. to stream frames.
    The result holds ids in the joint space; ``vocab.ids_to_video(ids, (h, w))`` gives indices.
    """
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be (B, L), got shape {tuple(prompt_ids.shape)}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    check_drafts(speculate, draft_lag)
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
    length = ids.shape[1]
    if length + n_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({length}) + n_tokens ({n_tokens}) exceeds max_seq_len="
            f"{model.config.max_seq_len}: generate fewer tokens or slide a window"
        )
    # 2. prefill
    generator = torch.Generator(device=device).manual_seed(seed)
    cache, logits = prefill(model, ids, n_tokens, vocab=vocab)  # logits (rows, V_video)

    # 3. decode
    chunks = decode_video_ids(
        model,
        cache,
        logits,
        ids[:b],
        n_tokens,
        id_range=vocab.video_id_range,
        guidance_scale=guidance_scale,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        speculate=speculate,
        draft_lag=draft_lag,
    )
    out = torch.empty((b, n_tokens), dtype=torch.long, device=device)
    done = 0
    for chunk in chunks:  # (B, n)
        out[:, done : done + chunk.shape[1]] = chunk
        if on_token is not None:
            for i in range(chunk.shape[1]):
                on_token(done + i, chunk[:, i])
        done += chunk.shape[1]
    return out
