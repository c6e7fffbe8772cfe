"""The tokenizer's training loop: it learns, it resumes exactly, it writes what it promises."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import run_ranks

import loong.train.runtime as runtime
import loong.train.tokenizer as tokenizer_training
import loong.train.tokenizer_data as tokenizer_data
from loong.config import apply_overrides
from loong.train.optim import OptimConfig
from loong.train.parallel import ParallelConfig
from loong.train.tokenizer import evaluate, train_tokenizer
from loong.train.tokenizer_config import (
    TokenizerDataConfig,
    TokenizerLossConfig,
    TokenizerTrainConfig,
)
from loong.train.tokenizer_data import held_out_clips
from loong.video_tokenizer.discriminator import DiscriminatorConfig
from loong.video_tokenizer.model import VideoTokenizer


@pytest.fixture
def train_config(small_tokenizer_config) -> TokenizerTrainConfig:
    """Seconds on a CPU: a ~0.2M-parameter tokenizer on 5-frame 64×64 shapes-world clips."""
    return TokenizerTrainConfig(
        model=small_tokenizer_config(),
        discriminator=DiscriminatorConfig(base_width=4, max_width=8, n_blocks=2),
        data=TokenizerDataConfig(n_frames=5, size=64, batch_size=2),
        loss=TokenizerLossConfig(disc_start_step=2),
        optim=OptimConfig(lr=3e-3, betas=(0.9, 0.99), warmup_steps=2),
        steps=6,
        ema_decay=0.9,
        log_every=1,
        eval_every=1000,
        eval_clips=2,
        preview_every=1000,
        checkpoint_every=3,
    )


def _losses(run: Path) -> dict[int, tuple[float, ...]]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = (r["rec"], r["quant"], r.get("g", 0.0), r.get("d", 0.0))
    return out


def test_short_training_on_the_shapes_world_improves_psnr(tmp_path, train_config):
    cfg = apply_overrides(
        train_config, {"steps": 60, "ema_decay": 0.0, "loss.disc_start_step": 1000}
    )
    clips = held_out_clips(cfg.data, 4)
    torch.manual_seed(cfg.seed)
    before = evaluate(VideoTokenizer(cfg.model), clips)["psnr"]
    export = train_tokenizer(cfg, tmp_path / "run", progress=False)
    after = evaluate(VideoTokenizer.from_pretrained(export), clips)["psnr"]
    assert after > before + 3.0, (before, after)


def test_the_best_evaluated_weights_are_kept_beside_the_last(tmp_path, train_config):
    from loong.train.checkpoint import BestExport

    cfg = apply_overrides(train_config, {"steps": 9, "eval_every": 3, "eval_clips": 2})
    train_tokenizer(cfg, tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    scores = {r["step"]: r["eval_psnr"] for r in map(json.loads, lines) if "eval_psnr" in r}
    assert sorted(scores) == [3, 6, 9]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == max(scores, key=scores.get) and best["psnr"] == max(scores.values())
    assert best["held_out"] and best["evaluated_on"] == "held-out shapes-world clips"
    model = VideoTokenizer.from_pretrained(tmp_path / "run" / "best")
    clips = held_out_clips(cfg.data, cfg.eval_clips)
    assert evaluate(model, clips)["psnr"] == pytest.approx(best["psnr"], abs=1e-4)
    on = best["evaluated_on"]
    again = BestExport(tmp_path / "run" / "best", "psnr", higher=True, evaluated_on=on)  # resumed
    assert not again.improves({"psnr": best["psnr"]}) and again.improves({"psnr": best["psnr"] + 1})
    other = BestExport(tmp_path / "run" / "best", "psnr", higher=True, evaluated_on="other clips")
    assert other.improves({"psnr": best["psnr"] - 10})  # scores on other data: not compared
    off = apply_overrides(cfg, {"export_best": False})
    train_tokenizer(off, tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / "best").exists()


@pytest.mark.parametrize("continuous_steps", [0, 4])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    tmp_path, train_config, crash_after_checkpoint, continuous_steps
):
    # The GAN switches on at step 2 and EMA is on, so every piece of state must come back; with
    # continuous_steps=4 the run also crosses the quantizer's start after the crash.
    cfg = apply_overrides(train_config, {"continuous_steps": continuous_steps})
    straight = train_tokenizer(cfg, tmp_path / "straight", progress=False)

    with crash_after_checkpoint(runtime, step=3):
        train_tokenizer(cfg, tmp_path / "resumed", progress=False)
    resumed = train_tokenizer(cfg, tmp_path / "resumed", progress=False)

    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert want.keys() == got.keys() == set(range(1, 7))
    for step in range(4, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    a = VideoTokenizer.from_pretrained(straight).state_dict()
    b = VideoTokenizer.from_pretrained(resumed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


class _Stop(Exception):
    """Raised by every rank right after a checkpoint, as if the job had been stopped."""


def _stop_then_resume_worker(cfg: TokenizerTrainConfig, run: Path, stop_step: int) -> None:
    real_save = tokenizer_training.save_state

    def save_then_stop(*args, step: int, **kwargs) -> None:
        real_save(*args, step=step, **kwargs)
        if step == stop_step:
            raise _Stop

    tokenizer_training.save_state = save_then_stop  # in this forked process only
    with pytest.raises(_Stop):
        train_tokenizer(cfg, run, progress=False)
    tokenizer_training.save_state = real_save
    train_tokenizer(cfg, run, progress=False)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_with_the_same_global_batch_and_resume(
    mode, tmp_path, train_config
):
    """Two gloo processes with one clip each of every batch of two, GAN and EMA on, stopped after
    the step-3 checkpoint and resumed: the losses (LFQ's batch entropy, the adaptive GAN weight
    and LeCam's running means taken over both ranks) are those of one uninterrupted process."""
    if mode == "fsdp":
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not in this torch")
    # FSDP shards the weight the adaptive GAN weight differentiates at: a fixed weight there.
    # At the default entropy temperature (0.01) the entropy term amplifies rounding differences
    # (a sum over two ranks is not added in one order) past any tolerance within a few steps.
    overrides = {
        "loss.adaptive_gan_weight": mode == "ddp",
        "model.quantizer.entropy_temperature": 0.5,
    }
    cfg = apply_overrides(train_config, overrides)
    one = train_tokenizer(cfg, tmp_path / "one", progress=False)
    two = apply_overrides(cfg, {"parallel.mode": mode})
    run_ranks(_stop_then_resume_worker, two, tmp_path / "two", 3)

    want, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert want.keys() == got.keys() == set(range(1, 7))
    assert all(want[step][2] != 0.0 and want[step][3] != 0.0 for step in (3, 4, 5, 6))  # GAN on
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), step
    a = VideoTokenizer.from_pretrained(one).state_dict()
    b = VideoTokenizer.from_pretrained(tmp_path / "two" / "export").state_dict()
    # Tensor by tensor, not element by element: two ranks sum gradients in another order, and
    # Adam turns a rounding-level change in a near-zero gradient into an lr-sized change of that
    # one weight (on an AMD EPYC, 1 element of 6,912 moved 2e-5). A wrong gradient average or a
    # lost optimizer state moves whole tensors by orders of magnitude more. A tensor that starts
    # at zero (the adaptive norms' scale and shift convs) is only its six updates large, so its
    # gap is taken against one learning-rate step of each element when that is larger (on an
    # Intel Xeon, one shift bias of 16 elements, norm 0.0063, differed by at most 6.6e-7).
    lr = cfg.optim.lr
    for key in a:
        size = max(float(a[key].float().norm()), lr * a[key].numel() ** 0.5)
        gap = float((a[key].float() - b[key].float()).norm()) / size
        assert gap < 1e-4, (key, gap)


