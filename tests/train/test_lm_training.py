"""The LM's training loop: stage schedule, loss re-weighting, learning, exact resume, export."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks

import loong.train.lm as lm_training
import loong.train.runtime as runtime
from loong.config import apply_overrides, config_json
from loong.data.shards import TokenizeConfig, tokenize_dataset
from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.vocab import VocabConfig, Vocabulary
from loong.text_tokenizer import TextTokenizer
from loong.train import budget
from loong.train.lm import evaluate_lm, open_data, train_lm, write_generation_file
from loong.train.lm_batches import (
    add_frame_losses,
    draw_plan,
    frame_backgrounds,
    frame_means,
    loss_targets,
    make_eval_batches,
    noisy_inputs,
    target_positions,
    weighted_loss,
)
from loong.train.lm_config import (
    LMDataConfig,
    LMTrainConfig,
    LossWeightConfig,
    StageConfig,
    lm_train_preset,
    stage_at,
)
from loong.train.optim import OptimConfig
from loong.train.parallel import cpu_can_compile
from loong.video_tokenizer.model import VideoTokenizer


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, small_tokenizer_config) -> Path:
    """24 shapes-world items at 9 frames (t = 3) and stills (t = 1), tokenized by a tiny random
    video tokenizer (64 codes, 8 × 8 latent grid), plus a 300-id BPE text tokenizer."""
    torch.manual_seed(0)
    config = small_tokenizer_config()
    root = tmp_path_factory.mktemp("lm_data")
    VideoTokenizer(config).save_pretrained(root / "video_tokenizer")
    cfg = TokenizeConfig(
        video_tokenizer=str(root / "video_tokenizer"),
        n_clips=24,
        n_frames=9,
        still_share=0.3,
        shard_size=12,
        text_vocab_size=300,
    )
    return tokenize_dataset(cfg, root / "shards", progress=False)


@pytest.fixture
def train_config(shards_dir) -> LMTrainConfig:
    """A 30k-parameter LM, three stages of 3 steps: image; + 2-frame crops; + full 3-frame clips."""
    return LMTrainConfig(
        model=VideoLMConfig(
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=256,
            vocab=VocabConfig(text_vocab_size=300, video_vocab_size=64, n_special=10),
        ),
        data=LMDataConfig(shards=(str(shards_dir),), max_text_tokens=32),
        stages=(
            StageConfig(name="image", steps=3, lengths=(1,)),
            StageConfig(name="short", steps=3, lengths=(1, 2), weights=(1, 2)),
            StageConfig(name="long", steps=3, lengths=(1, 2, 3)),
        ),
        loss=LossWeightConfig(first_frame=2.0, short_clip=1.0, rest=0.5, short_frames=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        batch_size=4,
        grad_accum=2,
        device="cpu",
        log_every=1,
        eval_every=1000,
        eval_items=8,
        checkpoint_every=4,
        tensorboard=False,
    )


def _records(run: Path) -> dict[int, dict]:
    """metrics.jsonl by step, without the wall-clock ``elapsed_s`` that no two runs share."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [_without_time(r) for r in map(json.loads, lines)]
    return {r["step"]: r for r in records}


def _without_time(record: dict) -> dict:
    assert record.pop("elapsed_s") >= 0
    return record


# --- schedule and sampler --------------------------------------------------------------------


def test_the_stage_at_each_step_follows_the_config():
    stages = (
        StageConfig(name="a", steps=3, lengths=(1,)),
        StageConfig(name="b", steps=2, lengths=(1, 5)),
        StageConfig(name="c", steps=4, lengths=(1, 5, 17)),
    )
    assert [stage_at(stages, s) for s in range(11)] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]


