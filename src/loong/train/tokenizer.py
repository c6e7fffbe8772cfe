"""Training loop of the video tokenizer: reconstruction + quantizer + perceptual + GAN losses.

One linear loop in numbered phases. The run directory holds the resolved config, checkpoints
(atomic, resumed exactly: models, optimizers, EMA, step, data position, RNG), ``metrics.jsonl``,
reconstruction previews (original | reconstruction, mp4 and GIF) and the export
(``export/config.json`` + ``export/model.safetensors``, EMA weights when EMA is on).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader
from tqdm import tqdm

from loong.config import config_json
from loong.data.shapes import ShapesWorld, ShapesWorldConfig
from loong.data.sources import source_kind
from loong.data.video import VideoFolder, tensor_to_frames, write_video
from loong.evaluate.metrics import psnr, ssim
from loong.pretrained import atomic_write_text
from loong.train.dist import all_true, barrier
from loong.train.optim import OptimConfig
from loong.train.parallel import (
    ParallelConfig,
    clip_grad_norm_,
    no_gradient_sync,
    parallelize,
    unwrap,
)
from loong.train.runtime import (
    MetricsLog,
    Runtime,
    load_state,
    mean_over_ranks,
    save_export,
    save_state,
    start,
)
from loong.video_tokenizer.discriminator import Discriminator3D, DiscriminatorConfig
from loong.video_tokenizer.losses import (
    LeCam,
    PerceptualLoss,
    adaptive_generator_weight,
    discriminator_hinge_loss,
    generator_loss,
    reconstruction_loss,
)
from loong.video_tokenizer.model import VideoTokenizer, VideoTokenizerConfig
from loong.video_tokenizer.quantize import code_stats

log = logging.getLogger("loong")

HELD_OUT_SEED_OFFSET = 1_000_003
"""Evaluation clips of the shapes world come from seed + this offset, never seen in training."""


@dataclass(kw_only=True)
class TokenizerDataConfig:
    source: str = "shapes"
    """"shapes" for the shapes world; WebDataset tar shards of video + caption: a ``.tar`` file,
    a brace pattern (``data/train-{000000..000009}.tar``) or a folder with ``.tar`` files directly
    in it; any other folder: videos (mp4/webm/mkv/gif/…), searched recursively. Under torchrun
    each rank reads its own tar shards (see ``training_batches``)."""
    n_frames: int = 17
    """Frames per training clip: 1 + 4k."""
    size: int = 64
    """Clips are centre-cropped and resized to size × size."""
    fps: float = 8.0
    """Frame rate clips are resampled to (folders) or labelled with (shapes world)."""
    batch_size: int = 8
    """Clips per step (the global batch: under torchrun each rank takes an equal share)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    seed: int = 0
    """Seed of the data order (and of the shapes world)."""
    eval_folder: str = ""
    """Folder of held-out videos for evaluation; empty: held-out shapes-world clips."""

    def __post_init__(self) -> None:
        if (self.n_frames - 1) % 4:
            lo = self.n_frames - (self.n_frames - 1) % 4
            raise ValueError(
                f"data.n_frames must be 1+4k, got {self.n_frames}: pass {lo} or {lo + 4}"
            )
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class TokenizerLossConfig:
    reconstruction: str = "l1"
    """"l1" or "l2" pixel loss."""
    perceptual_weights: str = ""
    """VGG16 weights file (torchvision key names) for the perceptual loss; empty: off."""
    perceptual_weight: float = 0.1
    """Weight of the perceptual loss when on."""
    gan_weight: float = 0.1
    """Weight of the generator's GAN loss (times the adaptive weight)."""
    adaptive_gan_weight: bool = True
    """Scale the GAN loss by VQGAN's gradient-norm ratio at the decoder's last layer."""
    disc_start_step: int = 2000
    """Step at which the discriminator and the GAN loss switch on."""
    lecam_weight: float = 0.001
    """Weight of the LeCam regulariser on the discriminator."""


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    model: VideoTokenizerConfig = field(default_factory=VideoTokenizerConfig)
    """The tokenizer to train."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """The 3D discriminator of the GAN loss."""
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    """Training clips."""
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    """Loss terms and weights."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.0, 0.99)))
    """Optimiser and schedule (MAGVIT-v2: Adam, lr 1e-4, betas (0, 0.99))."""
    steps: int = 10_000
    """Training steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: the global batch ``data.batch_size`` is split into
    ``grad_accum`` micro-batches of ``data.batch_size / grad_accum`` clips, each rank taking its
    rows of each. LFQ's batch entropy (and the codebook usage logged) is that of a micro-batch;
    the values logged are means over micro-batches."""
    seed: int = 0
    """Seed of the weights' initialisation."""
    ema_decay: float = 0.999
    """EMA of the weights, exported and evaluated (0: off)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    eval_every: int = 500
    """Steps between held-out PSNR/SSIM evaluations."""
    eval_clips: int = 16
    """Held-out clips per evaluation."""
    preview_every: int = 500
    """Steps between reconstruction previews (mp4 + GIF)."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint and export) after this much wall time of this invocation; 0: off."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda", ...; under torchrun each rank takes its GPU."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism under torchrun (tokenizer and discriminator alike), bf16 autocast on
    CUDA, activation checkpointing, compile."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.data.batch_size % self.grad_accum:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} does not split into grad_accum="
                f"{self.grad_accum} equal micro-batches: pass a data.batch_size that is a "
                f"multiple of {self.grad_accum}, or a grad_accum that divides "
                f"{self.data.batch_size}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def tokenizer_train_preset(name: str) -> TokenizerTrainConfig:
    """A complete training config for a tokenizer preset (see ``loong.video_tokenizer.presets``)."""
    from loong.video_tokenizer.presets import tokenizer_preset

    model = tokenizer_preset(name)
    if name in ("tiny", "shapes"):
        # Sized for 2 CPU cores on the shapes world: short clips, a small discriminator and a
        # higher learning rate than MAGVIT-v2's, whose settings assume days on accelerators.
        return TokenizerTrainConfig(
            model=model,
            discriminator=DiscriminatorConfig(base_width=16, max_width=64, n_blocks=3),
            data=TokenizerDataConfig(n_frames=9, size=64, batch_size=4),
            # shapes: L2, whose gradient fades on the flat background as it is learned and
            # leaves the small objects the bulk of it (L1 keeps ±1 on every background pixel).
            # shapes: no GAN phase within its steps; 300 GAN steps after step 2,400 cost 3.7× a
            # plain step's CPU time and left the fidelity ceiling where it was (BENCHMARKS.md).
            loss=TokenizerLossConfig(
                reconstruction="l2" if name == "shapes" else "l1",
                disc_start_step=3000 if name == "tiny" else 3600,
            ),
            optim=OptimConfig(
                lr=2e-3 if name == "shapes" else 1e-3, betas=(0.9, 0.99), warmup_steps=50
            ),
            # shapes: see BENCHMARKS.md for its time and held-out PSNR on 2 cores
            steps=4000 if name == "tiny" else 3600,
            ema_decay=0.99,
            eval_every=250,
            preview_every=1000,
        )
    return TokenizerTrainConfig(model=model, data=TokenizerDataConfig(n_frames=17, size=128))