def _records(run: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_gradient_difference_term_is_trained_and_logged(tmp_path, train_config):
    base = apply_overrides(train_config, {"steps": 2, "loss.disc_start_step": 1000})
    with_gdl = apply_overrides(base, {"loss.gradient_weight": 1.0})
    plain, sharp = (
        VideoTokenizer.from_pretrained(train_tokenizer(cfg, tmp_path / run, progress=False))
        for cfg, run in ((base, "a"), (with_gdl, "b"))
    )
    records = _records(tmp_path / "b")
    assert sorted(records) == [1, 2] and all(r["gdl"] > 0 for r in records.values())
    assert "gdl" not in _records(tmp_path / "a")[1]
    # the same seed and data: only the extra term makes the weights differ
    differs = [
        not torch.equal(x, y)
        for x, y in zip(plain.state_dict().values(), sharp.state_dict().values(), strict=True)
    ]
    assert any(differs)


def test_edge_weighted_pixel_loss_is_trained(tmp_path, train_config):
    base = apply_overrides(train_config, {"steps": 2, "loss.disc_start_step": 1000})
    runs = {"plain": base, "edges": apply_overrides(base, {"loss.edge_weight": 8.0})}
    exports = {
        name: train_tokenizer(cfg, tmp_path / name, progress=False) for name, cfg in runs.items()
    }
    plain, edges = (VideoTokenizer.from_pretrained(exports[n]).state_dict() for n in runs)
    # the same seed and data: step 1's loss is the same clip's error, weighted otherwise
    assert _records(tmp_path / "plain")[1]["rec"] != _records(tmp_path / "edges")[1]["rec"]
    assert any(not torch.equal(plain[k], edges[k]) for k in plain)


def test_continuous_steps_decode_the_latent_then_the_quantizer_comes_on(tmp_path, train_config):
    # Steps 1-4 decode the continuous latent: no quantizer loss, no code statistics; steps 5-6
    # quantize (LFQ: a commitment term, codes in use). Resuming across the switch: above.
    cfg = apply_overrides(train_config, {"continuous_steps": 4})
    train_tokenizer(cfg, tmp_path / "warm", progress=False)
    records = _records(tmp_path / "warm")
    for step in (1, 2, 3, 4):
        assert records[step]["quant"] == 0.0 and "usage" not in records[step], step
    for step in (5, 6):
        assert records[step]["commitment"] > 0 and 0 < records[step]["usage"] <= 1, step
    train_tokenizer(train_config, tmp_path / "plain", progress=False)
    assert records[1]["rec"] != _records(tmp_path / "plain")[1]["rec"]  # same clips, other path


def test_continuous_steps_are_checked(train_config, small_tokenizer_config):
    with pytest.raises(ValueError, match=r"continuous_steps must be in \[0, steps=6\)"):
        apply_overrides(train_config, {"continuous_steps": 6})
    with pytest.raises(ValueError, match="set continuous_steps=0"):
        apply_overrides(
            train_config,
            {"continuous_steps": 2, "trainable": "decoder", "init_from": "runs/tok/export"},
        )
    cvq = replace(train_config, model=small_tokenizer_config(**{"quantizer.kind": "cvq"}))
    with pytest.raises(ValueError, match="CVQ codebook gets none"):
        apply_overrides(cvq, {"continuous_steps": 2, "parallel.mode": "ddp"})
    assert apply_overrides(cvq, {"continuous_steps": 2}).continuous_steps == 2


def test_compiling_the_tokenizer_is_refused_with_the_fix(train_config):
    with pytest.raises(ValueError, match=r"recompiles.*set parallel\.compile=false"):
        apply_overrides(train_config, {"parallel.compile": True})
    assert not apply_overrides(train_config, {"parallel.compile": False}).parallel.compile


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"loss\.reconstruction"):
        TokenizerLossConfig(reconstruction="huber")
    with pytest.raises(ValueError, match=r"loss\.gradient_weight must be >= 0"):
        TokenizerLossConfig(gradient_weight=-1.0)
    with pytest.raises(ValueError, match=r"loss\.edge_weight must be >= 0"):
        TokenizerLossConfig(edge_weight=-1.0)