def test_each_stage_draws_only_its_lengths_with_its_weights(train_config):
    cfg = apply_overrides(
        train_config,
        {
            "stages": [
                {"name": "a", "steps": 1, "lengths": [1]},
                {"name": "b", "steps": 1, "lengths": [1, 2], "weights": [0, 1]},
                {"name": "c", "steps": 1, "lengths": [1, 2, 3], "weights": [1, 1, 2]},
            ]
        },
    )
    sizes = {1: 7, 2: 17, 3: 17}
    drawn = {stage.name: [] for stage in cfg.stages}
    for stage in cfg.stages:
        for step in range(300):
            plan = draw_plan(stage, sizes, cfg, step, 0)
            drawn[stage.name].append(plan.length)
            assert all(0 <= i < sizes[plan.length] for i in plan.items)
    assert set(drawn["a"]) == {1} and set(drawn["b"]) == {2}
    counts = [drawn["c"].count(t) for t in (1, 2, 3)]
    assert set(drawn["c"]) == {1, 2, 3} and counts[2] > max(counts[:2])  # weight 2 vs 1
    # A pure function of (seed, step, micro-batch): resuming redraws the same batches.
    stage = cfg.stages[2]
    assert draw_plan(stage, sizes, cfg, 5, 1) == draw_plan(stage, sizes, cfg, 5, 1)
    assert draw_plan(stage, sizes, cfg, 5, 1) != draw_plan(stage, sizes, cfg, 6, 1)


# --- loss ------------------------------------------------------------------------------------


def _hand_batch():
    """Two samples (text of 2 and 1 ids, 3 latent frames of 1 × 2) and random logits."""
    vocab = Vocabulary(VocabConfig(text_vocab_size=5, video_vocab_size=8, n_special=5))
    g = torch.Generator().manual_seed(0)
    layouts = [
        vocab.layout([1, 2], torch.randint(8, (3, 1, 2), generator=g)),
        vocab.layout([4], torch.randint(8, (3, 1, 2), generator=g)),
    ]
    batch = vocab.collate(layouts)
    logits = torch.randn(*batch.token_ids.shape, vocab.vocab_size, generator=g)
    return vocab, batch, logits


def _hand_losses(vocab, batch, logits):
    """Per target: (ce, frame) by hand, walking the sequences; EOV belongs to the last frame."""
    out = []
    logp = logits.log_softmax(-1)
    for b in range(batch.token_ids.shape[0]):
        ids = batch.token_ids[b].tolist()
        frames = batch.frame_index[b].tolist()
        for i in range(1, len(ids)):
            if not batch.attention_mask[b, i]:
                continue
            if vocab.video_offset <= ids[i] < vocab.special_offset:
                out.append((-logp[b, i - 1, ids[i]].item(), frames[i]))
            elif ids[i] == vocab.eov:
                out.append((-logp[b, i - 1, ids[i]].item(), frames[i - 1]))
    return out


def test_first_frame_weight_two_counts_first_frame_tokens_double():
    vocab, batch, logits = _hand_batch()
    cfg = LossWeightConfig(first_frame=2.0, short_clip=1.0, rest=1.0, short_frames=2)
    loss, ce, frames, is_eov = weighted_loss(logits, batch, vocab, cfg)
    hand = _hand_losses(vocab, batch, logits)
    assert len(hand) == len(ce) == 2 * (3 * 2 + 1)  # 6 video tokens + EOV per sample
    weights = [2.0 if f == 0 else 1.0 for _, f in hand]
    want = sum(w * c for w, (c, _) in zip(weights, hand, strict=True)) / sum(weights)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert sorted(frames.tolist()) == sorted(f for _, f in hand)
    assert int(is_eov.sum()) == 2 and set(frames[is_eov].tolist()) == {2}

    groups = LossWeightConfig(first_frame=3.0, short_clip=2.0, rest=0.5, short_frames=2)
    w3 = {0: 3.0, 1: 2.0, 2: 0.5}
    want = sum(w3[f] * c for c, f in hand) / sum(w3[f] for _, f in hand)
    assert weighted_loss(logits, batch, vocab, groups)[0].item() == pytest.approx(want, rel=1e-6)


def test_equal_weights_give_the_plain_mean_cross_entropy_at_any_scale():
    vocab, batch, logits = _hand_batch()
    mask, _, _ = loss_targets(batch, vocab)
    plain = F.cross_entropy(logits[:, :-1][mask], batch.token_ids[:, 1:][mask])
    for w in (1.0, 7.0):
        cfg = LossWeightConfig(first_frame=w, short_clip=w, rest=w)
        assert weighted_loss(logits, batch, vocab, cfg)[0].item() == pytest.approx(plain.item())


