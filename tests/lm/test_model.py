"""The LLaMA decoder: causality, KV-cache decoding against the full forward, files, presets."""

from __future__ import annotations

import pytest
import torch

from loong.lm.kv_cache import KVCache
from loong.lm.model import CONTEXT_OFFSETS, VideoLM, VideoLMConfig
from loong.lm.presets import PRESETS, lm_preset
from loong.lm.sampling import prefill
from loong.lm.vocab import VocabConfig, Vocabulary

ATOL = 1e-5


def new_cache(model: VideoLM, batch_size: int, max_len: int) -> KVCache:
    cfg = model.config
    return KVCache(
        n_layers=cfg.n_layers,
        batch_size=batch_size,
        n_kv_heads=cfg.kv_heads,
        max_len=max_len,
        head_dim=cfg.head_dim,
    )


def random_ids(model: VideoLM, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random text and video ids (no specials, so no accidental PAD)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab
    high = vocab.text_vocab_size + vocab.video_vocab_size
    return torch.randint(0, high, (batch, length), generator=g)


def test_future_tokens_leave_past_logits_unchanged(make_lm):
    model = make_lm()
    ids = random_ids(model, 2, 24)
    changed = ids.clone()
    changed[:, 12:] = random_ids(model, 2, 12, seed=2)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 24, model.config.vocab_size)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=ATOL, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize(
    "fields",
    [{"n_kv_heads": 4}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": True}],
    ids=["mha", "gqa", "mqa-tied"],
)
def test_kv_cache_decoding_equals_full_forward(make_lm, fields):
    model = make_lm(**fields)
    ids = random_ids(model, 2, 20)
    with torch.no_grad():
        full = model(ids)
        cache = new_cache(model, 2, 32)
        steps = [model(ids[:, :8], cache=cache, input_pos=torch.arange(8))]  # prefill
        steps.append(model(ids[:, 8:12], cache=cache, input_pos=torch.arange(8, 12)))  # a chunk
        for i in range(12, 20):  # one token at a time
            steps.append(model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_stacked_projections_in_generation_equal_the_separate_ones(make_lm):
    """With a KV cache and no autograd, q/k/v and w1/w3 run as one matmul each, their weights
    stacked once per cache; otherwise as separate layers. A new cache sees changed weights."""
    model = make_lm()
    ids = random_ids(model, 2, 16)
    reference = model(ids).detach()  # autograd on: the separate projections
    with torch.no_grad():
        stacked = model(ids, cache=new_cache(model, 2, 16), input_pos=torch.arange(16))
        torch.testing.assert_close(stacked, reference, atol=ATOL, rtol=0)
        model.layers[0].feed_forward.w1.weight.mul_(0.5)
        model.layers[0].attention.wk.weight.mul_(2.0)
        changed = model(ids, cache=new_cache(model, 2, 16), input_pos=torch.arange(16))
    torch.testing.assert_close(changed, model(ids).detach(), atol=ATOL, rtol=0)
    assert not torch.allclose(changed, stacked, atol=1e-3)


def test_an_evaluation_sees_weights_written_behind_their_version_counters(make_lm):
    """FSDP2 gathers a block's weights before each forward into storage that can come back at
    the same address, with the version counter kept still: a forward without a KV cache must
    read the weights as they are, never a stack of them kept from an earlier forward."""
    model = make_lm()
    ids = random_ids(model, 2, 16)
    weights = [model.layers[0].attention.wq.weight, model.layers[0].feed_forward.w3.weight]
    with torch.no_grad():
        before = model(ids)
        pointers = [w.data_ptr() for w in weights]
        with torch.autograd._unsafe_preserve_version_counter(tuple(weights)):
            for w in weights:
                w.mul_(-1.5)  # in place: same address, same version counter
        assert [w.data_ptr() for w in weights] == pointers
        after = model(ids)
    torch.testing.assert_close(after, model(ids).detach(), atol=ATOL, rtol=0)
    assert not torch.allclose(after, before, atol=1e-3)


def test_dense_cache_decode_equals_the_masked_decode(make_lm):
    """The one-token fast path (no mask, keys below cache.end) gives the masked path's logits."""
    model = make_lm()
    ids = random_ids(model, 2, 14)
    logits = {}
    with torch.no_grad():
        for dense in (True, False):
            cache = new_cache(model, 2, 40)
            model(ids[:, :6], cache=cache, input_pos=torch.arange(6))
            cache.dense = dense  # False forces the general mask over all slots
            steps = [
                model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i]))
                for i in range(6, 14)
            ]
            logits[dense] = torch.cat(steps, dim=1)
            assert cache.end == (14 if dense else 6)
    torch.testing.assert_close(logits[True], logits[False], atol=ATOL, rtol=0)


