"""Sampling functions and video-token generation with the KV cache."""

from __future__ import annotations

import pytest
import torch

from loong.lm.kv_cache import KVCache
from loong.lm.model import VideoLM
from loong.lm.sampling import (
    cfg_logits,
    generate_video_tokens,
    left_pad,
    logits_to_probs,
    restrict_to_range,
    sample,
    verify_drafts,
)
from loong.lm.vocab import Vocabulary


def test_top_k_one_and_temperature_zero_are_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    argmax = logits.argmax(-1)
    assert torch.equal(sample(logits, top_k=1, generator=g), argmax)
    assert torch.equal(sample(logits, temperature=0.0, generator=g), argmax)
    # As the temperature falls, sampling concentrates on the argmax.
    assert torch.equal(sample(logits, temperature=1e-3, generator=g), argmax)


def test_temperature_and_top_k_reshape_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(logits_to_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))
    probs = logits_to_probs(logits, 1.0, top_k=2)
    torch.testing.assert_close(probs[0, 2:], torch.zeros(2))
    torch.testing.assert_close(probs[0, :2], torch.softmax(logits[0, :2], -1))


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.4, [0.5]), (0.7, [0.5, 0.25]), (0.8, [0.5, 0.25, 0.15]), (1.0, None)]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.15, 0.5, 0.1, 0.25])  # shuffled, so order handling is exercised
    out = logits_to_probs(probs.log()[None], top_p=top_p)[0]
    kept = probs.tolist() if kept is None else kept
    expected = torch.where(torch.isin(probs, torch.tensor(kept)), probs, torch.zeros_like(probs))
    torch.testing.assert_close(out, expected / expected.sum())


