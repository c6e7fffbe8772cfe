"""Training loop of the language model: progressive short-to-long, re-weighted loss (Loong).

The stages and loss weights are configured in :mod:`loong.train.lm_config`; the micro-batches
and the weighted loss are :mod:`loong.train.lm_batches`. This module opens the data, runs the
steps, evaluates, checkpoints and exports.

The run directory holds config.json, metrics.jsonl, checkpoints/ (model, optimizer, step, RNG,
log window; the sampler needs nothing more), tensorboard/ (when the package is installed) and
export/: VideoLM's config.json + model.safetensors, the text tokenizer's tokenizer.json,
generation.json (paired video tokenizer, latent grid, clip length, fps: what loong.generate
reads), the shards' meta as shards_meta.json, and the run's train_config.json.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from loong.config import config_json
from loong.data.shards import TokenShards, check_compatible
from loong.lm.model import VideoLM
from loong.lm.vocab import Batch, Vocabulary
from loong.pretrained import atomic_write_text
from loong.text_tokenizer import TOKENIZER_FILE, TextTokenizer
from loong.train.budget import LM, Refit, fit_lm
from loong.train.checkpoint import BestExport
from loong.train.dist import barrier
from loong.train.lm_batches import (
    ClipPool,
    add_frame_losses,
    batch_weight,
    draw_plan,
    evaluation_set,
    frame_means,
    make_batch,
    noisy_inputs,
    target_positions,
    to_device,
    weighted_loss,
)
from loong.train.lm_config import LMTrainConfig, LossWeightConfig, stage_at
from loong.train.optim import adamw
from loong.train.parallel import clip_grad_norm_, compiles, no_gradient_sync, unwrap
from loong.train.runtime import (
    MetricsLog,
    load_state,
    save_export,
    save_state,
    start,
    summed,
)

log = logging.getLogger("loong")


@torch.no_grad()
def evaluate_lm(
    model: VideoLM, batches: list[Batch], vocab: Vocabulary, device: torch.device
) -> dict[str, float]:
    """Unweighted mean loss over video and EOV targets (``loss``) and per latent frame."""
    was_training = model.training
    model.eval()
    window: dict[str, list[float]] = {}
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(batch.token_ids, output_mask=target_positions(batch, vocab))  # (N, V)
        _, ce, frames, is_eov = weighted_loss(logits, batch, vocab, LossWeightConfig())
        total, count = total + ce.sum().item(), count + len(ce)
        add_frame_losses(window, ce.cpu(), frames.cpu(), is_eov.cpu())
    model.train(was_training)
    return {"loss": total / count, **frame_means(window)}


def text_path(cfg: LMTrainConfig) -> Path:
    """The text tokenizer file a run uses."""
    return Path(cfg.data.text_tokenizer or Path(cfg.data.shards[0]) / TOKENIZER_FILE)


def open_data(cfg: LMTrainConfig) -> tuple[list[TokenShards], TextTokenizer, Vocabulary]:
    """Shards, text tokenizer and vocabulary, checked against the model config."""
    shards = [TokenShards(d) for d in cfg.data.shards]
    check_compatible(shards)
    for s in shards:
        if len(s) == 0:
            raise ValueError(f"{s.directory} holds no items: see skipped in its meta.json")
    vocab_cfg, (h, w) = cfg.model.vocab, shards[0].grid
    if shards[0].video_vocab_size != vocab_cfg.video_vocab_size:
        raise ValueError(
            f"the shards' video tokenizer has {shards[0].video_vocab_size} codes but "
            f"model.vocab.video_vocab_size is {vocab_cfg.video_vocab_size}: make them equal"
        )
    grid = cfg.model.video_grid
    if grid is not None and tuple(grid) != (h, w):
        raise ValueError(
            f"model.video_grid is {tuple(grid)} but the shards' latent frames are {h}×{w}: set "
            f"model.video_grid = [{h}, {w}] (or None for RoPE positions alone)"
        )
    longest = max(max(s.lengths) for s in shards)
    for stage in cfg.stages:
        if max(stage.lengths) > longest:
            raise ValueError(
                f"stage {stage.name!r} asks for {max(stage.lengths)} latent frames but the "
                f"longest shards hold {longest}: tokenize longer clips or drop that length"
            )
    need = cfg.data.max_text_tokens + 4 + h * w * max(max(s.lengths) for s in cfg.stages)
    if need > cfg.model.max_seq_len:
        raise ValueError(
            f"sequences need up to {need} positions (text {cfg.data.max_text_tokens} + 4 "
            f"specials + video), more than model.max_seq_len={cfg.model.max_seq_len}"
        )
    text = TextTokenizer.load(text_path(cfg))
    if text.vocab_size > vocab_cfg.text_vocab_size:
        raise ValueError(
            f"the text tokenizer has {text.vocab_size} ids, more than model.vocab."
            f"text_vocab_size={vocab_cfg.text_vocab_size}: raise it or retrain the tokenizer"
        )
    return shards, text, Vocabulary(vocab_cfg)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard logging off: the tensorboard package is not installed")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def write_generation_file(export: Path, meta: dict, cfg: LMTrainConfig) -> None:
    """``generation.json`` as :mod:`loong.generate` reads it: the paired video tokenizer, latent
    grid, trained clip length (the longest stage length), fps and frame size of the clips."""
    path = meta["video_tokenizer"]["path"]
    if path is None:
        log.warning("no generation.json: the shards do not name their video tokenizer directory")
        return
    info = {
        "video_tokenizer": path,
        "latent_grid": meta["grid"],
        "clip_latents": max(max(stage.lengths) for stage in cfg.stages),
        "fps": meta["fps"],
        "frame_size": [meta["size"], meta["size"]],
    }
    atomic_write_text(export / "generation.json", json.dumps(info, indent=2) + "\n")


# --- the loop --------------------------------------------------------------------------------


def train_lm(cfg: LMTrainConfig, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Train (or resume) a language-model run in ``out_dir``; returns the export directory.

    Under torchrun every rank calls it: each trains on its rows of every micro-batch and rank 0
    writes the files (see :mod:`loong.train.runtime`).
    """
    rt = start(cfg.parallel, cfg.device)
    rows = rt.rows(cfg.batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configured, cfg = cfg, fit_lm(cfg, out, rt.world_size)  # a budget: steps fitted
    if rt.main:
        atomic_write_text(out / "config.json", config_json(cfg))  # the steps that run
    # Subnormal floats make CPU kernels crawl (a tokenizer step on real video ran 3.5× slower);
    # flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    device = rt.device

    # 0. data, model, optimizer, resume
    shards, text, vocab = open_data(cfg)
    pools = {t: ClipPool(shards, t) for stage in cfg.stages for t in stage.lengths}
    sizes = {t: len(pool) for t, pool in pools.items()}
    evaluation = evaluation_set(cfg, shards, text, vocab)
    eval_set, evaluated_on, held_out = evaluation.batches, evaluation.what, evaluation.held_out
    if rt.main:  # quiet (a calibration, a test): debug
        say_once = log.debug if not progress else log.info if held_out else log.warning
        say_once("evaluation: %s", evaluated_on)
    torch.manual_seed(cfg.seed)
    model = VideoLM(cfg.model)
    log.info(
        "language model: %s parameters; shards %s items by t: %s",
        f"{model.num_parameters():,}",
        f"{sum(len(s) for s in shards):,}",
        sizes,
    )
    model = rt.wrap(model)
    fused = compiles(cfg.parallel, device)  # the loss compiled with the blocks
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = adamw(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay}],
        cfg.optim,
        weight_decay=0.0,
    )
    step, window = 0, {}
    trained = {"modules": {"model": model}, "optimizers": {"optimizer": opt}}
    state = load_state(out / "checkpoints", rt, **trained)
    if state is not None:
        step, window = state["step"], state["window"]
        log.info("resumed from step %d", step)
    refit = Refit(configured, cfg, out, LM, resumed=step > 0, world_size=rt.world_size)
    writer = _tensorboard(out) if cfg.tensorboard and rt.main else None
    total = cfg.total_steps
    bar = tqdm(
        total=total, initial=step, disable=not (progress and rt.main), desc="lm", dynamic_ncols=True
    )
    say = bar.write if rt.main and progress else log.debug  # quiet: a calibration, a test
    started = time.monotonic()
    metrics = MetricsLog(out / "metrics.jsonl", step, rt)
    stage_index = -1

    def write_export(directory: Path, cfg: LMTrainConfig) -> None:
        """The model, its text tokenizer, its shards' meta and how to sample it (every rank
        calls it: FSDP gathers the weights)."""
        save_export(model, rt, functools.partial(VideoLM, cfg.model), directory)
        if rt.main:
            shutil.copyfile(text_path(cfg), directory / TOKENIZER_FILE)
            meta = json.dumps(shards[0].meta, indent=2) + "\n"
            atomic_write_text(directory / "shards_meta.json", meta)
            write_generation_file(directory, shards[0].meta, cfg)
            atomic_write_text(directory / "train_config.json", config_json(cfg))

    best = None
    if cfg.export_best:
        best = BestExport(out / "best", "loss", higher=False, evaluated_on=evaluated_on)

    while step < total:
        began = time.monotonic()
        # 1. batch: this rank's part of the stage's micro-batches; the step's normaliser Σ w
        # over all ranks, so that every token weighs the same whatever the number of ranks
        if stage_at(cfg.stages, step) != stage_index:
            stage_index = stage_at(cfg.stages, step)
            stage = cfg.stages[stage_index]
            say(f"step {step}: stage {stage.name!r}, latent lengths {stage.lengths}")
        plans = [draw_plan(stage, sizes, cfg, step, m) for m in range(cfg.grad_accum)]
        batches = [make_batch(p.part(rows), pools[p.length], text, vocab, cfg.data) for p in plans]
        local_norm = sum(batch_weight(b, vocab, cfg.loss) for b in batches)
        norm = torch.tensor(summed({"norm": [local_norm.item()]})["norm"][0], device=device)
        lr = cfg.optim.lr_at(step, total)
        for group in opt.param_groups:
            group["lr"] = lr

        # 2. forward and backward, one micro-batch at a time; gradients are averaged over
        # ranks once, in the last micro-batch's backward, hence the sum Σ w·ce times the ranks
        model.train()
        loss_sum, ce_sum, n_targets, frame_window = 0.0, 0.0, 0, {}
        for m, batch in enumerate(batches):
            batch = to_device(batch, device)
            seed = (cfg.seed, step, m)
            inputs = noisy_inputs(
                batch,
                vocab,
                cfg.data.context_noise,
                seed,
                erase=cfg.data.context_erase,
                spill=cfg.data.context_spill,
                grid=cfg.model.video_grid,
            )
            with nullcontext() if m == len(batches) - 1 else no_gradient_sync(model):
                with rt.autocast():
                    logits = model(inputs, output_mask=target_positions(batch, vocab))  # (N, V)
                loss, ce, frames, is_eov = weighted_loss(
                    logits, batch, vocab, cfg.loss, norm, fused=fused
                )
                (loss * rt.world_size).backward()
            loss_sum += loss.item()
            ce_sum, n_targets = ce_sum + ce.sum().item(), n_targets + len(ce)
            add_frame_losses(frame_window, ce.cpu(), frames.cpu(), is_eov.cpu())

        # 3. update
        grad_norm = clip_grad_norm_(
            model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # 4. logs (summed over ranks), evaluation, checkpoints
        sums = summed({"loss": [loss_sum], "ce": [ce_sum, n_targets]} | frame_window)
        for key in (k for k in sums if k.startswith("loss_frame_")):
            acc = window.setdefault(key, [0.0, 0])
            acc[0], acc[1] = acc[0] + sums[key][0], acc[1] + sums[key][1]
        bar.update(1)
        bar.set_postfix(stage=stage.name, loss=f"{sums['loss'][0]:.4f}", refresh=False)
        elapsed = time.monotonic() - started  # this process's seconds, as the tokenizer logs
        lengths = [p.length for p in plans]
        refitted = refit.observe(step, time.monotonic() - began, lengths, elapsed)
        if refitted is not None:  # a budgeted run whose steps took longer or shorter than timed
            cfg, total = refitted, refitted.total_steps
            stage, bar.total = cfg.stages[stage_index], total  # its steps may have changed
            if rt.main:
                atomic_write_text(out / "config.json", config_json(cfg))
        record = {
            "step": step,
            "elapsed_s": round(elapsed, 3),
            "stage": stage.name,
            "lengths": [p.length for p in plans],
            "lr": lr,
            "loss": sums["loss"][0],
            "loss_unweighted": sums["ce"][0] / sums["ce"][1],
            "grad_norm": grad_norm.item(),
        }
        done = step == total or (cfg.max_minutes > 0 and rt.agree(elapsed > 60 * cfg.max_minutes))
        if step % cfg.log_every == 0 or done:
            record |= frame_means(window)
            window = {}
        if step % cfg.eval_every == 0 or done:
            # every rank evaluates all batches (FSDP needs every rank for a forward pass)
            result = evaluate_lm(unwrap(model), eval_set, vocab, device)
            record |= {f"eval_{k}": v for k, v in result.items()}
            say(f"step {step}: {'held-out' if held_out else 'eval'} loss {result['loss']:.4f}")
            if best is not None and rt.agree(best.improves(result)):
                write_export(best.directory, cfg)
                about = {"evaluated_on": evaluated_on, "held_out": held_out}
                best.record(step, result, write=rt.main, **about)
        if step % cfg.log_every == 0 or "eval_loss" in record:
            metrics.write(record)
            if writer is not None:
                for key, value in record.items():
                    if isinstance(value, float):
                        writer.add_scalar(key, value, step)
        if step % cfg.checkpoint_every == 0 or done or refitted is not None:
            extra = {"step": step, "data_position": {"step": step}, "window": window}
            save_state(
                out / "checkpoints",
                rt,
                **trained,
                extra=extra,
                step=step,
                keep=cfg.keep_checkpoints,
            )
        if done:
            break

    bar.close()
    metrics.close()
    if writer is not None:
        writer.close()
    export = out / "export"
    write_export(export, cfg)
    barrier()
    return export