def test_cache_is_dense_only_for_in_order_unpadded_writes(make_lm):
    model = make_lm()
    ids = random_ids(model, 2, 8)
    with torch.no_grad():
        cache = new_cache(model, 2, 16)
        model(ids[:, :4], cache=cache, input_pos=torch.arange(4))
        assert cache.dense and cache.end == 4
        model(ids[:, 4:5], cache=cache, input_pos=torch.tensor([6]))  # skips slots 4 and 5
        assert not cache.dense
        padded = new_cache(model, 2, 16)
        mask = torch.ones(2, 4, dtype=torch.bool)
        mask[1, 0] = False
        model(ids[:, :4], cache=padded, input_pos=torch.arange(4), attention_mask=mask)
        assert not padded.dense
        padded.reset()
        assert padded.dense and padded.end == 0


def test_last_only_and_id_range_slice_the_full_logits(make_lm):
    model = make_lm()
    ids = random_ids(model, 2, 10)
    with torch.no_grad():
        full = model(ids)
        part = model(ids, last_only=True, id_range=(40, 104))
    torch.testing.assert_close(part, full[:, -1:, 40:104], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="id_range"):
        model(ids, id_range=(5, 5))


def test_output_mask_gives_the_full_logits_rows_and_their_gradients(make_lm):
    model = make_lm()
    ids = random_ids(model, 2, 10)
    keep = torch.rand(2, 10, generator=torch.Generator().manual_seed(2)) < 0.5
    full = model(ids)
    part = model(ids, output_mask=keep)
    assert part.shape == (int(keep.sum()), full.shape[-1])
    torch.testing.assert_close(part, full[keep], atol=ATOL, rtol=0)
    weights = torch.randn_like(part)
    params = [model.output.weight, model.norm.weight, model.layers[0].attention.wq.weight]
    for want, got in zip(
        torch.autograd.grad((full[keep] * weights).sum(), params),
        torch.autograd.grad((part * weights).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="output_mask must be a bool"):
        model(ids, output_mask=keep[:, :5])
    with pytest.raises(ValueError, match="not both"):
        model(ids, output_mask=keep, last_only=True)


def test_reset_cache_prefills_again(make_lm):
    model = make_lm()
    ids = random_ids(model, 1, 10)
    cache = new_cache(model, 1, 16)
    with torch.no_grad():
        first = model(ids, cache=cache, input_pos=torch.arange(10))
        cache.reset()
        assert not cache.valid.any()
        other = random_ids(model, 1, 6, seed=3)
        again = model(other, cache=cache, input_pos=torch.arange(6))
    torch.testing.assert_close(again, model(other), atol=ATOL, rtol=0)
    assert not torch.allclose(first[:, :6], again, atol=1e-3)


def test_left_padded_batch_equals_each_prompt_alone(make_lm):
    """Padding is masked, and RoPE makes a right-shifted row give the logits it gives alone."""
    model = make_lm()
    pad = Vocabulary(model.config.vocab).pad
    short, long = random_ids(model, 1, 5, seed=4)[0], random_ids(model, 1, 9, seed=5)[0]
    ids = torch.stack([torch.cat([torch.full((4,), pad), short]), long])  # (2, 9)
    mask = ids != pad
    nxt = random_ids(model, 2, 3, seed=6)
    with torch.no_grad():
        cache = new_cache(model, 2, 12)
        batched = [model(ids, cache=cache, input_pos=torch.arange(9), attention_mask=mask)]
        for i in range(3):
            batched.append(model(nxt[:, i : i + 1], cache=cache, input_pos=torch.tensor([9 + i])))
        batched = torch.cat(batched, dim=1)  # (2, 12, V)
        no_cache = model(
            torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, mask[:, -3:]], 1)
        )
        alone_short = model(torch.cat([short, nxt[0]])[None])
        alone_long = model(torch.cat([long, nxt[1]])[None])
    torch.testing.assert_close(batched[0, 4:], alone_short[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1], alone_long[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(no_cache[0, 4:], alone_short[0], atol=ATOL, rtol=0)
    assert torch.isfinite(batched).all() and torch.isfinite(no_cache).all()


def test_cache_overflow_and_bad_shapes_are_rejected(make_lm):
    model = make_lm()
    cache = new_cache(model, 1, 4)
    with pytest.raises(ValueError, match="allocate a longer cache"):
        model(random_ids(model, 1, 5), cache=cache, input_pos=torch.arange(5))
    with pytest.raises(ValueError, match="input_pos"):
        model(random_ids(model, 1, 3), input_pos=torch.arange(4))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_config_validation_and_derived_sizes():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        VideoLMConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        VideoLMConfig(dim=32, n_heads=4, n_kv_heads=3)
    config = VideoLMConfig(dim=4096, n_heads=32)
    assert config.hidden_dim == 11008  # LLaMA-7B's width from the 8/3·dim rule
    assert config.kv_heads == 32 and config.head_dim == 128
    assert config.vocab_size == 40_202


def train_steps(model: VideoLM, ids: torch.Tensor, opt: torch.optim.Optimizer, n: int) -> list:
    """``n`` next-token steps on ``ids`` (B, L); the loss before each step."""
    losses = []
    for _ in range(n):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_few_steps_lower_the_loss(make_lm):
    model = make_lm(seed=1).train()
    ids = random_ids(model, 2, 16)
    losses = train_steps(model, ids, torch.optim.Adam(model.parameters(), lr=3e-3), 8)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(make_lm, tmp_path, tied):
    model = make_lm(tie_embeddings=tied)
    model.save_pretrained(tmp_path)
    loaded = VideoLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = random_ids(model, 1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    if tied:
        assert loaded.output is None


def test_loading_a_tokenizer_directory_is_rejected(tmp_path):
    from loong.pretrained import save_pretrained

    save_pretrained(torch.nn.Linear(1, 1), VocabConfig(), tmp_path, kind="video_tokenizer")
    with pytest.raises(ValueError, match="'video_tokenizer' model, not a 'video_lm'"):
        VideoLM.from_pretrained(tmp_path)


# Targets from the names; counts include both embedding matrices (see loong.lm.presets).
@pytest.mark.parametrize(
    ("name", "target"), [("loong-700m", 700e6), ("loong-3b", 3e9), ("loong-7b", 7e9)]
)
def test_paper_presets_land_within_ten_percent_of_their_names(name, target):
    with torch.device("meta"):
        model = VideoLM.from_preset(name)
    assert abs(model.num_parameters() - target) / target < 0.10
    assert model.config.vocab_size == 40_202


def test_tiny_preset_and_overrides():
    config = lm_preset("tiny", dim=128, vocab__text_vocab_size=1024)
    assert config.dim == 128 and config.vocab.text_vocab_size == 1024
    assert config.vocab.video_vocab_size == 4096  # the tiny video tokenizer's 2^12 LFQ codes
    assert set(PRESETS) == {"tiny", "shapes", "loong-700m", "loong-3b", "loong-7b"}
    with pytest.raises(ValueError, match="unknown config key"):
        lm_preset("tiny", n_layer=3)
    with pytest.raises(ValueError, match="choose one of"):
        lm_preset("loong-13b")


def test_cell_embedding_is_each_video_tokens_raster_cell(make_lm):
    """Video token k of the sequence gets cell k mod h·w; text and specials get none."""
    model = make_lm(video_grid=(2, 3))
    vocab = Vocabulary(model.config.vocab)
    layout = vocab.layout([5, 6, 7], torch.randint(0, 64, (3, 2, 3)))  # 3 latent frames + EOV
    ids = layout.token_ids[None]  # (1, L)
    cells = model._cell_embedding(ids, torch.arange(ids.shape[1]), None)[0]  # (L, D)
    video = vocab.is_video(layout.token_ids)
    expected = model.cell_embeddings.weight[torch.arange(18) % 6]
    torch.testing.assert_close(cells[video], expected, atol=0, rtol=0)
    assert not cells[~video].any()


def test_cell_embedding_changes_only_the_tokens_of_its_cell(make_lm):
    model = make_lm(video_grid=(2, 2))
    vocab = Vocabulary(model.config.vocab)
    ids = vocab.layout([1, 2], torch.randint(0, 64, (2, 2, 2)), eov=False).token_ids[None]
    with torch.no_grad():
        before = model(ids)
        model.cell_embeddings.weight[3].add_(1.0)  # the bottom-right cell
        after = model(ids)
    first = 4 + 3  # BOS, 2 text ids, BOV, then cells 0, 1, 2 of frame 0
    torch.testing.assert_close(after[:, :first], before[:, :first], atol=ATOL, rtol=0)
    assert not torch.allclose(after[:, first], before[:, first], atol=1e-3)


def test_kv_cache_with_a_video_grid_equals_full_forward_and_feeds_in_order(make_lm):
    model = make_lm(video_grid=(2, 2))
    vocab = Vocabulary(model.config.vocab)
    ids = torch.stack(
        [vocab.layout([1, 2, 3], torch.randint(0, 64, (3, 2, 2)), eov=False).token_ids] * 2
    )  # (2, 17)
    with torch.no_grad():
        full = model(ids)
        cache = new_cache(model, 2, 32)
        steps = [model(ids[:, :6], cache=cache, input_pos=torch.arange(6))]  # prompt + 1 cell
        steps.append(model(ids[:, 6:9], cache=cache, input_pos=torch.arange(6, 9)))
        for i in range(9, 17):
            steps.append(model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i])))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
        assert cache.video_seen.tolist() == [12, 12]
        with pytest.raises(ValueError, match="continue at slot 17"):
            model(ids[:, :1], cache=cache, input_pos=torch.tensor([20]))
        cache.reset()
        again = model(ids[:, :9], cache=cache, input_pos=torch.arange(9))
    torch.testing.assert_close(again, full[:, :9], atol=ATOL, rtol=0)