def test_the_targets_rows_and_the_fused_loss_give_the_full_logits_loss():
    vocab, batch, logits = _hand_batch()
    cfg = LossWeightConfig(first_frame=2.0, rest=0.5, short_frames=2)
    logits.requires_grad_(True)
    loss, ce, frames, is_eov = weighted_loss(logits, batch, vocab, cfg)
    (want_grad,) = torch.autograd.grad(loss, logits)
    fused = [False, True] if cpu_can_compile() else [False]
    for f in fused:
        rows = logits[target_positions(batch, vocab)]  # (N, V), as the model's output_mask gives
        got = weighted_loss(rows, batch, vocab, cfg, fused=f)
        torch.testing.assert_close(got[0], loss, atol=1e-6, rtol=1e-6)
        for a, b in zip(got[1:], (ce, frames, is_eov), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        (grad,) = torch.autograd.grad(got[0], logits)
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="target_positions"):
        weighted_loss(rows[1:], batch, vocab, cfg)


def test_per_frame_losses_are_unweighted_means_keyed_by_frame():
    vocab, batch, logits = _hand_batch()
    cfg = LossWeightConfig(first_frame=5.0)
    _, ce, frames, is_eov = weighted_loss(logits, batch, vocab, cfg)
    window: dict[str, list[float]] = {}
    add_frame_losses(window, ce, frames, is_eov)
    means = frame_means(window)
    assert list(means) == ["loss_frame_0", "loss_frame_1", "loss_frame_2"]
    hand = [(c, f) for c, f in _hand_losses(vocab, batch, logits)]
    video = [(c, f) for (c, f), eov in zip(hand, is_eov.tolist(), strict=True) if not eov]
    for k in range(3):
        values = [c for c, f in video if f == k]
        assert len(values) == 4 and means[f"loss_frame_{k}"] == pytest.approx(
            sum(values) / 4, rel=1e-6
        )


# --- the loop --------------------------------------------------------------------------------


def test_short_run_across_three_stages_lowers_the_loss(tmp_path, train_config):
    cfg = apply_overrides(
        train_config,
        {
            "stages": [
                {"name": "image", "steps": 10, "lengths": [1]},
                {"name": "short", "steps": 10, "lengths": [1, 2], "weights": [1, 2]},
                {"name": "long", "steps": 10, "lengths": [1, 2, 3]},
            ],
            "checkpoint_every": 1000,
            "log_every": 5,
        },
    )
    shards, text, vocab = open_data(cfg)
    batches = make_eval_batches(cfg, shards, text, vocab)
    torch.manual_seed(cfg.seed)
    before = evaluate_lm(VideoLM(cfg.model), batches, vocab, torch.device("cpu"))
    export = train_lm(cfg, tmp_path / "run", progress=False)
    after = evaluate_lm(VideoLM.from_pretrained(export), batches, vocab, torch.device("cpu"))
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    for k in range(3):
        assert after[f"loss_frame_{k}"] < before[f"loss_frame_{k}"]
    records = _records(tmp_path / "run")
    assert [records[s]["stage"] for s in (5, 10, 15, 20, 25, 30)] == ["image"] * 2 + [
        "short"
    ] * 2 + ["long"] * 2
    assert records[30]["eval_loss"] == pytest.approx(after["loss"], rel=1e-5)
    # Per-frame keys: only frame 0 while training on images; later frames once clips come in.
    assert [k for k in records[5] if k.startswith("loss_frame")] == ["loss_frame_0"]
    assert {"loss_frame_0", "loss_frame_1", "loss_frame_2"} <= set(records[30])


def test_the_lowest_loss_weights_are_exported_beside_the_last(tmp_path, train_config):
    cfg = apply_overrides(train_config, {"eval_every": 3})
    train_lm(cfg, tmp_path / "run", progress=False)
    records = _records(tmp_path / "run")
    losses = {s: r["eval_loss"] for s, r in records.items() if "eval_loss" in r}
    assert sorted(losses) == [3, 6, 9]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == min(losses, key=losses.get) and best["loss"] == min(losses.values())
    assert not best["held_out"]  # the shapes shards here have no eval/ directory
    shards, text, vocab = open_data(cfg)
    batches = make_eval_batches(cfg, shards, text, vocab)
    model = VideoLM.from_pretrained(tmp_path / "run" / "best")
    again = evaluate_lm(model, batches, vocab, torch.device("cpu"))["loss"]
    assert again == pytest.approx(best["loss"], rel=1e-5)
    export = {p.name for p in (tmp_path / "run" / "export").iterdir()}
    assert {p.name for p in (tmp_path / "run" / "best").iterdir()} == export | {"best.json"}