def test_decoder_fine_tuning_keeps_every_code_and_moves_only_the_decoder(tmp_path, train_config):
    base = apply_overrides(train_config, {"steps": 3, "loss.disc_start_step": 1000})
    source = VideoTokenizer.from_pretrained(train_tokenizer(base, tmp_path / "a", progress=False))
    tuned_cfg = apply_overrides(
        base,
        {"init_from": str(tmp_path / "a" / "export"), "trainable": "decoder", "ema_decay": 0.0},
    )
    tuned_export = train_tokenizer(tuned_cfg, tmp_path / "b", progress=False)
    tuned = VideoTokenizer.from_pretrained(tuned_export)
    before, after = source.state_dict(), tuned.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith("decoder.") for name in moved), sorted(moved)
    clips = held_out_clips(base.data, 2)
    assert torch.equal(source.encode(clips), tuned.encode(clips))
    records = _records(tmp_path / "b")
    assert sorted(records) == [1, 2, 3]


def test_a_levels_head_on_a_trained_tokenizer_keeps_its_codes_and_learns(tmp_path, train_config):
    base = apply_overrides(train_config, {"steps": 3, "loss.disc_start_step": 1000})
    source = VideoTokenizer.from_pretrained(train_tokenizer(base, tmp_path / "a", progress=False))
    overrides = {
        "init_from": str(tmp_path / "a" / "export"),
        "trainable": "decoder",
        "model.output_levels": 16,
        "ema_decay": 0.0,
        "steps": 60,
        "optim.lr": 1e-2,  # a fresh head, on a decoder 3 steps old
    }
    tuned_cfg = apply_overrides(base, overrides)
    tuned = VideoTokenizer.from_pretrained(
        train_tokenizer(tuned_cfg, tmp_path / "b", progress=False)
    )
    assert tuned.config.output_levels == 16
    before, after = source.state_dict(), tuned.state_dict()
    kept = [k for k in before if not k.startswith("decoder.")]
    assert all(torch.equal(before[k], after[k]) for k in kept)
    clips = held_out_clips(base.data, 2)
    assert torch.equal(source.encode(clips), tuned.encode(clips))
    losses = _losses(tmp_path / "b")
    assert losses[60][0] < 0.7 * losses[1][0], (losses[1], losses[60])  # cross-entropy falls

    # a head swap is the one difference init_from forgives
    wider = apply_overrides(tuned_cfg, {"model.base_width": 16})
    with pytest.raises(ValueError, match=r"model\.base_width: 8 there, 16 here"):
        train_tokenizer(wider, tmp_path / "c", progress=False)