def test_video_grid_is_validated_and_saved(make_lm, tmp_path):
    with pytest.raises(ValueError, match="video_grid"):
        VideoLMConfig(video_grid=(0, 4))
    model = make_lm(video_grid=[2, 3])
    assert model.config.video_grid == (2, 3)
    model.save_pretrained(tmp_path)
    loaded = VideoLM.from_pretrained(tmp_path)
    assert loaded.config.video_grid == (2, 3)
    ids = random_ids(model, 1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_video_context_is_the_predicted_cells_neighbourhood(make_lm):
    """Position p's context is the cells around the video token at p + 1, in the two latent
    frames before it and in the row above it, checked against coordinates worked out here."""
    h, w = 2, 3
    model = make_lm(video_grid=(h, w), video_context_dim=4)
    vocab = Vocabulary(model.config.vocab)
    video = torch.randint(0, 64, (3, h, w))
    ids = vocab.layout([5, 6, 7], video).token_ids[None]  # BOS, 3 text, BOV, 18 cells, EOV, EOS
    index, active = model.video_context_index(ids, torch.arange(ids.shape[1]))
    start = 5
    assert active[0].tolist() == [p + 1 >= start for p in range(ids.shape[1])]
    none = model.config.vocab.video_vocab_size
    for p in range(start - 1, start + 3 * h * w - 1):  # every position that predicts a cell
        t, r, c = (
            divmod(p + 1 - start, h * w)[0],
            (p + 1 - start) % (h * w) // w,
            (p + 1 - start) % w,
        )
        expected = []
        for dt, dr, dc in CONTEXT_OFFSETS:
            tt, rr, cc = t - dt, r + dr, c + dc
            inside = tt >= 0 and 0 <= rr < h and 0 <= cc < w
            expected.append(int(video[tt, rr, cc]) if inside else none)
        assert index[0, p].tolist() == expected, f"position {p}"
    assert (index[0, : start - 1] == none).all()


def test_video_context_keeps_causality_and_reaches_the_cell_one_frame_later(make_lm):
    model = make_lm(video_grid=(2, 2), video_context_dim=4)
    vocab = Vocabulary(model.config.vocab)
    ids = vocab.layout([1, 2], torch.randint(0, 64, (3, 2, 2)), eov=False).token_ids[None]
    changed = ids.clone()
    q = 4 + 1  # cell 1 of frame 0 (BOS, 2 text, BOV, cell 0, cell 1)
    changed[0, q] = vocab.text_vocab_size + (int(ids[0, q]) - vocab.text_vocab_size + 1) % 64
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :q], before[:, :q], atol=ATOL, rtol=0)
    # Cell (frame 0, row 0, column 1) is in the context of the row below it in frame 0
    # (ranks 2, 3) and of every cell of frames 1 and 2 (ranks 4-11: a 2×2 frame is within
    # one cell of it); rank k is predicted at position 3 + k.
    index_before = model.video_context_index(ids, torch.arange(ids.shape[1]))[0]
    index_after = model.video_context_index(changed, torch.arange(ids.shape[1]))[0]
    differs = (index_before != index_after).any(dim=-1)[0]  # (L,)
    assert differs.nonzero().flatten().tolist() == [3 + k for k in range(2, 12)]