@pytest.mark.parametrize("noise", [0.0, 0.2], ids=["clean", "context-noise-erase-and-spill"])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    tmp_path, train_config, crash_after_checkpoint, noise
):
    overrides = {
        "data.context_noise": noise,
        "data.context_erase": 1.5 * noise,
        "data.context_spill": 1.5 * noise,
        "model.video_grid": (8, 8),  # the shards' latent grid
    }
    train_config = apply_overrides(train_config, overrides)
    straight = train_lm(train_config, tmp_path / "straight", progress=False)

    with crash_after_checkpoint(runtime, step=4):
        train_lm(train_config, tmp_path / "resumed", progress=False)
    resumed = train_lm(train_config, tmp_path / "resumed", progress=False)

    want, got = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert set(want) == set(got) == set(range(1, 10))
    for step in range(5, 10):
        assert got[step].keys() == want[step].keys()
        for key, value in want[step].items():
            if isinstance(value, float):
                assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
            else:
                assert got[step][key] == value, (step, key)
    a, b = VideoLM.from_pretrained(straight), VideoLM.from_pretrained(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


def test_context_noise_swaps_video_ids_within_their_row_only():
    vocab = Vocabulary(VocabConfig(text_vocab_size=40, video_vocab_size=64, n_special=10))
    first = vocab.layout([1, 2, 3], torch.arange(128).view(8, 4, 4) % 32)  # 8 latent frames
    second = vocab.layout([4], torch.arange(64).view(4, 4, 4) % 32 + 32)  # other ids, 4 frames
    batch = vocab.collate([first, second])
    clean = batch.token_ids.clone()
    noisy = noisy_inputs(batch, vocab, 0.5, (0, 3, 1))
    assert torch.equal(batch.token_ids, clean)  # the targets stay the clip's
    assert torch.equal(noisy, noisy_inputs(batch, vocab, 0.5, (0, 3, 1)))  # seeded
    assert not torch.equal(noisy, noisy_inputs(batch, vocab, 0.5, (0, 4, 1)))
    video = vocab.is_video(clean)
    assert torch.equal(noisy[~video], clean[~video])  # text, specials, padding untouched
    changed = (noisy != clean) & video
    # half are drawn, 1/32 of those draw their own id: 0.48 of 192, ± 0.04 (one sd)
    assert 0.33 < changed.sum() / video.sum() < 0.63
    for b in range(2):
        assert set(noisy[b, video[b]].tolist()) <= set(clean[b, video[b]].tolist())
    assert torch.equal(noisy_inputs(batch, vocab, 0.0, (0, 3, 1)), clean)


def test_context_erase_wipes_object_cells_to_their_frames_background():
    vocab = Vocabulary(VocabConfig(text_vocab_size=40, video_vocab_size=64, n_special=10))
    clips = torch.full((2, 4, 4, 4), 7)  # (clip, t, h, w): background 7, then 9 in frame 1
    clips[1, 1] = 9
    clips[:, :, 1:3, 1:3] = torch.arange(4 * 2 * 2).view(4, 2, 2) + 20  # a 2×2 object a frame
    batch = vocab.collate([vocab.layout([1, 2], clips[0]), vocab.layout([3], clips[1])])
    clean = batch.token_ids.clone()
    noisy = noisy_inputs(batch, vocab, 0.0, (0, 3, 1), erase=0.5)
    assert torch.equal(batch.token_ids, clean)  # the targets stay the clip's
    assert torch.equal(noisy, noisy_inputs(batch, vocab, 0.0, (0, 3, 1), erase=0.5))  # seeded
    video = vocab.is_video(clean)
    assert torch.equal(noisy[~video], clean[~video])
    frames = batch.frame_index
    background = vocab.video_to_ids(torch.tensor(7))
    changed = noisy != clean
    # only object cells change, each to its own frame's background (9 in clip 1's frame 1)
    obj = video & (clean >= vocab.video_to_ids(torch.tensor(20)))
    assert not (changed & ~obj).any()
    want = torch.where((torch.arange(2)[:, None] == 1) & (frames == 1), background + 2, background)
    assert torch.equal(noisy[changed], want[changed])
    assert 0.25 < changed.sum() / obj.sum() < 0.75  # half of 32 object cells, ± 0.09 (one sd)
    assert torch.equal(noisy_inputs(batch, vocab, 0.0, (0, 3, 1), erase=1.0)[obj], want[obj])
    # a tie goes to the smaller id: a one-frame clip of two 5s and two 3s
    tie = vocab.collate([vocab.layout([1], torch.tensor([[[5, 3], [3, 5]]]))])
    ids = frame_backgrounds(tie.token_ids, tie.frame_index, vocab)
    assert ids[vocab.is_video(ids)].tolist() == [vocab.video_offset + 3] * 4


def test_context_spill_grows_objects_into_neighbouring_background_cells():
    vocab = Vocabulary(VocabConfig(text_vocab_size=40, video_vocab_size=64, n_special=10))
    clips = torch.full((2, 3, 4, 4), 7)  # (clip, t, h, w): background 7
    clips[:, :, 1:3, 1:3] = torch.arange(3 * 2 * 2).view(3, 2, 2) + 20  # a 2×2 object a frame
    clips[1, 2] = 7  # clip 1's last frame is empty: nothing to spill there
    clips[1, 2, 0, 3] = 30  # … but for one object cell in a corner
    batch = vocab.collate([vocab.layout([1, 2], clips[0]), vocab.layout([3], clips[1])])
    clean = batch.token_ids.clone()
    noisy = noisy_inputs(batch, vocab, 0.0, (0, 3, 1), spill=1.0, grid=(4, 4))
    assert torch.equal(batch.token_ids, clean)  # the targets stay the clip's
    assert torch.equal(noisy, noisy_inputs(batch, vocab, 0.0, (0, 3, 1), spill=1.0, grid=(4, 4)))
    video = vocab.is_video(clean)
    assert torch.equal(noisy[~video], clean[~video])
    for b in range(2):
        before = (clean[b, video[b]] - vocab.video_offset).view(3, 4, 4)
        after = (noisy[b, video[b]] - vocab.video_offset).view(3, 4, 4)
        for t in range(3):
            obj = before[t] != 7
            ring = torch.zeros(4, 4, dtype=torch.bool)  # background cells touching the object
            ring[1:] |= obj[:-1]
            ring[:-1] |= obj[1:]
            ring[:, 1:] |= obj[:, :-1]
            ring[:, :-1] |= obj[:, 1:]
            ring &= ~obj
            assert torch.equal(after[t] != before[t], ring)  # spill 1: every such cell, no other
            for i, j in ring.nonzero().tolist():  # each took a 4-neighbour's object id
                near = {(i + di, j + dj) for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))}
                ok = {before[t, a, c].item() for a, c in near if 0 <= a < 4 and 0 <= c < 4}
                assert after[t, i, j].item() in ok - {7}
    assert noisy[1, video[1]].view(3, 4, 4)[2].ne(vocab.video_to_ids(torch.tensor(7))).sum() == 3
    # a share: about half of the ring cells move at spill 0.5; erase and spill never overlap
    half = noisy_inputs(batch, vocab, 0.0, (0, 3, 1), spill=0.5, grid=(4, 4))
    assert 0.2 < ((half != clean).sum() / (noisy != clean).sum()).item() < 0.8
    both = noisy_inputs(batch, vocab, 0.0, (0, 3, 1), erase=1.0, spill=1.0, grid=(4, 4))
    erased = noisy_inputs(batch, vocab, 0.0, (0, 3, 1), erase=1.0)
    obj = video & (frame_backgrounds(clean, batch.frame_index, vocab) != clean)
    assert torch.equal(both[obj], erased[obj]) and torch.equal(both[~obj], noisy[~obj])
    with pytest.raises(ValueError, match="grid"):
        noisy_inputs(batch, vocab, 0.0, (0, 3, 1), spill=0.5)
    # a cell between two object cells takes either one's id, about as often
    corner = torch.full((1, 3, 3), 7)
    corner[0, 0, 1], corner[0, 1, 0] = 20, 21
    one = vocab.collate([vocab.layout([1], corner)])
    first_video = int(vocab.is_video(one.token_ids).long().argmax())
    picks = [
        int(noisy_inputs(one, vocab, 0.0, (0, s, 0), spill=1.0, grid=(3, 3))[0, first_video])
        - vocab.video_offset
        for s in range(40)
    ]
    assert set(picks) == {20, 21} and 8 <= picks.count(20) <= 32  # binomial(40, ½): ± 3.2


