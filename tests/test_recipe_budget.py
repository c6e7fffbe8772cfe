"""The recipe's time budget: every step count scales by one factor, the factor fits the
calibrated projection to the budget, calibration times every phase, and a resumed run keeps
the factor it started with."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
from pathlib import Path

import pytest

from loong import recipe, recipe_budget
from loong.cli import main
from loong.recipe import ShapesRecipeConfig
from loong.recipe_budget import (
    Costs,
    calibrate,
    factor,
    minutes_of,
    project,
    scale,
)
from loong.train import budget
from loong.train import lm as lm_loop
from loong.train import tokenizer as tokenizer_loop
from loong.train.budget import AIM, scale_lm, tokenizer_seconds
from loong.video_tokenizer.model import VideoTokenizer
from test_recipe import TOY, _sets


def _costs(**changes) -> Costs:
    """Costs of the order of a 2-core CPU's (seconds)."""
    values = dict(
        tokenizer_step=0.6,
        tokenizer_gan_step=2.0,
        tokenizer_event=1.5,
        tokenizer_setup=5.0,
        clip=0.05,
        shards_setup=2.0,
        lm_step={1: 0.2, 5: 0.8, 9: 1.6},
        lm_compile=5.0,
        lm_event=3.0,
        lm_setup=8.0,
        seconds=40.0,
    )
    return Costs(**(values | changes))