def test_kv_cache_with_video_context_equals_full_forward_padded_and_chunked(make_lm):
    model = make_lm(video_grid=(2, 2), video_context_dim=4)
    vocab = Vocabulary(model.config.vocab)
    long = vocab.layout([1, 2, 3], torch.randint(0, 64, (3, 2, 2)), eov=False).token_ids
    short = vocab.layout([4], torch.randint(0, 64, (3, 2, 2)), eov=False).token_ids
    pad = torch.full((len(long) - len(short),), vocab.pad)
    ids = torch.stack([long, torch.cat([pad, short])])  # (2, 17), the second row left-padded
    mask = ids != vocab.pad
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        for row in range(2):  # each row's real tokens alone give the same logits
            alone = model(ids[row : row + 1, mask[row]])
            torch.testing.assert_close(full[row, mask[row]], alone[0], atol=ATOL, rtol=0)
        cache = new_cache(model, 2, 32)
        steps = [
            model(ids[:, :6], cache=cache, input_pos=torch.arange(6), attention_mask=mask[:, :6])
        ]
        steps.append(model(ids[:, 6:9], cache=cache, input_pos=torch.arange(6, 9)))
        for i in range(9, 17):
            steps.append(model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i])))
        torch.testing.assert_close(torch.cat(steps, dim=1)[mask], full[mask], atol=ATOL, rtol=0)
        cache.reset()
        again = model(
            ids[:, :9], cache=cache, input_pos=torch.arange(9), attention_mask=mask[:, :9]
        )
    torch.testing.assert_close(again[mask[:, :9]], full[:, :9][mask[:, :9]], atol=ATOL, rtol=0)