def test_init_from_names_the_fields_that_differ_and_decoder_needs_it(tmp_path, train_config):
    base = apply_overrides(train_config, {"steps": 1, "loss.disc_start_step": 1000})
    train_tokenizer(base, tmp_path / "a", progress=False)
    wider = apply_overrides(
        base,
        {
            "init_from": str(tmp_path / "a" / "export"),
            "model.base_width": 16,
            "model.quantizer.commitment_weight": 0.5,
        },
    )
    with pytest.raises(ValueError, match=r"model\.base_width: 8 there, 16 here") as caught:
        train_tokenizer(wider, tmp_path / "b", progress=False)
    assert "model.quantizer.commitment_weight: 0.25 there, 0.5 here" in str(caught.value)
    with pytest.raises(ValueError, match="set init_from"):
        apply_overrides(base, {"trainable": "decoder"})
    with pytest.raises(ValueError, match='trainable must be "all" or "decoder"'):
        apply_overrides(base, {"trainable": "encoder"})


def test_two_micro_batches_of_two_train_like_one_batch_of_four(tmp_path, train_config):
    """GAN off: reconstruction and commitment are means over clips, the GroupNorm model treats
    each clip alone, so accumulating two micro-batches of two gives the gradients of one batch of
    four up to float rounding, and the same losses step after step. LFQ's batch entropy is taken
    per micro-batch, which changes the gradients, so it is off for the steps; before any update
    (step 1) it is on, at the 2-rank test's temperature, and only the batch entropy differs:
    the mean over micro-batches of their entropies is at most the entropy of the whole batch
    (entropy is concave)."""
    base = {"data.batch_size": 4, "loss.disc_start_step": 1000}
    base["model.quantizer.entropy_temperature"] = 0.5
    runs = {}
    for grad_accum in (1, 2):
        for entropy_weight, steps in ((0.0, 4), (0.1, 1)):
            overrides = {"grad_accum": grad_accum, "steps": steps}
            overrides["model.quantizer.entropy_weight"] = entropy_weight
            run = tmp_path / f"accum{grad_accum}_entropy{entropy_weight}"
            train_tokenizer(apply_overrides(train_config, base | overrides), run, progress=False)
            runs[grad_accum, entropy_weight] = _records(run)

    want, got = runs[1, 0.0], runs[2, 0.0]
    assert want.keys() == got.keys() == {1, 2, 3, 4}
    for step in want:
        for key in ("rec", "quant", "commitment"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)

    whole, halves = runs[1, 0.1][1], runs[2, 0.1][1]
    for key in ("rec", "commitment", "sample_entropy"):
        assert halves[key] == pytest.approx(whole[key], rel=1e-5), key
    assert halves["batch_entropy"] < whole["batch_entropy"]


