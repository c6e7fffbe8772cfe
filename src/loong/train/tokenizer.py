"""Training loop of the video tokenizer: reconstruction + quantizer + perceptual + GAN losses.

One linear loop in numbered phases; its configs are :mod:`loong.train.tokenizer_config`, its
clips :mod:`loong.train.tokenizer_data`. The run directory holds the resolved config, checkpoints
(atomic, resumed exactly: models, optimizers, EMA, step, data position, RNG), ``metrics.jsonl``,
reconstruction previews (original | reconstruction, mp4 and GIF) and the export
(``export/config.json`` + ``export/model.safetensors``, EMA weights when EMA is on).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from loong.config import config_differences, config_json
from loong.data.video import tensor_to_frames, write_video
from loong.evaluate.metrics import psnr, ssim
from loong.pretrained import atomic_write_text
from loong.train.budget import TOKENIZER, Refit, fit_tokenizer
from loong.train.checkpoint import BestExport
from loong.train.dist import barrier
from loong.train.optim import adamw
from loong.train.parallel import (
    ParallelConfig,
    clip_grad_norm_,
    no_gradient_sync,
    parallelize,
    unwrap,
)
from loong.train.runtime import (
    MetricsLog,
    load_state,
    mean_over_ranks,
    save_export,
    save_state,
    start,
)
from loong.train.tokenizer_config import TokenizerTrainConfig
from loong.train.tokenizer_data import (
    evaluation_source,
    held_out_clips,
    micro_batch_rows,
    record_held_out,
    training_batches,
)
from loong.video_tokenizer.discriminator import Discriminator3D
from loong.video_tokenizer.losses import (
    LeCam,
    PerceptualLoss,
    adaptive_generator_weight,
    discriminator_hinge_loss,
    edge_weights,
    generator_loss,
    gradient_difference_loss,
    level_loss,
    reconstruction_loss,
)
from loong.video_tokenizer.model import VideoTokenizer
from loong.video_tokenizer.quantize import code_stats

log = logging.getLogger("loong")
OUTPUT_HEAD = "decoder.conv_out."
"""Prefix of the weights a change of ``output_levels`` replaces (init_from starts them fresh)."""


# --- evaluation and previews -----------------------------------------------------------------


@torch.no_grad()
def evaluate(model: VideoTokenizer, clips: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """PSNR, SSIM and codebook usage/perplexity of ``model`` on ``clips (N, C, T, H, W)``."""
    was_training = model.training
    model.eval()
    p, s, indices = [], [], []
    for video in clips.split(batch_size):
        out = model(video)
        p.append(psnr(out.recon, video))
        s.append(ssim(out.recon, video))
        indices.append(out.indices.flatten())
    model.train(was_training)
    stats = code_stats(torch.cat(indices), model.config.vocab_size)
    return {
        "psnr": torch.cat(p).mean().item(),
        "ssim": torch.cat(s).mean().item(),
        "codebook_usage": stats["usage"].item(),
        "perplexity": stats["perplexity"].item(),
    }


@torch.no_grad()
def preview_frames(model: VideoTokenizer, clips: torch.Tensor) -> np.ndarray:
    """Original | reconstruction side by side, clips stacked vertically: uint8 (T, N·H, 2W, C).

    The reconstruction comes from a forward pass (the decoded codes of the encoded clips), so
    that under FSDP every rank can take part in it.
    """
    was_training = model.training
    model.eval()
    recon = model(clips).recon
    model.train(was_training)
    pairs = torch.cat([clips, recon], dim=4)  # (N, C, T, H, 2W)
    return tensor_to_frames(rearrange(pairs, "n c t h w -> c t (n h) w"))


def write_preview(frames: np.ndarray, path_stem: Path, fps: float) -> None:
    """``frames`` from :func:`preview_frames` as mp4 and GIF."""
    write_video(path_stem.with_suffix(".mp4"), frames, fps)
    write_video(path_stem.with_suffix(".gif"), frames, fps)


# --- the loop --------------------------------------------------------------------------------


def _initial_weights(cfg: TokenizerTrainConfig) -> dict[str, torch.Tensor]:
    """The state dict of ``cfg.init_from``, after checking its config is ``cfg.model``.

    A source that differs only in ``output_levels`` gives every weight but the decoder's output
    conv, which then starts fresh: a new head on a trained tokenizer, for ``trainable="decoder"``.
    """
    source = VideoTokenizer.from_pretrained(cfg.init_from)
    differ = config_differences(source.config, cfg.model)
    state = source.state_dict()
    if set(differ) == {"output_levels"}:
        log.info(
            "init_from: output_levels %s there, %s here: the decoder's output conv starts fresh",
            *differ["output_levels"],
        )
        return {k: v for k, v in state.items() if not k.startswith(OUTPUT_HEAD)}
    if differ:
        fields = "; ".join(f"model.{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())
        raise ValueError(
            f"init_from={cfg.init_from!r} holds a different tokenizer ({fields}): pick the "
            "preset it was trained from, or --set those fields to its values"
        )
    return state


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each value over ``records`` (which share their keys)."""
    return {key: sum(r[key] for r in records) / len(records) for key in records[0]}