def test_video_context_is_validated(make_lm):
    with pytest.raises(ValueError, match="video_context_dim"):
        VideoLMConfig(video_context_dim=8)
    with pytest.raises(ValueError, match="video_context_dim"):
        VideoLMConfig(video_grid=(2, 2), video_context_dim=-1)


def test_video_context_through_split_prompts_and_rejected_drafts_equals_full_forward(make_lm):
    """Rows whose BOV sits at different slots, a first cached call that ends before one row's
    BOV, and draft ids written, forgotten (truncate) and written again: the cached logits are
    the full forward's."""
    model = make_lm(video_grid=(2, 2), video_context_dim=4)
    vocab = Vocabulary(model.config.vocab)
    long = vocab.layout([1, 2, 3, 4, 5, 6], torch.randint(0, 64, (3, 2, 2)), eov=False).token_ids
    short = vocab.layout([7], torch.randint(0, 64, (4, 2, 2)), eov=False).token_ids
    length = len(long)  # 20; the short row (19) is left-padded by one
    pad = torch.full((length - len(short),), vocab.pad)
    ids = torch.stack([long, torch.cat([pad, short])])
    mask = ids != vocab.pad
    assert [int((row == vocab.bov).nonzero()) for row in ids] == [7, 3]
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = new_cache(model, 2, 32)
        steps = [
            model(ids[:, :5], cache=cache, input_pos=torch.arange(5), attention_mask=mask[:, :5])
        ]
        steps.append(model(ids[:, 5:10], cache=cache, input_pos=torch.arange(5, 10)))  # row 0's BOV
        wrong = (ids[:, 10:13] - vocab.text_vocab_size + 1) % 64 + vocab.text_vocab_size
        model(wrong, cache=cache, input_pos=torch.arange(10, 13))  # drafts, all rejected
        cache.truncate(10)
        for i in range(10, length):
            steps.append(model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i])))
    # float32 rounding of masked attention over 32 slots against 20 stays near 1e-5; a wrong
    # neighbour moves the logits of its position by 1 or more (the weights have std 0.3)
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask], full[mask], atol=5e-5, rtol=0)