# --- data ------------------------------------------------------------------------------------


def shapes_world(cfg: TokenizerDataConfig, *, held_out: bool = False) -> ShapesWorld:
    seed = cfg.seed + (HELD_OUT_SEED_OFFSET if held_out else 0)
    return ShapesWorld(
        ShapesWorldConfig(
            height=cfg.size, width=cfg.size, fps=cfg.fps, n_frames=cfg.n_frames, seed=seed
        )
    )


def training_batches(
    cfg: TokenizerDataConfig, position: dict[str, int], rows: slice | list[int] = slice(None)
) -> Iterator[torch.Tensor]:
    """Endless batches ``(B, C, T, H, W)`` starting at ``position``, which is updated in place;
    ``rows`` of each (one rank's share of the global batch: a slice or row indices, see
    :func:`micro_batch_rows`).

    The shapes world is indexed, so a position is the number of batches drawn and a rank renders
    only its rows; a folder is read in epochs, so a position is (epoch, batches into the epoch),
    resuming skips to it, and every rank decodes the global batch and keeps its rows. Tar shards
    are read in epochs too, but each rank reads only its own shards (``WebVideoDataset``) and
    batches them into its share: see :func:`shard_batches`.
    """
    mine = range(cfg.batch_size)[rows] if isinstance(rows, slice) else rows
    kind = source_kind(cfg.source)
    if kind == "shards":
        yield from shard_batches(cfg, position, len(mine))
        return
    if kind == "shapes":
        world = shapes_world(cfg)
        first = position.setdefault("batches", 0)
        indices = (
            k * cfg.batch_size + i for k in range(first, len(world) // cfg.batch_size) for i in mine
        )
        loader = DataLoader(
            world, batch_size=len(mine), sampler=indices, num_workers=cfg.num_workers
        )
        for _, video in loader:
            position["batches"] += 1
            yield video
        return
    folder = VideoFolder(
        cfg.source, n_frames=cfg.n_frames, size=cfg.size, fps=cfg.fps, seed=cfg.seed
    )
    while True:
        epoch = position.setdefault("epoch", 0)
        skip = position.setdefault("batches", 0)
        folder.set_epoch(epoch)
        loader = DataLoader(
            folder, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True
        )
        n = 0
        for n, video in enumerate(loader, start=1):
            if n <= skip:
                continue
            position["batches"] = n
            yield video[rows]
        if n == 0:
            raise ValueError(
                f"{cfg.source} yields no clips of {cfg.n_frames} frames: {folder.summary()}"
            )
        log.info("epoch %d: %s", epoch, folder.summary())
        position.update(epoch=epoch + 1, batches=0)


def micro_batch_rows(batch_size: int, grad_accum: int, rt: Runtime) -> slice | list[int]:
    """This rank's rows of a global batch of ``batch_size`` split into ``grad_accum``
    micro-batches: its equal share of each micro-batch, micro-batch after micro-batch.

    Micro-batch m is rows [m·b, (m+1)·b) of the global batch (b = batch_size / grad_accum), so
    that it holds the same clips whatever the number of ranks, and so do the terms taken over it
    (LFQ's batch entropy, all-reduced over ranks). One micro-batch: the slice of
    :meth:`Runtime.rows`.
    """
    micro = batch_size // grad_accum
    if grad_accum == 1:
        return rt.rows(batch_size, "data.batch_size")
    if micro % rt.world_size:
        raise ValueError(
            f"data.batch_size={batch_size} in grad_accum={grad_accum} micro-batches of {micro} "
            f"clips does not divide among {rt.world_size} ranks: pass a data.batch_size that is "
            f"a multiple of {grad_accum * rt.world_size}"
        )
    share = rt.rows(micro, "data.batch_size / grad_accum")
    return [m * micro + i for m in range(grad_accum) for i in range(micro)[share]]


def shard_batches(
    cfg: TokenizerDataConfig, position: dict[str, int], share: int
) -> Iterator[torch.Tensor]:
    """Endless batches ``(share, C, T, H, W)`` of this rank's clips from the tar shards
    ``cfg.source``, starting at ``position`` (epoch, batches into it; updated in place).

    Each rank reads a disjoint part of every epoch (``WebVideoDataset`` deals the shards, or their
    samples, out to ranks and DataLoader workers), so the global batch differs from a one-rank
    run's. Ranks step together: an epoch ends for all of them when the first runs out of whole
    batches, so with shards of equal size, a multiple of ranks × workers in number, every clip is
    seen exactly once per epoch; with uneven shares, the longer shares' last batches are left out
    of that epoch. Resume needs the same number of ranks (a position saved by another restarts at
    the next epoch). Bad samples are skipped with a warning and counted in each epoch's summary.
    """
    from loong.data.webdataset import WebVideoDataset

    dataset = WebVideoDataset(
        cfg.source, n_frames=cfg.n_frames, size=cfg.size, fps=cfg.fps, seed=cfg.seed
    )
    if position.setdefault("ranks", dataset.world_size) != dataset.world_size:
        log.warning(
            "the data position was saved by %d ranks, not %d: starting the next epoch",
            position["ranks"],
            dataset.world_size,
        )
        position.update(epoch=position.get("epoch", 0) + 1, batches=0, ranks=dataset.world_size)
    while True:
        epoch = position.setdefault("epoch", 0)
        skip = position.setdefault("batches", 0)
        dataset.set_epoch(epoch)
        loader = iter(
            DataLoader(dataset, batch_size=share, num_workers=cfg.num_workers, drop_last=True)
        )
        n = 0
        while all_true((batch := next(loader, None)) is not None):
            n += 1
            if n <= skip:
                continue
            position["batches"] = n
            yield batch["video"]
        if n == 0:
            raise ValueError(
                f"{cfg.source} yields no batch of {share} clips of {cfg.n_frames} frames on some "
                f"rank: {dataset.summary()}"
            )
        log.info("epoch %d: %s", epoch, dataset.summary())
        position.update(epoch=epoch + 1, batches=0)


def held_out_clips(cfg: TokenizerDataConfig, n: int) -> torch.Tensor:
    """``n`` evaluation clips ``(n, C, T, H, W)``: ``cfg.eval_folder`` or unseen shapes seeds."""
    if cfg.eval_folder:
        folder = VideoFolder(
            cfg.eval_folder, n_frames=cfg.n_frames, size=cfg.size, fps=cfg.fps, shuffle=False
        )
        clips = [clip for _, clip in zip(range(n), folder, strict=False)]
        if not clips:
            raise ValueError(f"{cfg.eval_folder} yields no evaluation clips: {folder.summary()}")
        return torch.stack(clips)
    world = shapes_world(cfg, held_out=True)
    return torch.stack([world[i][1] for i in range(n)])


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
    if rt.main:
        atomic_write_text(out / "config.json", config_json(cfg))
    torch.manual_seed(cfg.seed)
    # Subnormal floats make CPU kernels crawl (a tokenizer step on real video ran 3.5× slower);
    # flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    device = rt.device

    # 0. models, optimisers, losses
    model = VideoTokenizer(cfg.model)
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
    opt_g = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
    opt_d = torch.optim.AdamW(
        disc.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
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
    eval_clips = held_out_clips(cfg.data, cfg.eval_clips).to(device)
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

    while step < cfg.steps:
        # 1. batch: this rank's rows of the global batch, its share of each micro-batch
        video = next(batches).to(device)  # (B, C, T, H, W)
        micro = video.chunk(cfg.grad_accum)  # accum × (B / accum, C, T, H, W)
        lr = cfg.optim.lr_at(step, cfg.steps)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        gan_on = step >= cfg.loss.disc_start_step and cfg.loss.gan_weight > 0

        # 2. tokenizer forward, losses and backward, one micro-batch at a time: gradients are
        # averaged over ranks once, in the last micro-batch's backward. Each reconstruction is
        # kept, detached, for the discriminator's update (no second forward pass).
        model.train()
        opt_g.zero_grad(set_to_none=True)
        g_logs, stat_logs, recons = [], [], []
        for m, clips in enumerate(micro):
            with nullcontext() if m == len(micro) - 1 else no_gradient_sync(model):
                with rt.autocast():
                    out_ = model(clips)
                rec = reconstruction_loss(out_.recon.float(), clips, cfg.loss.reconstruction)
                loss_g = rec + out_.quantizer_loss
                logs = {"rec": rec.item(), "quant": out_.quantizer_loss.item()}
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
        logs = mean_over_ranks(logs | _mean(stat_logs))
        bar.update(1)
        bar.set_postfix(
            rec=f"{logs['rec']:.4f}", usage=f"{logs.get('usage', 0):.3f}", refresh=False
        )
        elapsed = time.monotonic() - started
        record = {"step": step, "lr": lr, "elapsed_s": round(elapsed, 1), **logs}
        done = step == cfg.steps or (
            cfg.max_minutes > 0 and rt.agree(elapsed > 60 * cfg.max_minutes)
        )
        if step % cfg.eval_every == 0 or done:
            # every rank evaluates all clips (FSDP needs every rank for a forward pass)
            result = evaluate(evaluated, eval_clips)
            record |= {f"eval_{k}": v for k, v in result.items()}
            if rt.main:
                bar.write(
                    f"step {step}: held-out PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}"
                )
        if step % cfg.log_every == 0 or "eval_psnr" in record:
            metrics.write(record)
        if step % cfg.preview_every == 0 or done:
            frames = preview_frames(evaluated, eval_clips[:4])
            if rt.main:
                (out / "previews").mkdir(exist_ok=True)
                write_preview(frames, out / "previews" / f"step_{step:07d}", cfg.data.fps)
        if step % cfg.checkpoint_every == 0 or done:
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
