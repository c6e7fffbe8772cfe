"""``loong recipe shapes``: the bundled model, from nothing, on a laptop CPU.

One command runs the whole pipeline on the shapes world (``specs/shapes-world.md``):

1. **tokenizer** — train the ``shapes`` video tokenizer
   (:func:`~loong.train.tokenizer.train_tokenizer`), or copy an existing export
   (``tokenizer_from``);
2. **tokenizer_long** — off by default: train it a few hundred steps more on clips as long as
   the LM's (:class:`LongClipsConfig`), so that it encodes and decodes the same way past its
   training clips' length;
3. **shards** — tokenize shapes-world clips of 33 frames and stills into token shards, and train
   the BPE text tokenizer on their captions (:func:`~loong.data.shards.tokenize_dataset`); and
   a few hundred clips of other seeds as held-out shards, on which the LM's evaluation runs;
4. **lm** — train the ``shapes`` language model with Loong's progressive short-to-long stages
   and loss re-weighting (:func:`~loong.train.lm.train_lm`);
5. **bundle** — write both models in float16 as one directory that ``loong generate`` loads
   (:func:`write_bundle`): ``lm/`` (with ``generation.json`` pointing at ``../tokenizer``) and
   ``tokenizer/``.

With a time budget (``minutes``, 90 by default) a calibration comes first: a few real steps
of each phase are timed on this machine, and when the configured steps would not fit in the
budget every step count is scaled down by one factor so that they do (:mod:`loong.recipe_budget`);
on a machine fast enough nothing changes. The tokenizer and the language model then train as
budgeted runs of their own (their ``budget.json``): each stops at its minutes and re-fits its
steps from its own step times (each kind of step against its own timing) when they run more
than 10% off the calibration. The
tokenizer's minutes are its share of the fitted recipe's projection; the language model's, last,
are what the phases before it left of the budget. When the tokenizer's steps show the
calibration off, the shards' clips follow them and the language model's steps are timed again.

Every step resumes: the training steps from their checkpoints, tokenizing from its finished
shards, and a finished step is skipped (``recipe.json`` records it with its wall time and final
losses, and the budget's factor, which a resumed run keeps). Run directory::

    OUT/
      recipe.json        calibration (seconds of each unit of work) and the hash of the
                         config it timed, budget (factor), steps done, seconds each, final
                         losses
      config.json        the recipe's config, its step counts scaled to the budget (the
                         tokenizer's and the LM's as their own budget.json and
                         config.json say)
      tokenizer/ tokenizer_long/ shards/ eval_shards/ lm/   the runs
      bundle/            lm/ + tokenizer/, float16 (≈ 20 MB)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loong.config import config_json
from loong.data.shards import TokenizeConfig, tokenize_dataset
from loong.generate import GenerationMetadata
from loong.lm.model import VideoLM
from loong.pretrained import atomic_write_text
from loong.recipe_budget import Costs, calibrate, factor, minutes_of, project, scale
from loong.text_tokenizer import TOKENIZER_FILE
from loong.train.budget import (
    BUDGET_FILE,
    LM,
    REFIT_TOLERANCE,
    TOKENIZER,
    Run,
    RunKind,
    budget_from_costs,
    calibrate_lm,
    config_sha256,
    tokenizer_seconds,
)
from loong.train.lm import train_lm
from loong.train.lm_config import LMTrainConfig, lm_train_preset
from loong.train.parallel import cpu_has_bf16
from loong.train.tokenizer import train_tokenizer
from loong.train.tokenizer_config import TokenizerTrainConfig, tokenizer_train_preset
from loong.video_tokenizer.model import VideoTokenizer, VideoTokenizerConfig

log = logging.getLogger("loong")

RECIPE_FILE = "recipe.json"
CALIBRATED_CONFIG = "calibrated_config"
"""``recipe.json``'s hash of the config (less ``minutes``) its calibration and factor were made
for: a calibration is reused only for the same config."""
STEPS = ("tokenizer", "tokenizer_long", "shards", "lm", "bundle")
TOKENIZER_METRICS = ("rec", "eval_psnr", "eval_ssim", "eval_codebook_usage", "elapsed_s")
"""What ``recipe.json`` records of a tokenizer run: its last values in ``metrics.jsonl``."""
EVAL_SEED = 1_000_003
"""Seed offset of the held-out clips: shapes-world item i of seed s is drawn from (s, i), so
another seed gives other scenes."""


def shapes_shards() -> TokenizeConfig:
    """Shapes-world clips of 33 frames (t = 9): 4 s at 8 fps, cropped to t = 5 and 1 in training.

    8,000 clips: the LM sees each about three times. With 3,000 (about nine times each) its
    loss on fresh clips was 14% above that on its training clips (BENCHMARKS.md). One clip at a
    time: on a CPU the encoder is bound by memory traffic (padding, SiLU and norms over whole
    batches), and with 16 clips at once the step took 10.4 min instead of 4.9, for the same ids
    (all but one of about 4.2 million; BENCHMARKS.md)."""
    return TokenizeConfig(
        source="shapes",
        n_clips=8000,
        n_frames=33,
        size=64,
        fps=8.0,
        still_share=0.1,
        n_paraphrases=2,
        text_vocab_size=512,
        batch_size=1,
    )


def recipe_tokenizer() -> TokenizerTrainConfig:
    """The ``shapes`` tokenizer preset, its decoder reading the encoder's latent unquantized for
    the first 1,800 of its 3,600 steps (``continuous_steps``). The bundled tokenizer is such a
    run: the world's videos through it pass the shape check more often than through the
    preset's (0.38 against 0.31), and the LM on it passed all five fidelity checks in 55
    windows of 560 against 36 on the preset's (one run each). One such run in two lost colours
    instead (BENCHMARKS.md)."""
    return dataclasses.replace(tokenizer_train_preset("shapes"), continuous_steps=1800)


@dataclass(kw_only=True)
class LongClipsConfig:
    """The recipe's second tokenizer run: the first's export trained further on long clips.

    The tokenizer's causal convolutions see more past frames than its 9-frame training clips
    hold, so on longer videos (the LM's 33-frame clips, a minute's decoding) they meet histories
    they never trained on. One 7,200-step run drew a red and a green circle orange in much of an
    81-frame video after frame 16, and right when the same frames came as fresh 9-frame clips;
    400 steps on 33-frame clips brought every colour back (BENCHMARKS.md, "Long clips for the
    tokenizer"). On the recipe's own tokenizer they lifted the LM's prompt fidelity in the first
    ten seconds (73 windows of 560 against 55) and lowered it in the minute's second half ("The
    recipe on long-clip tokenizers"), so the step is off unless ``steps`` is set (400 is what was
    measured). The run copies the tokenizer step's training config with these changes, from its
    weights (a fresh optimizer and EMA), and without a GAN phase."""

    steps: int = 0
    """Steps on long clips (400 measured); 0 skips the step, and the first run's export is used
    as it is."""
    n_frames: int = 33
    """Frames a clip (1 + 4k): the LM's clips are 33 frames."""
    lr: float = 5e-4
    """Peak learning rate (warm-up and decay as the tokenizer step's)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"tokenizer_long.steps must be >= 0 (0 skips it), got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"tokenizer_long.lr must be > 0, got {self.lr}")

    def train_config(
        self, base: TokenizerTrainConfig, model: VideoTokenizerConfig, init_from: Path
    ) -> TokenizerTrainConfig:
        """``base`` (the tokenizer step's config) as this long-clip run of ``model``'s weights at
        ``init_from``."""
        return dataclasses.replace(
            base,
            model=model,
            init_from=str(init_from),
            steps=self.steps,
            continuous_steps=0,
            eval_every=self.steps,
            data=dataclasses.replace(base.data, n_frames=self.n_frames),
            optim=dataclasses.replace(base.optim, lr=self.lr),
            loss=dataclasses.replace(base.loss, disc_start_step=self.steps),
        )


@dataclass(kw_only=True)
class ShapesRecipeConfig:
    tokenizer: TokenizerTrainConfig = field(default_factory=recipe_tokenizer)
    """Video tokenizer training (preset ``shapes``, warm-started; see :func:`recipe_tokenizer`)."""
    tokenizer_from: str = ""
    """A video tokenizer export (config.json + model.safetensors) to use instead of training one:
    the tokenizer step copies it to ``OUT/tokenizer/export``, so an LM experiment can reuse the
    bundled tokenizer (``src/loong/models/shapes/tokenizer``) or another run's. The long-clip
    step runs on it too when ``tokenizer_long.steps`` is set."""
    tokenizer_long: LongClipsConfig = field(default_factory=LongClipsConfig)
    """The tokenizer trained further on the LM's clip length (after ``tokenizer_from`` too)."""
    shards: TokenizeConfig = field(default_factory=shapes_shards)
    """What is tokenized for the LM; ``video_tokenizer`` is filled in by the recipe."""
    eval_clips: int = 256
    """Held-out clips for the LM's evaluation: ``shards`` with this many clips and another seed
    (0: evaluate on a fixed sample of the training clips instead)."""
    lm: LMTrainConfig = field(default_factory=lambda: lm_train_preset("shapes"))
    """Language model training (preset ``shapes``); ``data.shards`` is filled in by the recipe."""
    bundle_dtype: str = "float16"
    """Weight dtype of the bundle: "float16", "bfloat16" or "float32"."""
    minutes: float = 90.0
    """Wall-time budget of the whole recipe, calibration included: when this machine would take
    longer for the configured steps, every step count is scaled down to fit (see
    :mod:`loong.recipe_budget`); never up. 0: no budget, every configured step runs."""
    reencode: bool = False
    """The bundle's default for the sliding window's video-token re-encoding (its
    ``generation.json``). Off: with the preset's LM, windows of one-minute videos passed all
    checks about twice as often without it, as its objects grew with it (BENCHMARKS.md, "The
    recipe with a 5,000-step last LM stage"); ``loong generate --set reencode=true`` turns it
    on for one run."""

    def __post_init__(self) -> None:
        if self.eval_clips < 0:
            raise ValueError(f"eval_clips must be >= 0, got {self.eval_clips}")
        if not (math.isfinite(self.minutes) and self.minutes >= 0):
            raise ValueError(f"minutes must be >= 0 (0: no time budget), got {self.minutes}")
        for phase in ("tokenizer", "lm"):
            if getattr(self, phase).budget_minutes:
                raise ValueError(
                    f"{phase}.budget_minutes: the recipe fits all its phases to one budget "
                    f"together; give --minutes M instead and leave {phase}.budget_minutes at 0"
                )
        if self.tokenizer_from and not (Path(self.tokenizer_from) / "config.json").is_file():
            raise ValueError(
                f"tokenizer_from={self.tokenizer_from!r} is not a video tokenizer export (no "
                "config.json in it): give the directory `loong tokenizer train` exports to, "
                "e.g. RUN/export, or leave it empty to train one"
            )
        kind = self._quantizer_kind()
        if self.lm.model.video_code_bits and kind != "lfq":
            raise ValueError(
                f"lm.model.video_code_bits={self.lm.model.video_code_bits} reads video ids as "
                f"LFQ codes, but the video tokenizer's quantizer is {kind!r}: add --set "
                f"lm.model.video_code_bits=0"
            )
        if self.bundle_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(
                f"bundle_dtype must be float16, bfloat16 or float32, got {self.bundle_dtype!r}"
            )

    def _quantizer_kind(self) -> str:
        """The quantizer of the video tokenizer the LM's ids will come from."""
        if self.tokenizer_from:
            saved = json.loads((Path(self.tokenizer_from) / "config.json").read_text())
            return saved["config"]["quantizer"]["kind"]
        return self.tokenizer.model.quantizer.kind


def write_bundle(
    lm_dir: str | Path,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    reencode: bool | None = None,
) -> Path:
    """An LM export and its video tokenizer as one self-contained directory ``out``.

    ``out/lm`` holds the LM (weights cast to ``dtype``), its ``tokenizer.json`` and a
    ``generation.json`` whose ``video_tokenizer`` is ``../tokenizer`` (and whose ``reencode`` is
    ``reencode``, unless None keeps the export's); ``out/tokenizer`` holds the
    video tokenizer. Loading casts the weights back to float32. Returns ``out/lm``, the
    directory ``loong generate --model`` takes.
    """
    lm_dir, out = Path(lm_dir), Path(out)
    meta = GenerationMetadata.read(lm_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    VideoLM.from_pretrained(lm_dir).to(dtype).save_pretrained(tmp / "lm")
    VideoTokenizer.from_pretrained(tokenizer_dir).to(dtype).save_pretrained(tmp / "tokenizer")
    shutil.copyfile(lm_dir / TOKENIZER_FILE, tmp / "lm" / TOKENIZER_FILE)
    meta.video_tokenizer = "../tokenizer"
    if reencode is not None:
        meta.reencode = reencode
    meta.write(tmp / "lm")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the bundle appears whole or not at all
    return out / "lm"


def _last_metrics(path: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The latest value of each of ``keys`` in a metrics.jsonl file."""
    found: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found |= {k: record[k] for k in keys if k in record}
    return found


def _own_factor(run: Path) -> dict[str, float]:
    """A phase's own budget factor (perhaps re-fitted) for ``recipe.json``; {} without one."""
    path = run / BUDGET_FILE
    return {"factor": json.loads(path.read_text())["factor"]} if path.is_file() else {}


def _warn_if_fp32_cpu(lm: LMTrainConfig, minutes: float = 0.0) -> None:
    """Say so when the LM, the recipe's longest step, will train on a CPU without native bf16,
    where its "auto" precision stays fp32 and the configured steps take far longer than the
    README says."""
    on_cpu = lm.device == "cpu" or (lm.device == "auto" and not torch.cuda.is_available())
    if on_cpu and lm.parallel.cpu_mixed_precision == "auto" and not cpu_has_bf16():
        fit = (
            f"within --minutes {minutes:g} it trains on fewer steps, a weaker model; --minutes 0 "
            "runs them all"
            if minutes > 0
            else "every step resumes if stopped"
        )
        log.warning(
            "recipe: this CPU has no native bf16 (AVX-512 BF16 or AMX), so the recipe trains in "
            "fp32: the preset's steps take about 3 hours on 2 cores (projected), against 1 "
            'hour with bf16 (BENCHMARKS.md, "The recipe on a CPU without AVX-512"); %s',
            fit,
        )


def _fit_budget(cfg: ShapesRecipeConfig, out: Path, state: dict[str, Any]) -> ShapesRecipeConfig:
    """``cfg`` scaled to its time budget: calibrated on a first run and recorded in ``state``
    (the caller writes it), the recorded factor on a resumed one."""
    configured = config_sha256(dataclasses.replace(cfg, minutes=0.0))
    if "budget" in state:
        budget = state["budget"]
        log.info("recipe: the budget's factor %.3f, from this run's calibration", budget["factor"])
        if cfg.minutes != budget["minutes"]:
            log.warning(
                "recipe: this run started with a budget of %g min and keeps its step counts; "
                "--minutes %g applies to a new --out",
                budget["minutes"],
                cfg.minutes,
            )
        if state.get(CALIBRATED_CONFIG, configured) != configured:
            log.warning(
                "recipe: the config changed since this run's budget was fitted; its factor "
                "%.3f scales the new step counts, unprojected (a new --out fits them anew)",
                budget["factor"],
            )
        return scale(cfg, budget["factor"])
    if cfg.minutes <= 0:
        return cfg
    if any(name in state or (out / name).exists() for name in STEPS):
        log.warning(
            "recipe: this run started without a time budget, so its steps stay as configured; "
            "--minutes %g applies to a new --out",
            cfg.minutes,
        )
        return cfg
    if "calibration" in state and state.get(CALIBRATED_CONFIG) == configured:
        # an earlier try's, refused as too short: the same machine and config
        costs = Costs.from_record(state["calibration"])
    else:
        log.info("recipe: calibrating: a few steps of each phase, to fit %g min", cfg.minutes)
        costs = calibrate(cfg, out / "calibration")
        state["calibration"] = dataclasses.asdict(costs)
        state[CALIBRATED_CONFIG] = configured
        atomic_write_text(out / RECIPE_FILE, json.dumps(state, indent=2) + "\n")
    share = factor(cfg, costs, cfg.minutes)
    full, fitted = minutes_of(cfg, costs), minutes_of(scale(cfg, share), costs)
    state["budget"] = {
        "minutes": cfg.minutes,
        "factor": share,
        "projected_min": round(full, 1),
        "fitted_min": round(fitted, 1),
    }
    if share < 1:
        log.warning(
            "recipe: the configured steps would take %.1f min here (projected), over the budget "
            "of %g: every step count is scaled by %.2f (projected %.1f min); --minutes 0 runs "
            "them all",
            full,
            cfg.minutes,
            share,
            fitted,
        )
    else:
        log.info("recipe: projected %.1f min, within the budget of %g", full, cfg.minutes)
    return scale(cfg, share)


def _own_budget(
    phase: str,
    kind: RunKind[Run],
    costs: Any,
    configured: Run,
    fitted: Run,
    out: Path,
    minutes: float,
    state: dict[str, Any],
) -> Run:
    """The recipe's ``phase`` as a budgeted run of its own in ``out`` (``out/budget.json``): its
    steps (``configured``, unscaled) fitted anew to ``minutes`` at the recipe's calibrated
    ``costs`` (their calibration already spent), so that it stops there and re-fits its factor
    once from its own steps when they run slower or faster than calibrated
    (``loong.train.budget.Refit``). ``fitted`` (the recipe's share of the steps, unstopped) when
    not even a twentieth of the steps fits, or when the phase started without a budget of its
    own (a resumed run keeps the one it has)."""
    try:
        run = budget_from_costs(configured, out, kind, costs, minutes)
        return fitted if run is None else run
    except ValueError:
        log.warning(
            "recipe: %.1f min of the budget of %g are for the %s, too few for its steps: it "
            "trains the recipe's share of them (%.2f), past its minutes",
            minutes,
            state["budget"]["minutes"],
            phase,
            state["budget"]["factor"],
        )
        return fitted


def _budget_tokenizer(
    configured: ShapesRecipeConfig, fitted: ShapesRecipeConfig, out: Path, state: dict[str, Any]
) -> TokenizerTrainConfig:
    """The tokenizer phase of a budgeted recipe as a budgeted run of its own (:func:`_own_budget`),
    given the share of the budget after the calibration that it takes of the fitted recipe's
    projection. The share, not the projected minutes: when the calibration ran slow (a busy
    minute) every phase is projected too long by the same ratio, and the tokenizer's re-fit then
    fills its share of the real minutes with steps instead of ending early."""
    budget, calibration = state["budget"], state["calibration"]
    costs = Costs.from_record(calibration)
    mine = sum(tokenizer_seconds(fitted.tokenizer, costs.tokenizer()))
    share = mine / sum(project(fitted, costs))
    minutes = share * (budget["minutes"] - calibration["seconds"] / 60)
    tokenizer = dataclasses.replace(costs.tokenizer(), seconds=0.0)
    return _own_budget(
        "tokenizer",
        TOKENIZER,
        tokenizer,
        configured.tokenizer,
        fitted.tokenizer,
        out,
        minutes,
        state,
    )


def _tokenizer_ratio(out: Path) -> float | None:
    """How many times their calibrated time a budgeted recipe's tokenizer steps took, when its
    re-fit found them more than ``REFIT_TOLERANCE`` off (the calibration ran at another speed
    than the machine's now: a busy minute); None otherwise."""
    path = out / "tokenizer" / BUDGET_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    ratio = record.get("refit", {}).get("step_ratio")
    return ratio if ratio is not None and abs(ratio - 1) > REFIT_TOLERANCE else None


def _shard_clips(configured: ShapesRecipeConfig, fitted: ShapesRecipeConfig, out: Path) -> int:
    """The training clips of a budgeted recipe's shards: the recipe's share of them, divided by
    the ratio of the tokenizer's first steps to their calibrated time when it is off
    (:func:`_tokenizer_ratio`: the same machine tokenizes a clip that much faster or slower than
    the calibration timed), at most the configured clips. So the shards too fill the minutes the
    projection gave them after a calibration timed in a busy minute."""
    ratio = _tokenizer_ratio(out)
    if ratio is None:
        return fitted.shards.n_clips
    clips = max(1, min(configured.shards.n_clips, round(fitted.shards.n_clips / ratio)))
    log.info(
        "recipe: the tokenizer's steps took %.2f× their calibrated time: %d shard clips, not %d",
        ratio,
        clips,
        fitted.shards.n_clips,
    )
    return clips


def _budget_lm(
    configured: LMTrainConfig, fitted: LMTrainConfig, out: Path, state: dict[str, Any]
) -> LMTrainConfig:
    """The LM phase of a budgeted recipe as a budgeted run of its own (:func:`_own_budget`),
    given the minutes the phases before it left of the recipe's budget: so the LM takes up what
    they left or overran. When the tokenizer's steps showed the calibration off
    (:func:`_tokenizer_ratio`), the LM's steps are timed again first, on the shards just made:
    a busy minute slows the steps of each latent length by its own ratio, and the LM's re-fit
    times only its first stage's (the time this takes comes out of the LM's minutes)."""
    budget, calibration = state["budget"], state["calibration"]
    before = STEPS[: STEPS.index("lm")]
    spent = calibration["seconds"] + sum(state[name]["seconds"] for name in before if name in state)
    left = budget["minutes"] - spent / 60
    costs = Costs.from_record(calibration).lm()
    ratio = _tokenizer_ratio(out.parent)
    started = (out / BUDGET_FILE).is_file() or any((out / "checkpoints").glob("*"))
    if ratio is not None and not started:
        log.warning(
            "recipe: the tokenizer's steps took %.2f× their calibrated time, so the calibration "
            "ran at another speed than this machine's now: timing the language model's steps "
            "again",
            ratio,
        )
        shutil.rmtree(out / "calibration", ignore_errors=True)
        try:
            costs = calibrate_lm(configured, out / "calibration")
        finally:
            shutil.rmtree(out / "calibration", ignore_errors=True)
        left -= costs.seconds / 60
        costs = dataclasses.replace(costs, seconds=0.0)
    return _own_budget("language model", LM, costs, configured, fitted, out, left, state)


def run_shapes_recipe(
    cfg: ShapesRecipeConfig, out_dir: str | Path, *, progress: bool = True
) -> Path:
    """Run (or resume) the shapes recipe in ``out_dir``; returns the bundle's LM directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _warn_if_fp32_cpu(cfg.lm, cfg.minutes)
    state_path = out / RECIPE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    configured, cfg = cfg, _fit_budget(cfg, out, state)
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    atomic_write_text(out / "config.json", config_json(cfg))  # the steps that run

    def step(name: str, run) -> None:
        if name in state:
            log.info("recipe: %s done earlier (%.0f s), skipped", name, state[name]["seconds"])
            return
        log.info("recipe: %s", name)
        started = time.monotonic()
        result = run() or {}
        state[name] = {"seconds": round(time.monotonic() - started, 1), **result}
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")

    def tokenizer() -> dict[str, float]:
        if cfg.tokenizer_from:
            export = out / "tokenizer" / "export"
            VideoTokenizer.from_pretrained(cfg.tokenizer_from).save_pretrained(export)
            log.info("recipe: tokenizer from %s, not trained", cfg.tokenizer_from)
            return {}
        run = cfg.tokenizer
        if "budget" in state:
            run = _budget_tokenizer(configured, cfg, out / "tokenizer", state)
        train_tokenizer(run, out / "tokenizer", progress=progress)
        result = _last_metrics(out / "tokenizer" / "metrics.jsonl", TOKENIZER_METRICS)
        return result | _own_factor(out / "tokenizer")

    def tokenizer_long() -> dict[str, float]:
        if cfg.tokenizer_long.steps == 0:
            log.info("recipe: tokenizer_long.steps=0, the tokenizer stays as trained")
            return {}
        if "shards" in state:  # the shards were made from the first export: keep them as they are
            log.info("recipe: shards made without tokenizer_long; not run (use a new --out)")
            return {}
        first = out / "tokenizer" / "export"
        model = VideoTokenizer.from_pretrained(first).config
        train = cfg.tokenizer_long.train_config(cfg.tokenizer, model, first)
        train_tokenizer(train, out / "tokenizer_long", progress=progress)
        return _last_metrics(out / "tokenizer_long" / "metrics.jsonl", TOKENIZER_METRICS)

    def video_tokenizer() -> Path:
        """The export the shards and the bundle use: the long-clip run's when there is one."""
        long = out / "tokenizer_long" / "export"
        return long if (long / "config.json").is_file() else out / "tokenizer" / "export"

    def shards() -> dict[str, float]:
        clips = _shard_clips(configured, cfg, out) if "budget" in state else cfg.shards.n_clips
        tokenize = dataclasses.replace(
            cfg.shards, n_clips=clips, video_tokenizer=str(video_tokenizer())
        )
        tokenize_dataset(tokenize, out / "shards", progress=progress)
        if cfg.eval_clips:
            held_out = dataclasses.replace(
                tokenize, n_clips=cfg.eval_clips, seed=cfg.shards.seed + EVAL_SEED
            )
            tokenize_dataset(held_out, out / "eval_shards", progress=progress)
        return {"clips": clips}

    def lm() -> dict[str, float]:
        data = dataclasses.replace(
            cfg.lm.data,
            shards=(str(out / "shards"),),
            eval_shards=str(out / "eval_shards") if cfg.eval_clips else "",
        )
        run = dataclasses.replace(cfg.lm, data=data)
        if "budget" in state:
            run = _budget_lm(dataclasses.replace(configured.lm, data=data), run, out / "lm", state)
        train_lm(run, out / "lm", progress=progress)
        result = _last_metrics(out / "lm" / "metrics.jsonl", ("loss", "eval_loss"))
        return result | _own_factor(out / "lm")

    def bundle() -> dict[str, float]:
        lm_dir = write_bundle(
            out / "lm" / "export",
            video_tokenizer(),
            out / "bundle",
            dtype=getattr(torch, cfg.bundle_dtype),
            reencode=cfg.reencode,
        )
        size = sum(f.stat().st_size for f in lm_dir.parent.rglob("*") if f.is_file())
        return {"megabytes": round(size / 2**20, 2)}

    for name, run in zip(STEPS, (tokenizer, tokenizer_long, shards, lm, bundle), strict=True):
        step(name, run)
    total = sum(state[name]["seconds"] for name in STEPS)
    total += state.get("calibration", {}).get("seconds", 0.0)
    log.info("recipe: done in %.1f min; bundle %s", total / 60, out / "bundle")
    return out / "bundle" / "lm"