def test_grad_accum_must_split_the_batch_into_equal_shares(train_config):
    with pytest.raises(ValueError, match=r"pass a data\.batch_size that is a multiple of 3"):
        apply_overrides(train_config, {"grad_accum": 3})  # data.batch_size=2
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        apply_overrides(train_config, {"grad_accum": 0})

    rank1 = runtime.Runtime(
        parallel=ParallelConfig(), device=torch.device("cpu"), rank=1, world_size=2
    )
    assert tokenizer_data.micro_batch_rows(8, 2, rank1) == [2, 3, 6, 7]
    assert tokenizer_data.micro_batch_rows(8, 1, rank1) == slice(4, 8)
    with pytest.raises(
        ValueError,
        match=r"does not divide among 2 ranks: pass a data\.batch_size that is a multiple of 8",
    ):
        tokenizer_data.micro_batch_rows(4, 4, rank1)


def _train(cfg: TokenizerTrainConfig, run: Path) -> None:
    train_tokenizer(cfg, run, progress=False)


def test_two_ranks_accumulate_each_micro_batch_like_one_process(tmp_path, train_config):
    """Two DDP ranks, a batch of four in two micro-batches, GAN on from step 2: each rank takes
    one clip of each micro-batch, so the micro-batches (and their batch entropy, all-reduced over
    ranks) are those of one process, and so are the losses."""
    overrides = {
        "data.batch_size": 4,
        "grad_accum": 2,
        "steps": 3,
        "model.quantizer.entropy_temperature": 0.5,
    }
    cfg = apply_overrides(train_config, overrides)
    _train(cfg, tmp_path / "one")
    run_ranks(_train, apply_overrides(cfg, {"parallel.mode": "ddp"}), tmp_path / "two")

    want, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert want.keys() == got.keys() == {1, 2, 3}
    assert want[3][2] != 0.0 and want[3][3] != 0.0  # GAN on
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), step


def test_a_run_writes_previews_metrics_checkpoints_and_an_export(tmp_path, train_config):
    cfg = apply_overrides(train_config, {"preview_every": 3, "eval_every": 3})
    export = train_tokenizer(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert (run / "previews" / "step_0000003.mp4").stat().st_size > 0
    assert (run / "previews" / "step_0000006.gif").stat().st_size > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_psnr" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 < r["eval_codebook_usage"] <= 1 for r in evals)
    assert json.loads((run / "config.json").read_text())["model"]["base_width"] == 8
    assert sorted(p.name for p in (export).iterdir()) == ["config.json", "model.safetensors"]
    assert len(list((run / "checkpoints").glob("*.pt"))) == 2


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, train_config):
    run = tmp_path / "run"
    train_tokenizer(train_config, run, progress=False)  # checkpoints at steps 3 and 6
    latest = sorted((run / "checkpoints").glob("*.pt"))[-1]
    latest.write_bytes(latest.read_bytes()[:100])  # a torn write
    from loong.train.checkpoint import load_latest_checkpoint

    with pytest.warns(UserWarning, match="unreadable"):
        state = load_latest_checkpoint(run / "checkpoints")
    assert state is not None and state["step"] == 3


def test_folder_data_skips_bad_files_and_keeps_training(tmp_path, train_config):
    from loong.data.shapes import Scene, ShapeObject, render
    from loong.data.video import write_video

    folder = tmp_path / "videos"
    folder.mkdir()
    scene = Scene(objects=(ShapeObject(colour="red", shape="circle", direction="right"),))
    for i in range(2):
        write_video(folder / f"clip{i}.mp4", render(scene, seed=i, n_frames=12), fps=8)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    cfg = apply_overrides(
        train_config, {"data.source": str(folder), "data.eval_folder": str(folder), "steps": 4}
    )
    with pytest.warns(UserWarning, match="broken.mp4"):
        export = train_tokenizer(cfg, tmp_path / "run", progress=False)
    assert (export / "model.safetensors").is_file()
    assert len(_losses(tmp_path / "run")) == 4


def _grey_videos(folder: Path, n: int) -> list[float]:
    """``n`` 12-frame videos ``clip{i}.mp4`` of one flat grey each; their levels in [-1, 1]."""
    import numpy as np

    from loong.data.video import write_video

    levels = [16 + 24 * i for i in range(n)]  # n <= 10
    for i, level in enumerate(levels):
        write_video(folder / f"clip{i}.mp4", np.full((12, 32, 32, 3), level, np.uint8), fps=8)
    return [level / 127.5 - 1 for level in levels]