def test_sampling_frequencies_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20_000, 3)
    ids = sample(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_restrict_to_range_and_cfg_logits():
    logits = torch.arange(10.0)[None]
    out = restrict_to_range(logits, 3, 7)
    assert torch.isinf(out[0, :3]).all() and torch.isinf(out[0, 7:]).all()
    torch.testing.assert_close(out[0, 3:7], logits[0, 3:7])
    assert not torch.isinf(logits).any()  # the input is untouched
    cond, uncond = torch.randn(2, 10), torch.randn(2, 10)
    torch.testing.assert_close(cfg_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def prompts(vocab: Vocabulary) -> torch.Tensor:
    return torch.stack(
        [vocab.layout([1, 2, 3], None).token_ids, vocab.layout([4, 5, 6], None).token_ids]
    )


def test_same_seed_same_tokens_and_other_seed_other_tokens(make_lm):
    model = make_lm()
    vocab = Vocabulary(model.config.vocab)
    run = lambda seed: generate_video_tokens(model, prompts(vocab), 12, vocab=vocab, seed=seed)
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_guidance_scale_one_equals_unguided(make_lm):
    model = make_lm()
    vocab = Vocabulary(model.config.vocab)
    kwargs = {"vocab": vocab, "seed": 3, "top_k": 20, "top_p": 0.9}
    plain = generate_video_tokens(model, prompts(vocab), 10, **kwargs)
    uncond = torch.full((2, 2), vocab.bos)
    uncond[:, 1] = vocab.bov
    scale_one = generate_video_tokens(
        model, prompts(vocab), 10, uncond_ids=uncond, guidance_scale=1.0, **kwargs
    )
    assert torch.equal(plain, scale_one)


class TextLovingLM(VideoLM):
    """A model whose logits favour text and special ids by a wide margin."""

    def forward(self, token_ids, **kwargs):
        logits = super().forward(token_ids, **kwargs)
        lo, hi = Vocabulary(self.config.vocab).video_id_range
        bias = torch.full((logits.shape[-1],), 50.0)
        bias[lo:hi] = 0.0
        return logits + bias


def test_only_video_ids_are_sampled_even_when_text_is_preferred(make_lm):
    model = TextLovingLM(make_lm().config)
    model.load_state_dict(make_lm().state_dict())
    vocab = Vocabulary(model.config.vocab)
    with torch.no_grad():
        assert not vocab.is_video(model(prompts(vocab))[:, -1].argmax(-1)).any()
    for guidance in (1.0, 4.0):
        ids = generate_video_tokens(
            model, prompts(vocab), 16, vocab=vocab, guidance_scale=guidance, temperature=2.0
        )
        assert vocab.is_video(ids).all()


def greedy_reference(model, cond, uncond, n_tokens, scale, vocab):
    """No cache, no batching, no padding: full forwards of each sequence, step by step."""
    lo, hi = vocab.video_id_range
    out = []
    for _ in range(n_tokens):
        with torch.no_grad():
            logits = model(cond[None])[0, -1]
            if scale != 1.0:
                logits = cfg_logits(logits, model(uncond[None])[0, -1], scale)
        token = restrict_to_range(logits, lo, hi).argmax()
        out.append(token)
        cond, uncond = torch.cat([cond, token[None]]), torch.cat([uncond, token[None]])
    return torch.stack(out)


STICKY = 4.0


class StickyLM(VideoLM):
    """Logits that favour the id just fed by ``STICKY``, so a draft one id back is often right
    (and often wrong): both branches of speculative decoding run."""

    sticky = STICKY

    def forward(self, token_ids, *, last_only=False, id_range=None, **kwargs):
        logits = super().forward(token_ids, last_only=last_only, id_range=id_range, **kwargs)
        fed = token_ids[:, -1:] if last_only else token_ids  # (B, L')
        column = fed - (0 if id_range is None else id_range[0])
        inside = (column >= 0) & (column < logits.shape[-1])
        bonus = torch.zeros_like(logits).scatter_(
            -1, column.clamp(0, logits.shape[-1] - 1)[..., None], self.sticky
        )
        return logits + bonus * inside[..., None]


def sticky_lm(make_lm, **fields) -> StickyLM:
    source = make_lm(**fields)
    model = StickyLM(source.config)
    model.load_state_dict(source.state_dict())
    return model.eval()


@pytest.mark.parametrize("speculate", [0, 8], ids=["plain", "speculative"])
@pytest.mark.parametrize(
    "fields",
    [{}, {"video_grid": (2, 2)}, {"video_grid": (2, 2), "video_context_dim": 4}],
    ids=["rope-only", "cell-embeddings", "video-context"],
)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_generation_with_padding_and_guidance_matches_a_plain_reference(
    make_lm, scale, fields, speculate, monkeypatch
):
    model = sticky_lm(make_lm, **fields)
    vocab = Vocabulary(model.config.vocab)
    lo, _ = vocab.video_id_range
    video = torch.full((8,), lo + 3)  # a video prefix, so drafts start at once
    rows = [
        torch.cat([vocab.layout([1, 2, 3, 4, 5], None).token_ids, video]),
        torch.cat([vocab.layout([6], None).token_ids, video]),
    ]
    uncond = [vocab.layout([], None).token_ids, vocab.layout([7, 8], None).token_ids]
    calls, forwards, truncations = [], [], []
    model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[1]))
    truncate = KVCache.truncate
    monkeypatch.setattr(
        KVCache, "truncate", lambda cache, n: (truncations.append(n), truncate(cache, n))
    )
    ids = generate_video_tokens(
        model,
        left_pad(rows, vocab.pad),
        16,
        vocab=vocab,
        uncond_ids=left_pad(uncond, vocab.pad),
        guidance_scale=scale,
        temperature=0.0,
        speculate=speculate,
        draft_lag=4,
        on_token=lambda step, tokens: calls.append(step),
    )
    assert calls == list(range(16))
    decode_steps = forwards[1:]  # after the prefill
    for i in range(2):
        expected = greedy_reference(model, rows[i], uncond[i], 16, scale, vocab)
        assert torch.equal(ids[i], expected)
    if speculate:  # several drafts were fed at once (kept and rejected ones: the test below)
        assert max(decode_steps) > 2, decode_steps
    else:
        assert decode_steps == [1] * 15 and not truncations


def test_sampling_with_drafts_keeps_some_and_rejects_others(make_lm, monkeypatch):
    model = sticky_lm(make_lm)
    model.sticky = 6.0  # repeats are likely, not certain
    vocab = Vocabulary(model.config.vocab)
    lo, _ = vocab.video_id_range
    prompt = torch.cat([vocab.layout([1, 2], None).token_ids, torch.full((8,), lo + 3)])[None]
    forwards, truncations = [], []
    model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[1]))
    truncate = KVCache.truncate
    monkeypatch.setattr(
        KVCache, "truncate", lambda cache, n: (truncations.append(n), truncate(cache, n))
    )
    ids = generate_video_tokens(model, prompt, 40, vocab=vocab, speculate=8, draft_lag=4)
    assert ids.shape == (1, 40) and vocab.is_video(ids).all()
    assert len(forwards) - 1 < 39 and max(forwards[1:]) > 2 and truncations


