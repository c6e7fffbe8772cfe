"""Configs of video-tokenizer training: data, loss terms, the run, and the presets.

The loop that runs them is :func:`loong.train.tokenizer.train_tokenizer`; where its clips come
from is :mod:`loong.train.tokenizer_data`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loong.train.optim import OptimConfig
from loong.train.parallel import ParallelConfig
from loong.video_tokenizer.discriminator import DiscriminatorConfig
from loong.video_tokenizer.model import VideoTokenizerConfig


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
    """Held-out videos for evaluation (a folder, or tar shards); empty: held-out shapes-world
    clips for the shapes world, ``eval_share`` of a folder's videos for a folder, and the first
    training clips (said in the log) for tar shards."""
    eval_share: float = 0.05
    """A folder of videos without ``eval_folder``: the share of its files held out of training
    for evaluation, picked by a hash of each file's path (``loong.data.video.held_out_files``:
    at least one from 10 files on, none from fewer); 0, or a folder of fewer than 10 files:
    evaluation reads the first training clips, said in the log. The files are listed in
    ``OUT/held_out.json``; a resumed run warns when they changed (files added)."""
    jitter: bool = True
    """Folders: each pass cuts a video's clips from a random first frame, so a pass sees other
    clips than the last (evaluation clips stay fixed)."""
    flip: bool = True
    """Folders: each training clip is mirrored left to right with probability 1/2."""
    shuffle_buffer: int = 64
    """Folders: clips pass through a shuffle buffer of this many, so a batch mixes videos
    instead of holding consecutive clips of one; 0: file order."""

    def __post_init__(self) -> None:
        if (self.n_frames - 1) % 4:
            lo = self.n_frames - (self.n_frames - 1) % 4
            raise ValueError(
                f"data.n_frames must be 1+4k, got {self.n_frames}: pass {lo} or {lo + 4}"
            )
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.eval_share < 1.0:
            raise ValueError(
                f"data.eval_share must be in [0, 1) (0: no held-out videos), got {self.eval_share}"
            )
        if self.shuffle_buffer < 0:
            raise ValueError(
                f"data.shuffle_buffer must be >= 0 (0: off), got {self.shuffle_buffer}"
            )


@dataclass(kw_only=True)
class TokenizerLossConfig:
    reconstruction: str = "l1"
    """"l1" or "l2" pixel loss."""
    edge_weight: float = 0.0
    """Extra weight of the pixel loss near the clip's edges: a pixel weighs 1 + edge_weight × the
    contrast of its 3×3 neighbourhood (``losses.edge_weights``); 0: a plain mean."""
    gradient_weight: float = 0.0
    """Weight of the gradient difference loss (same kind as ``reconstruction``); 0: off."""
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

    def __post_init__(self) -> None:
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(
                f'loss.reconstruction must be "l1" or "l2", got {self.reconstruction!r}'
            )
        for name in (
            "edge_weight",
            "gradient_weight",
            "perceptual_weight",
            "gan_weight",
            "lecam_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


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
    export_best: bool = True
    """Keep ``OUT/best``: the export of the evaluated weights with the highest PSNR on the
    evaluation clips so far, and ``best.json`` with its step and scores (``OUT/export`` is
    always the last weights). A choice by held-out clips when the evaluation reads held-out
    ones (the log says whether it does)."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint and export) after this much wall time of this invocation; 0: off."""
    budget_minutes: float = 0.0
    """Fit the run into this much wall time on this machine: a few real steps are timed first
    and, when the configured steps would not fit, every step count (``steps``,
    ``continuous_steps``, ``loss.disc_start_step``, the event intervals) is scaled by one factor
    so that the whole schedule completes (:mod:`loong.train.budget`); ``max_minutes`` then
    stops the run at the budget at the latest. A resumed run keeps its factor. 0: off, every
    configured step runs. Single-process runs only."""
    init_from: str = ""
    """An exported tokenizer (``config.json`` + ``model.safetensors``) whose weights start the
    run; its model config must equal ``model``. Empty: random initialisation."""
    continuous_steps: int = 0
    """Steps at the start whose decoder reads the encoder's continuous latent, before the
    quantizer comes on for the rest. Through a continuous latent the ``shapes`` model learns
    outlines and corners within a few hundred steps, which it learns far more slowly through a
    quantizer (BENCHMARKS.md); the quantizer then starts from an encoder that already carries
    them. The held-out evaluations always quantize. 0: quantize from the first step."""
    trainable: str = "all"
    """"all", or "decoder": the encoder and quantizer stay frozen (in eval mode) and only the
    decoder learns. With ``init_from`` this fine-tunes how codes are drawn without changing a
    single code, so a language model trained on the tokenizer's ids stays valid."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda", ...; under torchrun each rank takes its GPU."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism under torchrun (tokenizer and discriminator alike), bf16 autocast on
    CUDA (and on CPUs when asked), activation checkpointing; not compile (refused: see
    ``__post_init__``)."""

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
        if self.trainable not in ("all", "decoder"):
            raise ValueError(f'trainable must be "all" or "decoder", got {self.trainable!r}')
        if self.trainable == "decoder" and not self.init_from:
            raise ValueError(
                'trainable="decoder" freezes the encoder, which makes sense only for a trained '
                "one: set init_from to an exported tokenizer directory"
            )
        if not 0 <= self.continuous_steps < self.steps:
            raise ValueError(
                f"continuous_steps must be in [0, steps={self.steps}), got "
                f"{self.continuous_steps}: the quantizer has to train for some steps"
            )
        if self.continuous_steps and self.trainable == "decoder":
            raise ValueError(
                'continuous_steps trains the decoder on a latent that trainable="decoder" never '
                "gives it: set continuous_steps=0"
            )
        if self.parallel.compile:
            raise ValueError(
                "parallel.compile: the tokenizer's blocks pass a streaming cache whose entries "
                "grow block by block, so torch.compile recompiles at nearly every block and "
                "hits its recompile limit (on a CPU the step was 0.82x as fast as eager; "
                "BENCHMARKS.md): set parallel.compile=false"
            )
        cvq = self.model.quantizer.kind == "cvq"
        if self.continuous_steps and cvq and self.parallel.mode == "ddp":
            raise ValueError(
                "DDP needs a gradient for every weight each step, and the CVQ codebook gets none "
                'while continuous_steps run: use parallel.mode="fsdp", or an lfq or fsq quantizer'
            )
        for name in ("max_minutes", "budget_minutes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value}")
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
            # shapes: bf16 where the CPU computes in it natively (the quantizer stays fp32):
            # the same held-out PSNR as fp32, 1.2–1.4× faster (BENCHMARKS.md)
            parallel=ParallelConfig(cpu_mixed_precision="auto" if name == "shapes" else "fp32"),
            # shapes: see BENCHMARKS.md for its time and held-out PSNR on 2 cores
            steps=4000 if name == "tiny" else 3600,
            ema_decay=0.99,
            eval_every=250,
            preview_every=1000,
        )
    return TokenizerTrainConfig(model=model, data=TokenizerDataConfig(n_frames=17, size=128))