def _which(clips: torch.Tensor, levels: list[float]) -> set[int]:
    """The video each clip ``(N, C, T, H, W)`` came from, by its mean level."""
    means = clips.mean(dim=(1, 2, 3, 4)).tolist()
    return {min(range(len(levels)), key=lambda i: abs(levels[i] - m)) for m in means}


def test_a_folder_without_eval_folder_holds_videos_out_of_training(tmp_path):
    """Evaluation reads ``eval_share`` of the folder's videos, and training never does."""
    folder = tmp_path / "videos"
    folder.mkdir()
    levels = _grey_videos(folder, 10)
    cfg = TokenizerDataConfig(source=str(folder), n_frames=5, size=16, batch_size=2)
    held = tokenizer_data.held_out_videos(cfg)
    assert len(held) == 1  # 5% of 10 files: at least one
    held_ids = {int(p.stem.removeprefix("clip")) for p in held}
    evaluation = held_out_clips(cfg, 8)
    assert _which(evaluation, levels) == held_ids
    assert tokenizer_data.evaluation_source(cfg) == (
        f"held-out videos of {folder}: 1 of its 10 files (data.eval_share = 0.05)",
        True,
    )
    batches = tokenizer_data.training_batches(cfg, {})
    trained = torch.cat([next(batches) for _ in range(18)])  # 2 clips a file, over 2 passes
    assert _which(trained, levels) == set(range(10)) - held_ids


def test_a_run_lists_its_held_out_videos_and_warns_when_they_change(tmp_path, caplog):
    folder = tmp_path / "videos"
    folder.mkdir()
    _grey_videos(folder, 10)
    cfg = TokenizerDataConfig(source=str(folder), n_frames=5, size=16)
    run = tmp_path / "run"
    run.mkdir()
    tokenizer_data.record_held_out(cfg, run)
    listed = json.loads((run / "held_out.json").read_text())["files"]
    assert listed == [p.name for p in tokenizer_data.held_out_videos(cfg)]
    tokenizer_data.record_held_out(cfg, run)  # resumed, unchanged: quiet
    assert "changed" not in caplog.text
    (run / "held_out.json").write_text(json.dumps({"files": ["clip9.mp4", "gone.mp4"]}))
    tokenizer_data.record_held_out(cfg, run)
    assert "held-out videos of" in caplog.text and "changed since this run began" in caplog.text
    assert json.loads((run / "held_out.json").read_text())["files"] == listed
    same = TokenizerDataConfig(source=str(folder), eval_folder=str(folder))
    assert tokenizer_data.evaluation_source(same)[1] is False


def test_a_folder_of_few_videos_evaluates_on_its_training_clips(tmp_path):
    levels = _grey_videos(tmp_path, 1)
    cfg = TokenizerDataConfig(source=str(tmp_path), n_frames=5, size=16, batch_size=2)
    assert tokenizer_data.held_out_videos(cfg) == []
    assert _which(held_out_clips(cfg, 2), levels) == {0}
    what, held_out = tokenizer_data.evaluation_source(cfg)
    assert not held_out and "not held out" in what
    with pytest.raises(ValueError, match="eval_share must be in"):
        TokenizerDataConfig(source=str(tmp_path), eval_share=1.0)


def test_folder_batches_with_jitter_flips_and_a_shuffle_buffer_resume_exactly(tmp_path):
    """Jittered clip starts, flips and a shuffle buffer (the folder defaults) are drawn from the
    seed and the pass: batches after a saved position, across epochs, are the uninterrupted
    ones."""
    from loong.data.shapes import Scene, ShapeObject, render
    from loong.data.video import write_video

    scene = Scene(objects=(ShapeObject(colour="red", shape="circle", direction="right"),))
    for i in range(3):
        write_video(tmp_path / f"clip{i}.mp4", render(scene, seed=i, n_frames=12), fps=8)
    cfg = TokenizerDataConfig(source=str(tmp_path), n_frames=5, size=16, batch_size=2)
    assert cfg.jitter and cfg.flip and cfg.shuffle_buffer > 1
    position: dict[str, int] = {}
    batches = tokenizer_data.training_batches(cfg, position)
    straight, positions = [], []
    for _ in range(8):  # 3 to 6 clips a pass: several epochs
        straight.append(next(batches))
        positions.append(dict(position))
    assert positions[-1]["epoch"] >= 2
    resumed = tokenizer_data.training_batches(cfg, dict(positions[2]))
    for want in straight[3:]:
        torch.testing.assert_close(next(resumed), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"data\.shuffle_buffer must be >= 0"):
        TokenizerDataConfig(shuffle_buffer=-1)