@pytest.mark.parametrize(
    "fields",
    [{}, {"video_grid": (2, 2)}, {"video_grid": (2, 2), "video_context_dim": 4}],
    ids=["rope-only", "cell-embeddings", "video-context"],
)
def test_speculative_sampling_draws_the_guided_distribution(make_lm, fields):
    """Marginals of the first three sampled ids against the model's, enumerated exactly."""
    model = sticky_lm(make_lm, seed=1, **fields)
    vocab = Vocabulary(model.config.vocab)
    lo, hi = vocab.video_id_range
    v, scale = hi - lo, 2.0
    cond = torch.cat([vocab.layout([1, 2, 3], None).token_ids, torch.tensor([lo + 3, lo + 5])])
    uncond = vocab.layout([], None).token_ids

    def probs(prefixes: torch.Tensor) -> torch.Tensor:  # (P, j) video ids → (P, V) guided
        with torch.no_grad():
            c = model(torch.cat([cond.expand(len(prefixes), -1), prefixes], 1))[:, -1, lo:hi]
            u = model(torch.cat([uncond.expand(len(prefixes), -1), prefixes], 1))[:, -1, lo:hi]
        return torch.softmax(cfg_logits(c, u, scale), -1)

    p0 = probs(torch.empty((1, 0), dtype=torch.long))[0]  # (V,)
    p1 = probs((lo + torch.arange(v))[:, None])  # (V, V)
    pairs = torch.cartesian_prod(torch.arange(v), torch.arange(v)) + lo
    p2 = probs(pairs).view(v, v, v)
    expected = [p0, p0 @ p1, torch.einsum("a,ab,abc->c", p0, p1, p2)]
    ids = torch.cat(
        [
            generate_video_tokens(
                model,
                cond.expand(3000, -1),
                3,
                vocab=vocab,
                guidance_scale=scale,
                seed=seed,
                speculate=8,
                draft_lag=2,  # the ids 2 back: the prompt's video, then the sampled ones
            )
            - lo
            for seed in range(6)
        ]
    )  # (18000, 3)
    n = len(ids)
    for j, marginal in enumerate(expected):
        freq = torch.bincount(ids[:, j], minlength=v).float() / n
        tolerance = 5 * (marginal * (1 - marginal) / n).sqrt() + 1e-3
        assert ((freq - marginal).abs() <= tolerance).all(), j


def test_verify_drafts_keeps_the_model_distribution():
    """A kept-or-redrawn id is a draw from p, at the first position and after a kept draft."""
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]])  # positions 0, 1, 2
    n = 40_000
    logits = p.log().expand(n, 3, 3)
    drafts = torch.tensor([1, 2]).expand(n, 2)  # draft 0 is likely, draft 1 is not
    ids, _ = verify_drafts(logits, drafts, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (n, 3)
    tolerance = 4 * (0.25 / n) ** 0.5
    first = torch.bincount(ids[:, 0], minlength=3).float() / n
    torch.testing.assert_close(first, p[0], atol=tolerance, rtol=0)
    after_kept = ids[ids[:, 0] == 1, 1]  # position 1 counts only where draft 0 was kept
    assert len(after_kept) > n // 2
    second = torch.bincount(after_kept, minlength=3).float() / len(after_kept)
    torch.testing.assert_close(second, p[1], atol=4 * (0.25 / len(after_kept)) ** 0.5, rtol=0)
    # The top-k / top-p distribution is the one kept: an id outside it never appears.
    ids, _ = verify_drafts(logits, drafts, top_k=2, generator=torch.Generator().manual_seed(1))
    assert not (ids[:, 0] == 0).any() and not (ids[ids[:, 0] == 1, 1] == 1).any()


def test_verify_drafts_stops_at_the_first_row_that_rejects():
    logits = torch.full((2, 4, 5), -5.0)
    logits[0, torch.arange(4), torch.tensor([2, 3, 4, 0])] = 5.0  # row 0 agrees with its drafts
    logits[1, torch.arange(4), torch.tensor([1, 1, 0, 0])] = 5.0  # row 1 turns away at 1
    drafts = torch.tensor([[2, 3, 4], [1, 2, 3]])
    ids, n = verify_drafts(logits, drafts, temperature=0.0)
    assert n == 2 and ids[:, :2].tolist() == [[2, 3], [1, 1]]
    ids, n = verify_drafts(logits[:1], drafts[:1], temperature=0.0)
    assert n == 4 and ids.tolist() == [[2, 3, 4, 0]]  # every draft kept, then one id more
    with pytest.raises(ValueError, match="disagree"):
        verify_drafts(logits, drafts[:, :2])


def test_generation_longer_than_max_seq_len_is_rejected(make_lm):
    model = make_lm()
    vocab = Vocabulary(model.config.vocab)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_video_tokens(model, prompts(vocab), 64, vocab=vocab)