def test_context_spill_needs_the_video_grid():
    with pytest.raises(ValueError, match="video_grid"):
        LMTrainConfig(model=VideoLMConfig(video_grid=None), data=LMDataConfig(context_spill=0.1))


# --- several processes ----------------------------------------------------------------------


class _Stop(Exception):
    """Raised by every rank right after a checkpoint, as if the job had been stopped."""


def _stop_then_resume_worker(cfg: LMTrainConfig, run: Path, stop_step: int) -> None:
    real_save = lm_training.save_state

    def save_then_stop(*args, step: int, **kwargs) -> None:
        real_save(*args, step=step, **kwargs)
        if step == stop_step:
            raise _Stop

    lm_training.save_state = save_then_stop  # in this forked process only
    with pytest.raises(_Stop):
        train_lm(cfg, run, progress=False)
    lm_training.save_state = real_save
    train_lm(cfg, run, progress=False)


def _rank_dependent_best_worker(cfg: LMTrainConfig, run: Path) -> None:
    import torch.distributed as dist

    from loong.train.checkpoint import BestExport

    calls = []

    def improves(self, scores) -> bool:  # rank 0: every other evaluation; the rest: each one
        calls.append(scores)
        return len(calls) % 2 == 1 if dist.get_rank() == 0 else True

    BestExport.improves = improves  # in this forked process only
    train_lm(cfg, run, progress=False)