def test_tar_shards_train_resume_exactly_and_skip_a_corrupt_sample(
    tmp_path, train_config, crash_after_checkpoint, make_tar_shards
):
    """Five clips and a corrupt sample in three tar shards, named by a brace pattern: two batches
    an epoch, so the step-3 checkpoint falls inside epoch 1, and the resumed run's losses are
    the uninterrupted run's."""
    make_tar_shards(tmp_path, 5, samples_per_shard=2, n_frames=5, n_bad=1)
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    cfg = apply_overrides(train_config, {"data.source": pattern})
    with pytest.warns(UserWarning, match=r"skipping .*shard-000000.tar:bad_0.*1 bad samples"):
        train_tokenizer(cfg, tmp_path / "straight", progress=False)
    with crash_after_checkpoint(runtime, step=3):
        train_tokenizer(cfg, tmp_path / "resumed", progress=False)
    train_tokenizer(cfg, tmp_path / "resumed", progress=False)

    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert want.keys() == got.keys() == set(range(1, 7))
    for step in range(4, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    checkpoints = sorted((tmp_path / "resumed" / "checkpoints").glob("*.pt"))  # steps 3 and 6
    positions = [torch.load(p, weights_only=False)["data_position"] for p in checkpoints]
    assert [(p["epoch"], p["batches"], p["ranks"]) for p in positions] == [(1, 1, 1), (2, 2, 1)]


def _epoch_of_clips(cfg: TokenizerDataConfig, out: Path) -> None:
    """This rank's first 5 batches from the start, and batches 3 and 4 again from a position
    saved after batch 2, with the positions they leave, into ``out/rank<r>.pt``."""
    from loong.train.dist import rank, world_size

    share = cfg.batch_size // world_size()
    rows = slice(rank() * share, (rank() + 1) * share)
    position: dict[str, int] = {}
    batches = tokenizer_data.training_batches(cfg, position, rows)
    straight, positions = [], []
    for _ in range(5):
        straight.append(next(batches))
        positions.append(dict(position))
    resumed_at = dict(positions[1])
    again = tokenizer_data.training_batches(cfg, resumed_at, rows)
    resumed = [next(again), next(again)]
    torch.save(
        {"straight": straight, "positions": positions, "resumed": resumed},
        out / f"rank{rank()}.pt",
    )


def test_two_ranks_read_disjoint_tar_shards_each_clip_once_an_epoch(tmp_path, make_tar_shards):
    """Eight clips in four tar shards, a global batch of 2: each of two ranks reads two shards,
    one clip a step, and an epoch of four steps holds every clip of the one-rank epoch once."""
    make_tar_shards(tmp_path, 8, samples_per_shard=2, n_frames=5)
    cfg = TokenizerDataConfig(source=str(tmp_path / "shards"), n_frames=5, size=16, batch_size=2)
    run_ranks(_epoch_of_clips, cfg, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    def clips(batches: list[torch.Tensor]) -> list[bytes]:
        return sorted(clip.numpy().tobytes() for batch in batches for clip in batch)

    one_rank = tokenizer_data.training_batches(cfg, {})
    one_epoch = clips([next(one_rank) for _ in range(4)])
    assert len(one_epoch) == len(set(one_epoch)) == 8
    assert clips([b for r in ranks for b in r["straight"][:4]]) == one_epoch
    for r in ranks:
        assert all(b.shape == (1, 3, 5, 16, 16) for b in r["straight"])
        assert r["positions"][3] == {"epoch": 0, "batches": 4, "ranks": 2}
        assert r["positions"][4] == {"epoch": 1, "batches": 1, "ranks": 2}
        for a, b in zip(r["resumed"], r["straight"][2:4], strict=True):
            assert torch.equal(a, b)