def test_video_context_reports_a_full_cache_clearly(make_lm):
    model = make_lm(video_grid=(2, 2), video_context_dim=4)
    cache = new_cache(model, 1, 4)
    with pytest.raises(ValueError, match="does not fit a KV cache of 4 slots"):
        model(random_ids(model, 1, 6), cache=cache, input_pos=torch.arange(6))


@pytest.mark.parametrize("tied", [False, True])
def test_video_code_bits_fold_into_an_ordinary_model(make_lm, tmp_path, tied):
    """The bit terms are a reparametrisation: the folded model (and its export) computes the
    same logits with plain tables, and its config no longer asks for them."""
    model = make_lm(video_grid=(2, 2), video_context_dim=4, video_code_bits=6, tie_embeddings=tied)
    vocab = Vocabulary(model.config.vocab)
    ids = vocab.layout([1, 2, 3], torch.randint(0, 64, (3, 2, 2)), eov=False).token_ids[None]
    plain = model.folded()
    assert plain.config.video_code_bits == 0 and plain.code_embedding is None
    assert not any(name.startswith("code_") for name in plain.state_dict())
    model.save_pretrained(tmp_path)
    loaded = VideoLM.from_pretrained(tmp_path)
    assert loaded.config == plain.config
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(plain(ids), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(loaded(ids), want, atol=ATOL, rtol=0)
        # without the bit terms the logits differ: the fold carries them, not a no-op
        stripped = make_lm(video_grid=(2, 2), video_context_dim=4, tie_embeddings=tied)
        stripped.load_state_dict(
            {k: v for k, v in model.state_dict().items() if not k.startswith("code_")}
        )
        assert (stripped(ids) - want).abs().max() > 0.1


@pytest.mark.parametrize("bits", [0, 6])
def test_video_code_bits_teach_ids_never_seen(make_lm, bits):
    """Training on a few video ids moves the rows of ids one bit away from them only when the
    bit terms are on: the shared term is what an unseen id learns through."""
    model = make_lm(seed=2, video_code_bits=bits).train()
    vocab = model.config.vocab
    lo = vocab.text_vocab_size
    seen = torch.tensor([0b000000, 0b000011, 0b001100, 0b110000]) + lo
    unseen = torch.tensor([0b000001, 0b000100, 0b100000]) + lo  # one bit from a seen id
    g = torch.Generator().manual_seed(0)
    ids = seen[torch.randint(0, len(seen), (4, 16), generator=g)]
    before = model.folded().tok_embeddings.weight[unseen].detach().clone()
    train_steps(model, ids, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    moved = (model.folded().tok_embeddings.weight[unseen] - before).abs().amax(dim=1)  # (3,)
    if bits:
        assert (moved > 1e-3).all()
    else:
        assert (moved == 0).all()


def test_video_code_bits_are_validated():
    with pytest.raises(ValueError, match="video_code_bits"):
        VideoLMConfig(vocab=VocabConfig(video_vocab_size=1000), video_code_bits=10)
    with pytest.raises(ValueError, match="video_code_bits"):
        VideoLMConfig(video_code_bits=-1)
    assert VideoLMConfig(vocab=VocabConfig(video_vocab_size=4096), video_code_bits=12)


def test_a_bfloat16_model_attends_over_a_float32_cache_on_a_cpu(make_lm):
    """On a CPU the sampling cache holds keys and values in float32 for a lower-precision
    model, and the attention over it runs in float32; the logits stay the model's own."""
    model = make_lm()
    model.init_weights()  # the training init's sizes: a tame network for bfloat16
    model = model.to(torch.bfloat16)
    vocab = Vocabulary(model.config.vocab)
    ids = random_ids(model, 2, 20)
    with torch.no_grad():
        full = model(ids).float()  # (B, L, V), attention in bfloat16
        cache, _ = prefill(model, ids[:, :12], 8, vocab=vocab)
        steps = [
            model(ids[:, i : i + 1], cache=cache, input_pos=torch.tensor([i])).float()
            for i in range(12, 20)
        ]
    assert cache.k.dtype == cache.v.dtype == torch.float32
    decoded = torch.cat(steps, dim=1)  # (B, 8, V)
    assert steps[0].shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(decoded, full[:, 12:], atol=0.02 * float(full.abs().max()), rtol=0)