def test_every_rank_follows_rank_0_on_writing_the_best_export(tmp_path, train_config):
    """The best/ export gathers the weights and meets at a barrier, so every rank writes it or
    none does: rank 0 decides, even where another rank's own comparison says otherwise."""
    cfg = apply_overrides(train_config, {"eval_every": 1, "parallel.mode": "ddp"})
    run_ranks(_rank_dependent_best_worker, cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 9
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_with_the_same_global_batch_and_resume(
    mode, tmp_path, train_config
):
    """Two gloo processes, each on half of every micro-batch (with gradient accumulation and
    clipping), stopped after the step-4 checkpoint and resumed: DDP from the one-file
    checkpoint, FSDP from the sharded one. The losses are those of one uninterrupted process."""
    if mode == "fsdp":
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not in this torch")
    cfg = apply_overrides(train_config, {"eval_every": 5, "optim.grad_clip": 0.5})
    one = train_lm(cfg, tmp_path / "one", progress=False)
    two = apply_overrides(cfg, {"parallel.mode": mode, "parallel.activation_checkpointing": True})
    run_ranks(_stop_then_resume_worker, two, tmp_path / "two", 4)

    want, got = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert set(want) == set(got) == set(range(1, 10))
    assert any(r["grad_norm"] > 0.5 for r in want.values())  # clipping is exercised
    for step in want:
        assert got[step].keys() == want[step].keys()
        for key, value in want[step].items():
            if isinstance(value, float):
                assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
            else:
                assert got[step][key] == value, (step, key)
    a, b = VideoLM.from_pretrained(one), VideoLM.from_pretrained(tmp_path / "two" / "export")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=name)
    sharded = (tmp_path / "two" / "checkpoints" / "step_000000009").is_dir()
    assert sharded == (mode == "fsdp")


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, train_config):
    cfg = apply_overrides(train_config, {"batch_size": 3, "parallel.mode": "ddp"})
    run_ranks(_expect_uneven_batch_error, cfg, tmp_path / "run")