def train_tokenizer(
    cfg: TokenizerTrainConfig, out_dir: str | Path, *, progress: bool = True
) -> Path:
    """Train (or resume) a tokenizer run in ``out_dir``; returns the export directory.

    Under torchrun every rank calls it: each trains on its rows of every batch and rank 0 writes
    the files (see :mod:`loong.train.runtime`).
    """
    rt = start(cfg.parallel, cfg.device)
    rows = micro_batch_rows(cfg.data.batch_size, cfg.grad_accum, rt)
    if rt.sharded and cfg.loss.adaptive_gan_weight and cfg.loss.gan_weight > 0:
        raise ValueError(
            "loss.adaptive_gan_weight needs the gradient at the decoder's last weight, which "
            'FSDP shards: set loss.adaptive_gan_weight=false or use parallel.mode="ddp"'
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configured, cfg = cfg, fit_tokenizer(cfg, out, rt.world_size)  # a budget: steps fitted
    if rt.main:
        atomic_write_text(out / "config.json", config_json(cfg))  # the steps that run
    torch.manual_seed(cfg.seed)
    # Subnormal floats make CPU kernels crawl (a tokenizer step on real video ran 3.5× slower);
    # flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    device = rt.device

    # 0. models, optimisers, losses
    model = VideoTokenizer(cfg.model)
    if cfg.init_from:
        loaded = model.load_state_dict(_initial_weights(cfg), strict=False)
        fresh = [k for k in loaded.missing_keys if not k.startswith(OUTPUT_HEAD)]
        assert not fresh and not loaded.unexpected_keys, (fresh, loaded.unexpected_keys)
    if cfg.trainable == "decoder":  # frozen before wrapping: DDP then syncs the decoder only
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    disc = Discriminator3D(cfg.discriminator)
    log.info(
        "tokenizer: %s parameters, %s codes; discriminator: %s parameters",
        f"{model.num_parameters():,}",
        f"{cfg.model.vocab_size:,}",
        f"{sum(p.numel() for p in disc.parameters()):,}",
    )
    lecam = LeCam().to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    model, disc = rt.wrap(model), rt.wrap(disc)
    if ema is not None:  # sharded like the model under FSDP, so the update is shard by shard
        plain = ParallelConfig(mode="fsdp" if rt.sharded else "none")
        ema = parallelize(ema, plain, device)
    opt_g = adamw([p for p in model.parameters() if p.requires_grad], cfg.optim)
    opt_d = adamw(disc.parameters(), cfg.optim)
    perceptual = None
    if cfg.loss.perceptual_weights:
        perceptual = PerceptualLoss(cfg.loss.perceptual_weights).to(device)
    else:
        log.info(
            "perceptual loss off: set loss.perceptual_weights to a VGG16 weights file to use it"
        )
    step, position = 0, {}
    modules = {"model": model, "discriminator": disc, "lecam": lecam}
    trained = {"modules": modules | ({"ema": ema} if ema is not None else {})}
    trained["optimizers"] = {"opt_g": opt_g, "opt_d": opt_d}
    state = load_state(out / "checkpoints", rt, **trained)
    if state is not None:
        step, position = state["step"], dict(state["data_position"])
        log.info("resumed from step %d", step)
    refit = Refit(configured, cfg, out, TOKENIZER, resumed=step > 0, world_size=rt.world_size)
    eval_clips = held_out_clips(cfg.data, cfg.eval_clips).to(device)
    evaluated_on, held_out = evaluation_source(cfg.data)
    if rt.main:  # quiet (a calibration, a test): debug
        record_held_out(cfg.data, out)
        say = log.debug if not progress else log.info if held_out else log.warning
        fix = "" if held_out else ": set data.eval_folder to videos training does not read"
        say("evaluation: %d clips, %s%s", len(eval_clips), evaluated_on, fix)
    batches = training_batches(cfg.data, position, rows)
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not (progress and rt.main),
        desc="tokenizer",
        dynamic_ncols=True,
    )
    started = time.monotonic()
    metrics = MetricsLog(out / "metrics.jsonl", step, rt)
    tokenizer, evaluated = unwrap(model), ema or unwrap(model)
    best = None
    if cfg.export_best:
        best = BestExport(out / "best", "psnr", higher=True, evaluated_on=evaluated_on)

    while step < cfg.steps:
        began = time.monotonic()
        # 1. batch: this rank's rows of the global batch, its share of each micro-batch
        video = next(batches).to(device)  # (B, C, T, H, W)
        micro = video.chunk(cfg.grad_accum)  # accum × (B / accum, C, T, H, W)
        lr = cfg.optim.lr_at(step, cfg.steps)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        gan_on = step >= cfg.loss.disc_start_step and cfg.loss.gan_weight > 0
        quantized = step >= cfg.continuous_steps

        # 2. tokenizer forward, losses and backward, one micro-batch at a time: gradients are
        # averaged over ranks once, in the last micro-batch's backward. Each reconstruction is
        # kept, detached, for the discriminator's update (no second forward pass).
        model.train()
        if cfg.trainable == "decoder":  # no quantizer statistics move, no anchor re-init
            tokenizer.encoder.eval()
            tokenizer.quantizer.eval()
        opt_g.zero_grad(set_to_none=True)
        g_logs, stat_logs, recons = [], [], []
        for m, clips in enumerate(micro):
            with nullcontext() if m == len(micro) - 1 else no_gradient_sync(model):
                with rt.autocast():
                    out_ = model(clips, quantize=quantized)
                weights = (
                    edge_weights(clips, cfg.loss.edge_weight) if cfg.loss.edge_weight > 0 else None
                )
                if out_.logits is not None:  # a decoder with output_levels
                    rec = level_loss(out_.logits, clips, weights)
                else:
                    rec = reconstruction_loss(
                        out_.recon.float(), clips, cfg.loss.reconstruction, weights
                    )
                loss_g = rec + out_.quantizer_loss
                logs = {"rec": rec.item(), "quant": out_.quantizer_loss.item()}
                if cfg.loss.gradient_weight > 0:
                    gdl = gradient_difference_loss(
                        out_.recon.float(), clips, cfg.loss.reconstruction
                    )
                    loss_g = loss_g + cfg.loss.gradient_weight * gdl
                    logs["gdl"] = gdl.item()
                if perceptual is not None:
                    p_loss = perceptual(out_.recon.float(), clips)
                    loss_g = loss_g + cfg.loss.perceptual_weight * p_loss
                    logs["perceptual"] = p_loss.item()
                if gan_on:
                    # Through the discriminator itself, not its DDP wrapper, and frozen. Not
                    # frozen under FSDP2: there the weights it leaves unsharded after a forward
                    # pass (root, last block) then got no gradient in the discriminator's update;
                    # the gradients they get here are cleared before that update.
                    disc.requires_grad_(rt.sharded)
                    with rt.autocast():
                        g_loss = generator_loss(unwrap(disc)(out_.recon))
                    weight = torch.ones((), device=device)
                    if cfg.loss.adaptive_gan_weight:  # per micro-batch
                        last_layer = tokenizer.decoder.last_layer
                        weight = adaptive_generator_weight(loss_g, g_loss, last_layer)
                    loss_g = loss_g + cfg.loss.gan_weight * weight * g_loss
                    logs |= {"g": g_loss.item(), "g_weight": weight.item()}
                    disc.requires_grad_(True)
                (loss_g / cfg.grad_accum).backward()
            g_logs.append(logs)
            stat_logs.append({k: v.item() for k, v in out_.stats.items()})
            recons.append(out_.recon.detach())

        # 3. tokenizer update
        if cfg.optim.grad_clip > 0:
            clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt_g.step()
        logs = _mean(g_logs)

        # 4. discriminator update, over the same micro-batches
        if gan_on:
            opt_d.zero_grad(set_to_none=True)
            d_logs = []
            for m, (clips, recon) in enumerate(zip(micro, recons, strict=True)):
                with nullcontext() if m == len(micro) - 1 else no_gradient_sync(disc):
                    # one forward pass over both halves: DDP and FSDP expect one per backward
                    with rt.autocast():
                        real, fake = disc(torch.cat([clips, recon])).chunk(2)  # (B / accum,) each
                    # LeCam's running means move once per micro-batch
                    loss_d = discriminator_hinge_loss(real.float(), fake.float())
                    loss_d = loss_d + cfg.loss.lecam_weight * lecam(real.float(), fake.float())
                    (loss_d / cfg.grad_accum).backward()
                d_logs.append({"d": loss_d.item()})
            if cfg.optim.grad_clip > 0:
                clip_grad_norm_(disc.parameters(), cfg.optim.grad_clip)
            opt_d.step()
            logs |= _mean(d_logs)

        # 5. EMA of the weights
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), tokenizer.parameters(), strict=True):
                    e.lerp_(p, 1 - cfg.ema_decay)
                for e, b in zip(ema.buffers(), tokenizer.buffers(), strict=True):
                    e.copy_(b)
        step += 1

        # 6. logs (means over micro-batches and ranks), evaluation, previews, checkpoints
        logs = mean_over_ranks(logs | (_mean(stat_logs) if stat_logs[0] else {}))
        bar.update(1)
        usage = f"{logs['usage']:.3f}" if "usage" in logs else "-"  # "-": not quantized yet
        bar.set_postfix(rec=f"{logs['rec']:.4f}", usage=usage, refresh=False)
        elapsed = time.monotonic() - started
        refitted = refit.observe(step, time.monotonic() - began, (quantized, gan_on), elapsed)
        if refitted is not None:  # a budgeted run whose steps took longer or shorter than timed
            cfg = refitted
            bar.total = cfg.steps
            if rt.main:
                atomic_write_text(out / "config.json", config_json(cfg))
        record = {"step": step, "lr": lr, "elapsed_s": round(elapsed, 3), **logs}
        done = step == cfg.steps or (
            cfg.max_minutes > 0 and rt.agree(elapsed > 60 * cfg.max_minutes)
        )
        if step % cfg.eval_every == 0 or done:
            # every rank evaluates all clips (FSDP needs every rank for a forward pass)
            result = evaluate(evaluated, eval_clips)
            record |= {f"eval_{k}": v for k, v in result.items()}
            said = (
                f"step {step}: {'held-out' if held_out else 'eval'} PSNR {result['psnr']:.2f} dB, "
                f"SSIM {result['ssim']:.4f}"
            )
            if rt.main and progress:
                bar.write(said)
            else:  # quiet: a calibration, a test
                log.debug(said)
            if best is not None and rt.agree(best.improves(result)):
                build = functools.partial(VideoTokenizer, cfg.model)
                save_export(ema or model, rt, build, best.directory)
                about = {"evaluated_on": evaluated_on, "held_out": held_out}
                best.record(step, result, write=rt.main, **about)
        if step % cfg.log_every == 0 or "eval_psnr" in record:
            metrics.write(record)
        if step % cfg.preview_every == 0 or done:
            frames = preview_frames(evaluated, eval_clips[:4])
            if rt.main:
                (out / "previews").mkdir(exist_ok=True)
                write_preview(frames, out / "previews" / f"step_{step:07d}", cfg.data.fps)
        if step % cfg.checkpoint_every == 0 or done or refitted is not None:
            extra = {"step": step, "data_position": dict(position)}
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
    export = out / "export"
    save_export(ema or model, rt, lambda: VideoTokenizer(cfg.model), export)
    barrier()
    return export