def test_scale_multiplies_every_step_count_and_keeps_the_rest():
    cfg = ShapesRecipeConfig()
    half = scale(cfg, 0.5)
    tok, scaled = cfg.tokenizer, half.tokenizer
    assert (scaled.steps, scaled.continuous_steps) == (tok.steps // 2, tok.continuous_steps // 2)
    assert scaled.loss.disc_start_step == tok.loss.disc_start_step // 2  # still no GAN phase
    for name in ("eval_every", "preview_every", "checkpoint_every"):  # as many of each
        assert getattr(scaled, name) == getattr(tok, name) // 2
    assert scaled.model == tok.model
    warmup = round(tok.optim.warmup_steps / 2)  # the peak rate stays, the warm-up scales
    assert scaled.optim == dataclasses.replace(tok.optim, warmup_steps=warmup)
    assert half.shards.n_clips == cfg.shards.n_clips // 2 and half.eval_clips == cfg.eval_clips
    stages = [s.steps for s in half.lm.stages]
    assert stages == [s.steps // 2 for s in cfg.lm.stages]  # the preset's are even
    assert [s.lengths for s in half.lm.stages] == [s.lengths for s in cfg.lm.stages]
    assert half.lm.eval_every == cfg.lm.eval_every // 2
    warmup = round(cfg.lm.optim.warmup_steps / 2)
    assert half.lm.optim == dataclasses.replace(cfg.lm.optim, warmup_steps=warmup)
    assert half.lm.checkpoint_every == cfg.lm.checkpoint_every // 2
    assert scale(cfg, 1.0) is cfg
    long = ShapesRecipeConfig()
    long.tokenizer_long.steps = 400
    assert scale(long, 0.5).tokenizer_long.steps == 200


@pytest.mark.parametrize("continuous, disc_start", [(3590, 3600), (1800, 3595), (0, 100)])
def test_every_share_gives_a_valid_config(continuous, disc_start):
    """Phase boundaries near the end stay before it; a configured GAN phase stays."""
    cfg = ShapesRecipeConfig()
    cfg.tokenizer.continuous_steps = continuous
    cfg.tokenizer.loss.disc_start_step = disc_start
    for share in (0.05, 0.1, 0.33, 0.5, 0.77, 0.99):
        tok = scale(cfg, share).tokenizer
        tok.__post_init__()  # validates continuous_steps < steps
        assert 0 <= tok.continuous_steps < tok.steps
        assert (tok.loss.disc_start_step < tok.steps) == (disc_start < 3600)


def test_the_factor_fits_the_projection_to_the_budget():
    cfg, costs = ShapesRecipeConfig(), _costs()
    full = minutes_of(cfg, costs)
    for minutes in (0.6 * full, 0.9 * full):
        share = factor(cfg, costs, minutes)
        assert 0 < share < 1
        # under the aim, and within 1% of it: whole steps and rounded intervals make the
        # projection jump by a few evaluations' seconds as the share moves
        fitted = minutes_of(scale(cfg, share), costs)
        assert 0.99 * AIM * minutes < fitted <= AIM * minutes
    assert factor(cfg, costs, 2 * full) == 1.0  # never more steps than configured


def test_a_budget_below_the_fixed_costs_is_refused_with_what_would_fit():
    cfg = ShapesRecipeConfig()
    with pytest.raises(ValueError, match="--minutes") as error:
        factor(cfg, _costs(), 2.0)
    assert "--minutes 0" in str(error.value)
    suggested = int(re.search(r"give --minutes (\d+)", str(error.value)).group(1))
    assert factor(cfg, _costs(), suggested) > 0  # what it suggests fits


def _write_times(out: Path, times: list[float]) -> Path:
    """A run directory whose metrics.jsonl has these step times; returns its export path."""
    out.mkdir(parents=True, exist_ok=True)
    elapsed = itertools.accumulate(times)
    lines = [json.dumps({"step": i + 1, "elapsed_s": e}) for i, e in enumerate(elapsed)]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out / "export"


def test_calibration_reads_steps_events_and_compilation_from_the_right_steps(tmp_path, monkeypatch):
    """The training loops' step times, faked: a slow first step, an event paid by the step after
    it, GAN steps, and for the LM a first pass that compiles."""

    def tokenizer(run, out, progress):
        n = run.eval_every + 1  # plain steps; the event after step n - 1
        gan = run.steps - n
        times = [2.0] + [0.5] * (n - 2) + [0.5 + 1.5] + ([3.0] + [1.2] * (gan - 1) if gan else [])
        return _write_times(out, times)

    def lm(run, out, progress):
        times, warm = [], run.eval_every
        for i, stage in enumerate(run.stages):
            t = stage.lengths[0]
            first = i < len(run.stages) // 2  # the first pass compiles each length once
            times += [0.1 * t + (1.0 if first else 0.0)] + [0.1 * t] * (stage.steps - 1)
        times[warm] += 1.0  # the first evaluation, compiled
        times[-1] += 0.7
        return _write_times(out, times)

    monkeypatch.setattr(tokenizer_loop, "train_tokenizer", tokenizer)
    monkeypatch.setattr(lm_loop, "train_lm", lm)
    monkeypatch.setattr(recipe_budget, "_calibrate_clips", lambda *a: (0.05, 1.0, tmp_path))
    cfg = ShapesRecipeConfig()
    cfg.tokenizer.loss.disc_start_step = 3000  # a GAN phase, so GAN steps are timed
    costs = calibrate(cfg, tmp_path / "scratch")
    assert costs.tokenizer_step == pytest.approx(0.5)
    assert costs.tokenizer_event == pytest.approx(1.5)
    assert costs.tokenizer_gan_step == pytest.approx(1.2)
    assert costs.lm_step == pytest.approx({1: 0.1, 5: 0.5, 9: 0.9})
    assert costs.lm_event == pytest.approx(0.7)
    assert costs.lm_compile == pytest.approx(3 * 1.0 + (1.0 - 0.7))
    assert (costs.clip, costs.shards_setup) == (0.05, 1.0)


def test_gan_steps_and_long_clips_are_projected_at_their_own_cost():
    cfg, costs = ShapesRecipeConfig(), _costs()
    variable, _ = project(cfg, costs)
    gan = ShapesRecipeConfig()
    gan.tokenizer.loss.disc_start_step = gan.tokenizer.steps - 100
    more, _ = project(gan, costs)
    assert more - variable == pytest.approx(100 * (2.0 - 0.6))
    long = ShapesRecipeConfig()
    long.tokenizer_long.steps = 400  # 33-frame clips against the tokenizer's 9
    more, _ = project(long, costs)
    assert more - variable == pytest.approx(400 * 0.6 * 33 / 9)


@pytest.mark.parametrize("long_steps", [0, 400])
def test_an_existing_tokenizer_is_timed_only_for_the_long_clip_run(
    tmp_path, monkeypatch, long_steps
):
    export = tmp_path / "export"
    VideoTokenizer.from_preset("tiny").save_pretrained(export)
    runs = []

    def tokenizer(run, out, progress):
        runs.append(run)
        n = run.eval_every + 1
        return _write_times(out, [1.0] + [0.5] * (n - 2) + [2.0] + [3.0] * (run.steps - n))

    def lm(run, out, progress):
        return _write_times(out, [0.1] * sum(s.steps for s in run.stages))

    monkeypatch.setattr(tokenizer_loop, "train_tokenizer", tokenizer)
    monkeypatch.setattr(lm_loop, "train_lm", lm)
    monkeypatch.setattr(recipe_budget, "_calibrate_clips", lambda *a: (0.05, 1.0, tmp_path))
    cfg = ShapesRecipeConfig(tokenizer_from=str(export))
    cfg.tokenizer.loss.disc_start_step = 100  # a GAN phase the long-clip run does not have
    cfg.tokenizer_long.steps = long_steps
    costs = calibrate(cfg, tmp_path / "scratch")
    if not long_steps:
        assert not runs and costs.tokenizer_step == 0.0
        return
    (run,) = runs
    assert run.init_from == str(export)
    assert run.model == VideoTokenizer.from_pretrained(export).config
    assert run.loss.disc_start_step >= run.steps  # no GAN steps timed
    assert costs.tokenizer_step == pytest.approx(0.5)


CALIBRATED = {  # a toy recipe, eager, small enough to calibrate in seconds
    **{k: v for k, v in TOY.items() if k != "minutes"},
    "lm.parallel.compile": "false",
}


def _toy(values: dict) -> ShapesRecipeConfig:
    from loong.config import resolve_config

    return resolve_config(ShapesRecipeConfig(), None, [f"{k}={v}" for k, v in values.items()])


def test_calibration_times_every_phase_and_cleans_up(tmp_path):
    costs = calibrate(_toy(CALIBRATED), tmp_path / "scratch")
    assert costs.tokenizer_step > 0 and costs.clip >= 0 and costs.seconds > 0
    assert costs.tokenizer_gan_step == costs.tokenizer_step  # the toy has no GAN phase
    assert sorted(costs.lm_step) == [1, 2, 3] and min(costs.lm_step.values()) > 0
    assert costs.tokenizer_event >= 0 and costs.lm_event >= 0 and costs.lm_compile >= 0
    assert not (tmp_path / "scratch").exists()


def test_a_budgeted_recipe_scales_its_steps_and_a_resumed_one_keeps_them(
    tmp_path, monkeypatch, caplog
):
    values = {
        **CALIBRATED,
        "tokenizer.steps": 8,
        "tokenizer.continuous_steps": 4,
        "tokenizer.eval_every": 4,
        "lm.stages": (
            '[{name="image", steps=4, lengths=[1]}, {name="short", steps=4, lengths=[1, 2]},'
            ' {name="long", steps=8, lengths=[1, 3], weights=[1, 3]}]'
        ),
    }
    costs = _costs(lm_step={1: 0.2, 2: 0.4, 3: 0.6}, seconds=0.0)
    minutes = minutes_of(scale(_toy(values), 0.5), costs) / AIM  # half the steps fit
    monkeypatch.setattr(recipe, "calibrate", lambda cfg, scratch: costs)
    out = tmp_path / "run"
    args = ["recipe", "shapes", "--out", str(out), *_sets(values)]
    assert main([*args, "--minutes", str(minutes)]) == 0
    state = json.loads((out / "recipe.json").read_text())
    assert state["budget"]["factor"] == pytest.approx(0.5, abs=0.05)
    assert state["budget"]["fitted_min"] <= AIM * minutes + 0.05  # rounded to 0.1
    tok = json.loads((out / "tokenizer" / "config.json").read_text())
    assert (tok["steps"], tok["continuous_steps"], tok["eval_every"]) == (4, 2, 2)
    # the tokenizer, a budgeted run of its own: its share of the minutes, its steps fitted to it
    tok_budget = json.loads((out / "tokenizer" / "budget.json").read_text())
    fitted = scale(_toy(values), state["budget"]["factor"])
    share = sum(tokenizer_seconds(fitted.tokenizer, costs.tokenizer())) / sum(
        project(fitted, costs)
    )
    assert tok_budget["minutes"] == pytest.approx(share * minutes)
    assert state["tokenizer"]["factor"] == tok_budget["factor"]
    assert budget.scale_tokenizer(_toy(values).tokenizer, tok_budget["factor"]).steps == 4
    meta = json.loads((out / "shards" / "meta.json").read_text())
    assert meta["n_items"] == 6  # 12 halved
    assert state["shards"]["clips"] == 6  # the tokenizer ran too few steps to re-fit
    # the LM, fitted anew to the minutes the phases before it left (they took less than the
    # costs projected here, so it gets more steps than the recipe's half)
    lm_budget = json.loads((out / "lm" / "budget.json").read_text())
    before = ("tokenizer", "tokenizer_long", "shards")
    spent = state["calibration"]["seconds"] + sum(state[name]["seconds"] for name in before)
    assert lm_budget["minutes"] == pytest.approx(minutes - spent / 60)
    assert state["lm"]["factor"] == lm_budget["factor"] > state["budget"]["factor"]
    stages = [s.steps for s in scale_lm(_toy(values).lm, lm_budget["factor"]).stages]
    lm = json.loads((out / "lm" / "config.json").read_text())
    assert [s["steps"] for s in lm["stages"]] == stages
    steps = [json.loads(line)["step"] for line in (out / "lm" / "metrics.jsonl").open()]
    assert steps[-1] == sum(stages)

    def no_calibration(cfg, scratch):
        raise AssertionError("a resumed run calibrates again")

    monkeypatch.setattr(recipe, "calibrate", no_calibration)
    # the LM and bundle steps lost: the LM trains again, with the recorded factor's stages
    del state["lm"], state["bundle"]
    (out / "recipe.json").write_text(json.dumps(state))
    shutil.rmtree(out / "lm")
    with caplog.at_level("INFO", logger="loong"):
        assert main([*args, "--minutes", str(2 * minutes)]) == 0
    assert sum("skipped" in r.message for r in caplog.records) == 3
    assert any("keeps its step counts" in r.message for r in caplog.records)
    lm = json.loads((out / "lm" / "config.json").read_text())
    assert [s["steps"] for s in lm["stages"]] == stages  # from the same minutes left
    assert json.loads((out / "lm" / "budget.json").read_text()) == lm_budget


@pytest.mark.parametrize("earlier", [0.5, 1.0, 1.5])
def test_the_lm_is_fitted_to_the_minutes_the_phases_before_it_left(tmp_path, earlier):
    """The recipe's LM phase, after phases that took ``earlier`` times their projection."""
    cfg, costs = ShapesRecipeConfig(), _costs()
    minutes = 0.7 * minutes_of(cfg, costs)
    share = factor(cfg, costs, minutes)
    fitted = scale(cfg, share)
    tok_variable, tok_fixed = tokenizer_seconds(fitted.tokenizer, costs.tokenizer())
    state = {
        "calibration": dataclasses.asdict(costs),
        "budget": {"minutes": minutes, "factor": share},
        "tokenizer": {"seconds": earlier * (tok_variable + tok_fixed)},
        "shards": {"seconds": earlier * fitted.shards.n_clips * costs.clip},
    }
    run = recipe._budget_lm(cfg.lm, fitted.lm, tmp_path, state)
    spent = costs.seconds + state["tokenizer"]["seconds"] + state["shards"]["seconds"]
    left = minutes - spent / 60
    assert run == dataclasses.replace(cfg.lm, budget_minutes=run.budget_minutes)
    assert run.budget_minutes == pytest.approx(left)
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["minutes"] == pytest.approx(left)
    lm_minutes = budget.projected_minutes(budget.LM, cfg.lm, record["factor"], costs.lm())
    assert 0.99 * AIM * left < lm_minutes <= AIM * left
    # slower phases before it leave it fewer steps than the recipe's share, faster ones more
    assert (record["factor"] < share) == (earlier > 1.0)


TIMED = (
    "tokenizer_step",
    "tokenizer_gan_step",
    "tokenizer_event",
    "tokenizer_setup",
    "clip",
    "shards_setup",
    "lm_compile",
    "lm_event",
    "lm_setup",
)
"""``Costs``' fields of seconds a unit, ``lm_step`` aside."""


def _state(cfg: ShapesRecipeConfig, costs: Costs, minutes: float, **seconds: float) -> dict:
    """A budgeted recipe's ``recipe.json`` after its calibration and the phases given their
    ``seconds``."""
    share = factor(cfg, costs, minutes)
    return {
        "calibration": dataclasses.asdict(costs),
        "budget": {"minutes": minutes, "factor": share},
        **{phase: {"seconds": value} for phase, value in seconds.items()},
    }


def test_the_tokenizer_is_fitted_to_its_share_of_the_budget(tmp_path):
    cfg, costs = ShapesRecipeConfig(), _costs()
    minutes = 0.7 * minutes_of(cfg, costs)
    state = _state(cfg, costs, minutes)
    fitted = scale(cfg, state["budget"]["factor"])
    run = recipe._budget_tokenizer(cfg, fitted, tmp_path, state)
    mine = sum(tokenizer_seconds(fitted.tokenizer, costs.tokenizer()))
    share = mine / sum(project(fitted, costs))
    assert 0.05 < share < 0.5
    expected = share * (minutes - costs.seconds / 60)
    assert run == dataclasses.replace(cfg.tokenizer, budget_minutes=run.budget_minutes)
    assert run.budget_minutes == pytest.approx(expected)
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["minutes"] == pytest.approx(expected)
    own = budget.projected_minutes(
        budget.TOKENIZER, cfg.tokenizer, record["factor"], costs.tokenizer()
    )
    assert own <= AIM * expected  # the calibration's seconds were spent before it
    # well calibrated, it trains about the recipe's share of its steps
    assert record["factor"] == pytest.approx(state["budget"]["factor"], rel=0.1)
    # resumed: the record stays, whatever the state says now
    state["budget"]["minutes"] *= 2
    again = recipe._budget_tokenizer(cfg, fitted, tmp_path, state)
    assert again.budget_minutes == pytest.approx(expected)
    assert json.loads((tmp_path / "budget.json").read_text()) == record


def test_a_tokenizer_timed_in_a_busy_minute_refits_to_its_share_of_the_real_minutes(tmp_path):
    """A calibration timed at 3× the machine's real speed: the recipe's factor is far too small,
    and the tokenizer's re-fit, from its first steps at a third of the calibrated cost, brings
    its steps back to about what a calibration at the real speed would have given it."""
    cfg, real = ShapesRecipeConfig(), _costs(seconds=0.0)
    minutes = 0.5 * minutes_of(cfg, real)
    busy = _costs(
        **{name: 3 * getattr(real, name) for name in TIMED},
        lm_step={1: 0.6, 5: 2.4, 9: 4.8},
        seconds=0.0,
    )
    runs = {}
    for name, costs in (("busy", busy), ("real", real)):
        state = _state(cfg, costs, minutes)
        fitted = scale(cfg, state["budget"]["factor"])
        out = tmp_path / name
        run = recipe._budget_tokenizer(cfg, fitted, out, state)
        runs[name] = (state["budget"]["factor"], json.loads((out / "budget.json").read_text()))
        if name == "busy":
            fitted_run = budget.fit_tokenizer(run, out)  # as train_tokenizer does
            refit = budget.Refit(run, fitted_run, out, budget.TOKENIZER, resumed=False)
            for done in range(1, refit.due + 1):  # warm-start steps at a third of the cost
                refitted = refit.observe(done, busy.tokenizer_step / 3, (False, False))
            assert refitted is not None and refitted.steps > fitted_run.steps
            busy_refit = json.loads((out / "budget.json").read_text())
    (busy_share, busy_record), (real_share, real_record) = runs["busy"], runs["real"]
    assert busy_share < 0.5 * real_share  # the recipe's factor, from the busy calibration
    assert busy_record["factor"] < 0.5 * real_record["factor"]
    assert busy_refit["refit"]["step_ratio"] == pytest.approx(1 / 3, abs=1e-3)
    assert busy_refit["factor"] == pytest.approx(real_record["factor"], rel=0.15)


def test_the_shards_follow_the_tokenizers_refit(tmp_path):
    cfg = ShapesRecipeConfig()
    fitted = scale(cfg, 0.1)
    assert recipe._shard_clips(cfg, fitted, tmp_path) == fitted.shards.n_clips  # no record
    path = tmp_path / "tokenizer" / "budget.json"
    path.parent.mkdir()
    record = {"factor": 0.1, "calibrated_factor": 0.1, "refit": {"step": 40, "step_ratio": 1.05}}
    path.write_text(json.dumps(record))
    assert recipe._shard_clips(cfg, fitted, tmp_path) == fitted.shards.n_clips  # kept its factor
    for ratio, clips in ((0.25, 4 * fitted.shards.n_clips), (2.0, fitted.shards.n_clips // 2)):
        record = {"factor": 0.3, "calibrated_factor": 0.1, "refit": {"step_ratio": ratio}}
        path.write_text(json.dumps(record))
        assert recipe._shard_clips(cfg, fitted, tmp_path) == pytest.approx(clips, abs=1)
    record["refit"]["step_ratio"] = 0.01  # never more than the configured clips
    path.write_text(json.dumps(record))
    assert recipe._shard_clips(cfg, fitted, tmp_path) == cfg.shards.n_clips


def test_the_lm_is_timed_again_when_the_tokenizer_found_the_calibration_off(tmp_path, monkeypatch):
    """A calibration timed in a busy minute slows each latent length's steps by its own ratio,
    and the LM's re-fit times only its first stage's: when the tokenizer's steps showed the
    calibration off, the LM's steps are timed again, and that time comes out of its minutes."""
    cfg, costs = ShapesRecipeConfig(), _costs()
    minutes = 0.7 * minutes_of(cfg, costs)
    fitted = scale(cfg, factor(cfg, costs, minutes))
    state = _state(cfg, costs, minutes, tokenizer=120.0, shards=30.0)
    left = minutes - (costs.seconds + 150.0) / 60
    now = budget.LMCosts(step={1: 0.05, 5: 0.3, 9: 0.5}, compile=2.0, event=1.0, setup=4.0)
    timed = []

    def calibrate_lm(lm, scratch):
        timed.append(lm)
        return dataclasses.replace(now, seconds=45.0)

    monkeypatch.setattr(recipe, "calibrate_lm", calibrate_lm)
    tokenizer = tmp_path / "tokenizer" / "budget.json"
    tokenizer.parent.mkdir()
    for ratio, again in ((1.05, False), (0.25, True)):
        tokenizer.write_text(json.dumps({"refit": {"step": 23, "step_ratio": ratio}}))
        out = tmp_path / f"lm_{ratio}"
        run = recipe._budget_lm(cfg.lm, fitted.lm, out, state)
        record = json.loads((out / "budget.json").read_text())
        assert (len(timed) == 1) == again and (not again or timed[0] == cfg.lm)
        expected = left - 45.0 / 60 if again else left
        assert run.budget_minutes == pytest.approx(expected)
        assert record["minutes"] == pytest.approx(expected)
        calibrated = dataclasses.replace(now, seconds=0.0) if again else costs.lm()
        assert budget.LMCosts.from_record(record["calibration"]) == dataclasses.replace(
            calibrated, seconds=0.0
        )
    # resumed, the LM keeps its budget and is not timed again
    assert recipe._budget_lm(cfg.lm, fitted.lm, out, state) == run and len(timed) == 1


def test_an_lm_left_too_little_time_trains_the_recipes_share_past_the_budget(tmp_path, caplog):
    cfg, costs = ShapesRecipeConfig(), _costs()
    minutes = 0.7 * minutes_of(cfg, costs)
    fitted = scale(cfg, factor(cfg, costs, minutes))
    state = _state(cfg, costs, minutes, tokenizer=60 * minutes - 10)
    with caplog.at_level("WARNING", logger="loong"):
        assert recipe._budget_lm(cfg.lm, fitted.lm, tmp_path, state) == fitted.lm
    assert "too few for its steps" in caplog.text and not (tmp_path / "budget.json").exists()
    # an LM begun without a budget of its own (checkpoints, no budget.json) keeps the share
    (tmp_path / "checkpoints" / "step_00000010").mkdir(parents=True)
    state["tokenizer"]["seconds"] = 1.0
    assert recipe._budget_lm(cfg.lm, fitted.lm, tmp_path, state) == fitted.lm


def test_the_tokenizers_warm_start_is_projected_at_its_own_cost():
    cfg = ShapesRecipeConfig()
    assert cfg.tokenizer.continuous_steps > 0
    slow, _ = project(cfg, _costs())
    fast, _ = project(cfg, _costs(tokenizer_continuous_step=0.2))
    assert slow - fast == pytest.approx(cfg.tokenizer.continuous_steps * (0.6 - 0.2))


def test_a_run_started_without_a_budget_keeps_its_steps(tmp_path, monkeypatch):
    def no_calibration(cfg, scratch):
        raise AssertionError("calibrated a run whose steps have started")

    monkeypatch.setattr(recipe, "calibrate", no_calibration)
    cfg = ShapesRecipeConfig()
    assert recipe._fit_budget(cfg, tmp_path, {"tokenizer": {"seconds": 1.0}}) is cfg
    zero = ShapesRecipeConfig(minutes=0)
    assert recipe._fit_budget(zero, tmp_path, {}) is zero


@pytest.mark.parametrize("minutes", ["-1", "nan", "inf"])
def test_negative_or_infinite_minutes_are_refused(tmp_path, capsys, minutes):
    assert main(["recipe", "shapes", "--out", str(tmp_path), "--minutes", minutes]) == 2
    assert "minutes must be >= 0" in capsys.readouterr().err


def test_a_refused_budget_keeps_its_calibration_for_the_next_try(tmp_path, monkeypatch):
    costs = _costs()
    monkeypatch.setattr(recipe, "calibrate", lambda cfg, scratch: costs)
    state: dict = {}
    with pytest.raises(ValueError, match="too short"):
        recipe._fit_budget(ShapesRecipeConfig(minutes=2), tmp_path, state)
    stored = json.loads((tmp_path / recipe.RECIPE_FILE).read_text())["calibration"]
    assert Costs.from_record(stored) == costs  # through JSON, lengths back to ints

    def no_calibration(cfg, scratch):
        raise AssertionError("calibrated again on the same machine")

    monkeypatch.setattr(recipe, "calibrate", no_calibration)
    cfg = ShapesRecipeConfig(minutes=0.6 * minutes_of(ShapesRecipeConfig(), costs))
    retry = json.loads((tmp_path / recipe.RECIPE_FILE).read_text())
    scaled = recipe._fit_budget(cfg, tmp_path, retry)
    assert 0 < retry["budget"]["factor"] < 1
    assert scaled.tokenizer.steps < cfg.tokenizer.steps


def test_a_refused_budget_is_timed_again_for_another_config(tmp_path, monkeypatch, caplog):
    costs = _costs()
    monkeypatch.setattr(recipe, "calibrate", lambda cfg, scratch: costs)
    with pytest.raises(ValueError, match="too short"):
        recipe._fit_budget(ShapesRecipeConfig(minutes=2), tmp_path, {})
    stored = json.loads((tmp_path / recipe.RECIPE_FILE).read_text())
    timed = []
    monkeypatch.setattr(recipe, "calibrate", lambda cfg, scratch: timed.append(cfg) or costs)
    wider = _toy({"tokenizer.data.batch_size": 8, "minutes": 600})  # another step cost
    state = dict(stored)
    recipe._fit_budget(wider, tmp_path, state)
    assert len(timed) == 1 and state[recipe.CALIBRATED_CONFIG] != stored[recipe.CALIBRATED_CONFIG]
    # resumed with the same config: no warning; with a changed one: the recorded factor, warned
    with caplog.at_level("WARNING", logger="loong"):
        recipe._fit_budget(wider, tmp_path, state)
        assert not any("config changed" in r.message for r in caplog.records)
        recipe._fit_budget(_toy({"tokenizer.data.batch_size": 4, "minutes": 600}), tmp_path, state)
    assert len(timed) == 1
    assert any("config changed" in r.message for r in caplog.records)


@pytest.mark.parametrize("phase", ["tokenizer", "lm"])
def test_the_recipes_phases_take_no_budget_of_their_own(phase):
    with pytest.raises(ValueError, match=f"{phase}.budget_minutes: the recipe fits all"):
        _toy({f"{phase}.budget_minutes": 5})