def _expect_uneven_batch_error(cfg: LMTrainConfig, run: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=3 must divide among 2 ranks"):
        train_lm(cfg, run, progress=False)


_TRAIN_IN_A_PROCESS = """
import json, sys
import torch
from loong.config import config_from_dict
from loong.train.lm import train_lm
from loong.train.lm_config import LMTrainConfig
torch.set_num_threads(1)
train_lm(config_from_dict(LMTrainConfig, json.loads(sys.argv[1])), sys.argv[2], progress=False)
"""


def test_a_run_killed_at_a_random_step_resumes_exactly(tmp_path, train_config):
    """SIGKILL a training process at a random step after its first checkpoint (perhaps while it
    writes one); the restarted run's metrics.jsonl is the uninterrupted run's, line for line."""
    stages = [{"name": n, "steps": 10, "lengths": [1, 2]} for n in ("a", "b", "c")]
    cfg = apply_overrides(train_config, {"stages": stages, "checkpoint_every": 3})
    train_lm(cfg, tmp_path / "straight", progress=False)
    kill_at = random.randrange(4, 21)  # steps are written to metrics.jsonl as they end

    run = tmp_path / "killed"
    command = [sys.executable, "-c", _TRAIN_IN_A_PROCESS, config_json(cfg), str(run)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= kill_at:
            break
        time.sleep(0.002)
    process.kill()
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, (kill_at, stderr.decode()[-2000:])
    written = metrics.read_text().count("\n")
    assert kill_at <= written < 30, written
    train_lm(cfg, run, progress=False)

    want = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    got = run.joinpath("metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in got] == list(range(1, 31))
    for a, b in zip(map(json.loads, want), map(json.loads, got), strict=True):
        a, b = _without_time(a), _without_time(b)
        assert a.keys() == b.keys()
        for key, value in a.items():
            expected = (
                pytest.approx(value, rel=1e-6, abs=1e-7) if isinstance(value, float) else value
            )
            assert b[key] == expected, (kill_at, a["step"], key)


def test_torchrun_launches_the_cli_on_two_processes(tmp_path, train_config):
    """``torchrun --nproc-per-node 2 -m loong.cli lm train --parallel ddp``: the same losses as
    one process, and one line of output, from rank 0."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    sets = {
        "model.dim": 32,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.max_seq_len": 256,
        "model.vocab.text_vocab_size": 300,
        "model.vocab.video_vocab_size": 64,
        "data.max_text_tokens": 32,
        "stages": '[{name="image", steps=2, lengths=[1]}, {name="clips", steps=2, lengths=[1, 3]}]',
        "batch_size": 4,
        "device": '"cpu"',
        "tensorboard": "false",
        "eval_items": 4,
        "loss.short_frames": 2,
        "log_every": 1,
    }
    args = ["lm", "train", "--shards", *train_config.data.shards]
    args += [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "loong.cli", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "loong.cli"]
    two = subprocess.run(
        [*launcher, *args, "--parallel", "ddp", "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("language model exported to") == 1
    want, got = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert set(want) == set(got) == {1, 2, 3, 4}
    for step, record in want.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=1e-4), step
    assert json.loads((tmp_path / "two" / "config.json").read_text())["parallel"]["mode"] == "ddp"


def test_the_export_holds_model_text_tokenizer_and_shards_meta(tmp_path, train_config, shards_dir):
    export = train_lm(train_config, tmp_path / "run", progress=False)
    names = sorted(p.name for p in export.iterdir())
    assert names == [
        "config.json",
        "generation.json",
        "model.safetensors",
        "shards_meta.json",
        "tokenizer.json",
        "train_config.json",
    ]
    model = VideoLM.from_pretrained(export)
    assert model.config == train_config.model
    text = TextTokenizer.load(export)
    assert text.encode("a red circle") == TextTokenizer.load(shards_dir).encode("a red circle")
    meta = json.loads((export / "shards_meta.json").read_text())
    assert meta["grid"] == [8, 8] and meta["fps"] == 8.0
    assert Path(meta["video_tokenizer"]["path"]).name == "video_tokenizer"
    VideoTokenizer.from_pretrained(meta["video_tokenizer"]["path"])  # generation can pair them
    generation = json.loads((export / "generation.json").read_text())
    assert generation == {
        "video_tokenizer": meta["video_tokenizer"]["path"],
        "latent_grid": [8, 8],
        "clip_latents": 3,
        "fps": 8.0,
        "frame_size": [64, 64],
    }
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [s["lengths"] for s in run_config["stages"]] == [[1], [1, 2], [1, 2, 3]]
    assert len(list((tmp_path / "run" / "checkpoints").glob("*.pt"))) == 2


def test_config_errors_name_the_fix(tmp_path, train_config):
    too_long = apply_overrides(
        train_config, {"stages": [{"name": "x", "steps": 1, "lengths": [1, 5]}]}
    )
    with pytest.raises(ValueError, match="longest shards hold 3"):
        train_lm(too_long, tmp_path / "a", progress=False)
    small = apply_overrides(train_config, {"model.max_seq_len": 100})
    with pytest.raises(ValueError, match="max_seq_len"):
        train_lm(small, tmp_path / "b", progress=False)
    wrong_vocab = apply_overrides(train_config, {"model.vocab.video_vocab_size": 128})
    with pytest.raises(ValueError, match="64 codes"):
        train_lm(wrong_vocab, tmp_path / "c", progress=False)
    wrong_grid = apply_overrides(train_config, {"model.video_grid": [4, 4]})
    with pytest.raises(ValueError, match=r"model.video_grid = \[8, 8\]"):
        train_lm(wrong_grid, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="weights"):
        StageConfig(name="x", lengths=(1, 2), weights=(1.0,))


def test_presets_resolve_and_serialise():
    for name in ("tiny", "loong-700m"):
        cfg = lm_train_preset(name)
        data = json.loads(config_json(cfg))
        assert data["stages"][0]["lengths"] == [1]
        assert max(max(s.lengths) for s in cfg.stages) == (5 if name == "tiny" else 17)
    tiny = lm_train_preset("tiny")
    assert tiny.model.vocab.video_vocab_size == 4096  # the tiny video tokenizer's 2^12 codes


def test_generation_json_is_what_loong_generate_reads(tmp_path, train_config, shards_dir):
    generate = pytest.importorskip("loong.generate")
    meta = json.loads((shards_dir / "meta.json").read_text())
    write_generation_file(tmp_path, meta, train_config)
    info = generate.GenerationMetadata.read(tmp_path)
    assert info.latent_grid == (8, 8) and info.clip_latents == 3 and info.fps == 8.0
    assert info.video_tokenizer == meta["video_tokenizer"]["path"]


def test_a_budgeted_run_trains_every_stage_scaled_and_calibrates_for_real(
    tmp_path, train_config, monkeypatch
):
    """``budget_minutes``: the last (longest) stage is scaled, not cut off; the calibration
    times every latent length on the run's own shards."""
    real = budget.calibrate_lm(train_config, tmp_path / "scratch")
    assert sorted(real.step) == [1, 2, 3] and min(real.step.values()) > 0
    rows = (tmp_path / "scratch" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 3 * budget.STEPS + 1  # two passes over t = 1, 2, 3, one step more

    # half-minute steps: the hard stop at the budget is minutes away from these 5 real steps
    costs = budget.LMCosts(step={1: 30.0, 2: 30.0, 3: 30.0}, compile=0.0, event=0.0, setup=0.0)
    monkeypatch.setattr(budget, "calibrate_lm", lambda *a: costs)
    minutes = 5.25 * 30 / 60 / budget.AIM  # 5 of the 9 configured steps fit
    cfg = apply_overrides(train_config, {"budget_minutes": minutes})
    train_lm(cfg, tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    stages = [stage["steps"] for stage in config["stages"]]
    assert sum(stages) == 5 and min(stages) >= 1
    assert config["max_minutes"] == pytest.approx(minutes)
    records = _records(tmp_path / "run")
    assert max(records) == 5 and records[5]["stage"] == "long"


def test_a_budgeted_run_whose_steps_beat_the_calibration_is_refitted_to_every_stage_step(
    tmp_path, train_config, monkeypatch
):
    """The re-fit in the LM's loop: calibrated at 30 s a step, the run's steps take a fraction of
    a second, so after its first steps it trains every configured step of every stage."""
    costs = budget.LMCosts(step={1: 30.0, 2: 30.0, 3: 30.0}, compile=0.0, event=0.0, setup=0.0)
    monkeypatch.setattr(budget, "calibrate_lm", lambda *a: costs)
    monkeypatch.setattr(budget, "REFIT_SHARE", 0.2)  # re-fit the 5-step run after 1 + 1 steps
    monkeypatch.setattr(budget, "REFIT_MIN_STEPS", 1)
    monkeypatch.setattr(budget, "REFIT_SKIP", 1)
    minutes = 5.25 * 30 / 60 / budget.AIM  # 5 of the 9 configured steps fit
    train_lm(apply_overrides(train_config, {"budget_minutes": minutes}), tmp_path, progress=False)
    record = json.loads((tmp_path / budget.BUDGET_FILE).read_text())
    assert record["refit"]["step"] == 2 and record["factor"] == 1.0
    assert round(9 * record["calibrated_factor"]) == 5
    config = json.loads((tmp_path / "config.json").read_text())
    assert [stage["steps"] for stage in config["stages"]] == [3, 3, 3]
    records = _records(tmp_path)
    assert max(records) == 9
    assert [records[s]["stage"] for s in (3, 4, 6, 7, 9)] == [
        "image",
        "short",
        "short",
        "long",
        "long",
    ]
