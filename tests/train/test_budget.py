"""A run fitted to a time budget (the tokenizer's, and the LM's stored calibration): its step
counts scale by one factor, the factor fits the projection to the budget, and a resumed run
keeps it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math

import pytest
from test_tokenizer_training import train_config  # noqa: F401  (a fixture)

from loong import cli
from loong.config import apply_overrides
from loong.train import budget
from loong.train.budget import (
    AIM,
    BUDGET_FILE,
    LM,
    TOKENIZER,
    LMCosts,
    Refit,
    TokenizerCosts,
    events,
    fit_tokenizer,
    scale_lm,
    scale_tokenizer,
    tokenizer_seconds,
)
from loong.train.lm_config import LMTrainConfig, stage_at
from loong.train.tokenizer_config import TokenizerTrainConfig

COSTS = TokenizerCosts(step=1.0, gan_step=3.0, event=2.0, setup=5.0, seconds=30.0)


def _long(cfg, **changes):
    """``cfg`` with phases and events worth scaling: 1,000 steps, a continuous start, a GAN end."""
    values = {
        "steps": 1000,
        "continuous_steps": 500,
        "loss.disc_start_step": 800,
        "eval_every": 100,
        "preview_every": 500,
        "checkpoint_every": 200,
    }
    return apply_overrides(cfg, values | changes)


def _minutes(cfg, costs=COSTS) -> float:
    variable, fixed = tokenizer_seconds(cfg, costs)
    return (costs.seconds + variable + fixed) / 60


def test_events_count_the_steps_an_interval_falls_on_and_the_last():
    assert events(10, 5) == 2  # 5, 10 (the last)
    assert events(11, 5) == 3  # 5, 10, and 11
    assert events(12, 4, 6) == 4  # 4, 6, 8, 12 (the last)
    for steps, intervals in ((2429, (63, 253, 51)), (1000, (100, 500, 200)), (97, (5, 5, 7))):
        by_step = sum(1 for s in range(1, steps + 1) if any(s % i == 0 for i in intervals))
        last = any(steps % i == 0 for i in intervals)
        assert events(steps, *intervals) == by_step + (0 if last else 1)


def test_gan_steps_and_events_are_projected_at_their_own_cost(train_config):  # noqa: F811
    cfg = _long(train_config)
    variable, fixed = tokenizer_seconds(cfg, COSTS)
    assert variable == pytest.approx(800 * 1.0 + 200 * 3.0)
    assert fixed == pytest.approx(10 * 2.0 + 5.0)  # every 100th step has an event
    apart = dataclasses.replace(COSTS, evaluation=1.0, preview=0.5, checkpoint=0.25)
    assert tokenizer_seconds(cfg, apart)[1] == pytest.approx(10 * 1.0 + 2 * 0.5 + 5 * 0.25 + 5.0)
    no_gan = _long(train_config, **{"loss.gan_weight": 0.0})
    assert tokenizer_seconds(no_gan, COSTS)[0] == pytest.approx(1000 * 1.0)


def test_steps_before_the_quantizer_are_projected_at_their_own_cost(train_config):  # noqa: F811
    cfg = _long(train_config)  # 500 continuous steps, 300 quantized, 200 with the GAN
    costs = TokenizerCosts(step=1.0, gan_step=3.0, event=2.0, setup=5.0, continuous_step=0.25)
    assert tokenizer_seconds(cfg, costs)[0] == pytest.approx(500 * 0.25 + 300 * 1.0 + 200 * 3.0)
    assert TOKENIZER.step_cost(costs, (False, False)) == 0.25
    assert TOKENIZER.step_cost(costs, (True, True)) == 3.0
    assert TOKENIZER.slower(costs, 2.0).continuous_step == 0.5


def test_a_real_calibration_times_the_steps_before_the_quantizer_too(tmp_path, train_config):  # noqa: F811
    cfg = _long(train_config)
    costs = budget.calibrate_tokenizer(cfg, tmp_path, gan=True)
    assert costs.continuous_step > 0 and costs.step > 0 and costs.gan_step > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    c, n = budget.STEPS + 1, 2 * budget.STEPS + 4
    assert len(rows) == c + n + budget.STEPS + 1  # continuous, quantized, GAN steps
    # each kind of event timed after a step of its own
    assert min(costs.evaluation, costs.preview, costs.checkpoint) >= 0
    assert costs.event == costs.evaluation + costs.preview + costs.checkpoint
    assert [r["step"] for r in rows if "eval_psnr" in r] == [c + n - 1, len(rows)]
    assert sorted(p.name for p in (tmp_path / "previews").iterdir())[0].startswith(
        f"step_{c + n - 2:07d}"
    )
    assert [r["quant"] == 0 for r in rows[: c + 1]] == [True] * c + [False]
    assert "g" not in rows[c + n - 1] and "g" in rows[c + n]
    plain = budget.calibrate_tokenizer(
        _long(train_config, continuous_steps=0), tmp_path / "q", gan=False
    )
    assert plain.continuous_step is None and plain.warm_start_step == plain.step


def test_scale_keeps_the_phases_and_the_peak_learning_rate_and_scales_the_warm_up(train_config):  # noqa: F811
    cfg = _long(train_config, **{"optim.warmup_steps": 100})
    half = scale_tokenizer(cfg, 0.5)
    assert (half.steps, half.continuous_steps, half.loss.disc_start_step) == (500, 250, 400)
    assert (half.eval_every, half.preview_every, half.checkpoint_every) == (50, 250, 100)
    assert half.optim == dataclasses.replace(cfg.optim, warmup_steps=50)
    assert half.model == cfg.model and half.data == cfg.data
    # cut deep, a run still decays its rate: its warm-up ends before its last step
    deep = scale_tokenizer(cfg, 0.05)
    assert deep.optim.warmup_steps == 5 < deep.steps
    assert deep.optim.lr_at(deep.steps - 1, deep.steps) < 0.2 * cfg.optim.lr
    for warmup, share, scaled in ((0, 0.5, 0), (3, 0.01, 1)):  # none stays none; one stays
        tok = scale_tokenizer(_long(train_config, **{"optim.warmup_steps": warmup}), share)
        assert tok.optim.warmup_steps == scaled
    lm = LMTrainConfig()
    assert scale_lm(lm, 0.25).optim.warmup_steps == round(0.25 * lm.optim.warmup_steps)
    for share in (0.001, 0.05, 0.33, 0.99):  # phases near the end stay before it
        tok = scale_tokenizer(_long(train_config, continuous_steps=995), share)
        tok.__post_init__()
        assert tok.continuous_steps < tok.steps and tok.loss.disc_start_step < tok.steps
    assert scale_tokenizer(cfg, 1.0) is cfg


def test_a_new_run_is_fitted_and_recorded_and_a_resumed_one_keeps_its_factor(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
    caplog,
):
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=10.0)
    assert _minutes(cfg) > 2 * 10  # the configured steps do not fit
    fitted = fit_tokenizer(cfg, tmp_path)
    record = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert 0.05 < record["factor"] < 0.5 and record["minutes"] == 10.0
    assert record["calibration"] == {
        "step": 1.0,
        "gan_step": 3.0,
        "event": 2.0,
        "setup": 5.0,
        "seconds": 30.0,
        "continuous_step": None,
        "evaluation": None,
        "preview": None,
        "checkpoint": None,
    }
    assert 0.99 * AIM * 10 < _minutes(fitted) <= AIM * 10  # the steps that run fit the aim
    assert fitted.steps == round(1000 * record["factor"])
    assert fitted.continuous_steps == round(500 * record["factor"])
    assert fitted.loss.disc_start_step == round(800 * record["factor"])
    assert fitted.max_minutes == pytest.approx(10.0 - 35.0 / 60)  # less calibration, set-up
    assert fitted.budget_minutes == 10.0  # recorded in the run's config.json

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run calibrates again")

    monkeypatch.setattr(budget, "calibrate_tokenizer", no_calibration)
    assert fit_tokenizer(cfg, tmp_path) == fitted
    with caplog.at_level(logging.WARNING, logger="loong.train.budget"):
        again = fit_tokenizer(apply_overrides(cfg, {"budget_minutes": 20.0}), tmp_path)
    assert again == fitted and "keeps it, and its factor" in caplog.text  # the stop too
    assert fit_tokenizer(apply_overrides(cfg, {"budget_minutes": 0.0}), tmp_path) == fitted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loong.train.budget"):
        longer = fit_tokenizer(apply_overrides(cfg, {"steps": 2000}), tmp_path)
    assert longer.steps == round(2000 * record["factor"]) and "config changed" in caplog.text


def test_a_machine_fast_enough_runs_every_step_and_a_run_without_budget_keeps_its_steps(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=60.0)
    fitted = fit_tokenizer(cfg, tmp_path / "fast")
    assert fitted.steps == 1000 and fitted.max_minutes == pytest.approx(60.0 - 35.0 / 60)
    started = tmp_path / "started"  # e.g. by an earlier version, where --minutes only stopped
    (started / "checkpoints" / "step_0000003").mkdir(parents=True)
    kept = fit_tokenizer(_long(train_config, budget_minutes=1.0), started)
    assert (kept.steps, kept.max_minutes) == (1000, 1.0)
    assert not (started / BUDGET_FILE).exists()


def test_a_killed_calibrations_leftovers_are_cleared_first(tmp_path, train_config, monkeypatch):  # noqa: F811
    (tmp_path / "calibration" / "checkpoints" / "step_0000010").mkdir(parents=True)

    def calibrate(base, scratch, gan):
        assert not scratch.exists()  # it would resume from the killed try's checkpoint
        return COSTS

    monkeypatch.setattr(budget, "calibrate_tokenizer", calibrate)
    assert fit_tokenizer(_long(train_config, budget_minutes=10.0), tmp_path).steps < 1000
    assert not (tmp_path / "calibration").exists()


def test_a_budget_too_short_is_refused_with_what_would_fit(tmp_path, train_config, monkeypatch):  # noqa: F811
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    with pytest.raises(ValueError, match="too short for this tokenizer run") as error:
        fit_tokenizer(_long(train_config, budget_minutes=1.0), tmp_path)
    suggested = float(str(error.value).split("give --minutes ")[1].split()[0])

    def no_calibration(*args, **kwargs):
        raise AssertionError("the refused try's calibration is timed again")

    monkeypatch.setattr(budget, "calibrate_tokenizer", no_calibration)
    assert fit_tokenizer(_long(train_config, budget_minutes=0.0), tmp_path).steps == 1000
    assert fit_tokenizer(_long(train_config, budget_minutes=suggested), tmp_path).steps >= 50


def test_a_refused_budget_is_timed_again_for_another_config(tmp_path, train_config, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: calls.append(1) or COSTS)
    with pytest.raises(ValueError, match="too short"):
        fit_tokenizer(_long(train_config, budget_minutes=1.0), tmp_path)
    wider = _long(train_config, budget_minutes=60.0, **{"model.base_width": 16})
    assert fit_tokenizer(wider, tmp_path).steps == 1000 and len(calls) == 2


def test_a_refused_lm_budget_keeps_its_calibration_with_its_lengths(tmp_path, monkeypatch):
    costs = budget.LMCosts(step={1: 0.5, 5: 2.0, 17: 6.0}, compile=10.0, event=3.0, setup=5.0)
    monkeypatch.setattr(budget, "calibrate_lm", lambda *a: costs)
    cfg = LMTrainConfig(budget_minutes=1.0)  # Loong's stages: t = 1, 5 and 17
    with pytest.raises(ValueError, match="too short for this language-model run"):
        budget.fit_lm(cfg, tmp_path)
    monkeypatch.setattr(budget, "calibrate_lm", None)  # not called again: read back from JSON
    fitted = budget.fit_lm(apply_overrides(cfg, {"budget_minutes": 60.0}), tmp_path)
    assert 0 < fitted.total_steps < cfg.total_steps and len(fitted.stages) == len(cfg.stages)


def test_the_cli_trains_the_fitted_steps(tmp_path, train_config, monkeypatch):  # noqa: F811
    """``loong tokenizer train --minutes``: the run's config.json and metrics are the fitted
    steps', with the continuous phase and the quantizer's both in them; run again without
    ``--minutes``, it keeps them."""
    # half-minute steps: the hard stop at the budget is minutes away from these 8 real steps
    costs = TokenizerCosts(step=30.0, gan_step=30.0, event=0.0, setup=0.0, seconds=0.0)
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: costs)
    out = tmp_path / "run"
    sets = [
        "--set",
        "data.n_frames=5",
        "--set",
        "data.batch_size=2",
        "--set",
        "eval_clips=2",
        "--set",
        "continuous_steps=8",
        "--set",
        "loss.disc_start_step=1000",
        "--set",
        "eval_every=1000",
        "--set",
        "preview_every=1000",
        "--set",
        "model.base_width=8",
    ]
    minutes = 8.25 * 30 / 60 / AIM  # 8 of those steps fit: half the 16 configured
    args = ["tokenizer", "train", "--preset", "tiny", "--steps", "16", "--out", str(out)]
    assert cli.main([*args, *sets, "--minutes", str(minutes)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["steps"], config["continuous_steps"]) == (8, 4)
    assert config["max_minutes"] == pytest.approx(minutes)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps[-1] == 8
    share = json.loads((out / BUDGET_FILE).read_text())["factor"]
    assert round(16 * share) == 8 and 0.5 <= share < 17 / 32  # the most that rounds to 8 steps
    assert cli.main([*args, *sets]) == 0  # resumed without --minutes: the budget's steps
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps[-1] == 8 and json.loads((out / "config.json").read_text())["steps"] == 8


def _refit(tmp_path, cfg, seconds: float, about=(True, False), kind=TOKENIZER, **kwargs):
    """The re-fitted config (or None) of the fitted run ``cfg`` in ``tmp_path`` whose steps each
    take ``seconds``, and how many steps it timed."""
    fitted = budget.fit_run(cfg, tmp_path, kind)
    refit = Refit(cfg, fitted, tmp_path, kind, resumed=False, **kwargs)
    for n in range(1, 10_000):
        new = refit.observe(n, seconds, about)
        if new is not None or not refit.active or refit.timed:
            return fitted, new, n
    raise AssertionError("never re-fitted")


def test_a_run_slower_than_its_calibration_is_refitted_once_to_fewer_steps(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0)
    fitted, new, timed = _refit(tmp_path, cfg, seconds=2.0)  # twice the calibrated 1.0 s
    record = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert timed == budget.REFIT_SKIP + math.ceil(budget.REFIT_SHARE * fitted.steps)
    assert record["refit"] == {"step": timed, "step_ratio": 2.0, "factor": record["factor"]}
    assert record["calibrated_factor"] > record["factor"] and new.steps < fitted.steps
    rescaled = scale_tokenizer(cfg, record["factor"])  # cfg's budget_minutes kept
    assert new == dataclasses.replace(rescaled, max_minutes=fitted.max_minutes)
    slower = TokenizerCosts(step=2.0, gan_step=6.0, event=4.0, setup=5.0, seconds=30.0)
    assert 0.99 * AIM * 20 < _minutes(new, slower) <= AIM * 20  # fitted at the run's own speed
    # once: a later invocation resumes the re-fitted steps and does not re-fit again
    assert fit_tokenizer(cfg, tmp_path) == new
    assert not Refit(cfg, new, tmp_path, TOKENIZER, resumed=False).active


def test_a_faster_run_gets_more_steps_and_one_near_its_calibration_keeps_its_factor(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0)
    fitted, new, _ = _refit(tmp_path / "fast", cfg, seconds=0.5)
    assert fitted.steps < new.steps <= 1000
    fast = TokenizerCosts(step=0.5, gan_step=1.5, event=1.0, setup=5.0, seconds=30.0)
    assert _minutes(new, fast) <= AIM * 20
    fitted, new, _ = _refit(tmp_path / "near", cfg, seconds=1.0 + budget.REFIT_TOLERANCE / 2)
    record = json.loads((tmp_path / "near" / BUDGET_FILE).read_text())
    assert new is None and record["refit"]["factor"] == record["calibrated_factor"]
    assert fit_tokenizer(cfg, tmp_path / "near") == fitted
    fitted, new, _ = _refit(tmp_path / "gan", cfg, seconds=3.0, about=(True, True))  # 3 s
    record = json.loads((tmp_path / "gan" / BUDGET_FILE).read_text())
    assert new is None and record["refit"]["step_ratio"] == 1.0
    # steps before the quantizer, against their own calibrated cost
    warm = TokenizerCosts(step=1.0, gan_step=3.0, event=2.0, setup=5.0, continuous_step=0.25)
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: warm)
    fitted, new, _ = _refit(tmp_path / "warm", cfg, seconds=0.25, about=(False, False))
    record = json.loads((tmp_path / "warm" / BUDGET_FILE).read_text())
    assert new is None and record["refit"]["step_ratio"] == 1.0


def test_a_refit_never_restarts_a_phase_and_skips_runs_it_does_not_fit(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    # the quantizer starts at step 23 of the fitted run, before the re-fit at step 26: all the
    # steps would move its start to 30 and turn it off again
    early = _long(train_config, budget_minutes=20.0, continuous_steps=30)
    fitted, new, timed = _refit(tmp_path / "early", early, seconds=0.5)
    assert fitted.continuous_steps <= timed and new is None
    assert fit_tokenizer(early, tmp_path / "early") == fitted
    cfg = _long(train_config, budget_minutes=20.0)
    fit_tokenizer(cfg, tmp_path / "run")
    for inactive in (
        Refit(cfg, cfg, tmp_path / "run", TOKENIZER, resumed=True),
        Refit(cfg, cfg, tmp_path / "run", TOKENIZER, resumed=False, world_size=2),
        Refit(cfg, cfg, tmp_path / "no budget", TOKENIZER, resumed=False),
        Refit(_long(cfg, steps=1001), cfg, tmp_path / "run", TOKENIZER, resumed=False),
    ):  # resumed, ranks, no factor, another config
        assert not inactive.active and inactive.observe(1, 100.0, (True, False)) is None
    free = TokenizerCosts(step=0.0, gan_step=0.0, event=0.0, setup=0.0)  # timed at 0 ms
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: free)
    fitted = fit_tokenizer(cfg, tmp_path / "free")
    refit = Refit(cfg, fitted, tmp_path / "free", TOKENIZER, resumed=False)
    assert refit.active and refit.observe(1, 0.1, (True, False)) is None and not refit.active


def test_a_short_run_is_refitted_only_to_a_run_long_enough(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """A run fitted to too few steps to re-fit early in it (a calibration timed in a busy
    minute): found slower it keeps its factor and stops at its budget; found much faster it is
    re-fitted, to a run in which the re-fit still came early."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=3.0)
    fitted, new, timed = _refit(tmp_path / "slow", cfg, seconds=1.5)
    assert fitted.steps < timed / (2 * budget.REFIT_SHARE)  # too short to re-fit early
    record = json.loads((tmp_path / "slow" / BUDGET_FILE).read_text())
    assert new is None and record["factor"] == record["calibrated_factor"]
    assert record["refit"]["step_ratio"] == 1.5
    fitted, new, timed = _refit(tmp_path / "fast", cfg, seconds=0.1)  # a tenth of the timed 1.0 s
    assert new is not None and new.steps > fitted.steps
    assert timed <= 2 * budget.REFIT_SHARE * new.steps
    fast = TokenizerCosts(step=0.1, gan_step=0.3, event=0.2, setup=5.0, seconds=30.0)
    assert _minutes(new, fast) <= AIM * 3.0


def test_an_lm_run_is_refitted_from_its_steps_lengths(tmp_path, monkeypatch):
    costs = budget.LMCosts(step={1: 0.5, 5: 2.0, 17: 6.0}, compile=10.0, event=3.0, setup=5.0)
    monkeypatch.setattr(budget, "calibrate_lm", lambda *a: costs)
    cfg = LMTrainConfig(budget_minutes=60.0)  # Loong's stages: t = 1, 5 and 17
    assert LM.step_cost(costs, [1, 5]) == pytest.approx(1.25)
    assert LM.starts(cfg) == (cfg.stages[0].steps, cfg.stages[0].steps + cfg.stages[1].steps)
    fitted, new, _ = _refit(tmp_path, cfg, seconds=1.5, about=[1, 1], kind=LM)  # 3× t = 1's
    assert new.total_steps < fitted.total_steps and len(new.stages) == len(cfg.stages)
    slower = budget.LM.slower(costs, 3.0)
    variable, fixed = budget.lm_seconds(new, slower)
    assert (slower.seconds + variable + fixed) / 60 <= AIM * 60


def test_an_early_refit_inside_the_warm_up_leaves_the_learning_rate_where_it_was(
    tmp_path, monkeypatch
):
    """The warm-up is scaled once, by the calibrated factor: a re-fit of the factor while it
    runs (an LM's is 3% of the run in, its warm-up 5%) changes the steps, not the rate the run
    is at; and a resumed run gets the same warm-up."""
    costs = budget.LMCosts(step={1: 0.5, 5: 2.0, 17: 6.0}, compile=10.0, event=3.0, setup=5.0)
    monkeypatch.setattr(budget, "calibrate_lm", lambda *a: costs)
    cfg = LMTrainConfig(budget_minutes=60.0)
    for seconds, name in ((1.5, "slower"), (0.25, "faster")):
        fitted, new, done = _refit(tmp_path / name, cfg, seconds=seconds, about=[1], kind=LM)
        assert new is not None and new.total_steps != fitted.total_steps
        assert done < fitted.optim.warmup_steps == new.optim.warmup_steps
        before = fitted.optim.lr_at(done, fitted.total_steps)
        assert new.optim.lr_at(done, new.total_steps) == before < fitted.optim.lr
        assert budget.fit_lm(cfg, tmp_path / name) == new


def _run_tokenizer(refit, cfg, seconds):
    """Step the budgeted tokenizer run ``cfg`` to its end as the loop would, each step taking
    ``seconds[(quantized, gan on)]``, switching to each re-fitted config; the config it ended
    with and the steps at which it switched."""
    step, switched = 0, []
    while step < cfg.steps:
        quantized, gan = step >= cfg.continuous_steps, step >= cfg.loss.disc_start_step
        step += 1
        new = refit.observe(step, seconds[quantized, gan], (quantized, gan))
        if new is not None:
            cfg = new
            switched.append(step)
    return cfg, switched


def test_each_kind_of_step_is_timed_and_the_rest_of_the_run_refitted(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """A calibration that over-timed the warm-start steps only (1.25 s against 1.0 s; the
    quantized and GAN steps as calibrated): the first re-fit takes the warm-start steps' ratio
    for every kind and gives the run steps it has no time for; the quantized steps' own ratio
    fits the rest of the run again, to the budget, and the GAN steps, as fitted, change
    nothing. The steps taken and the phases begun stay; a resumed run replays the re-fits."""
    calibrated = dataclasses.replace(COSTS, continuous_step=1.25)
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: calibrated)
    cfg = _long(train_config, budget_minutes=20.0)
    fitted = fit_tokenizer(cfg, tmp_path)
    refit = Refit(cfg, fitted, tmp_path, TOKENIZER, resumed=False)
    real = {(False, False): 1.0, (True, False): 1.0, (True, True): 3.0}
    ended, switched = _run_tokenizer(refit, fitted, real)
    record = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert record["refit"]["step_ratio"] == 0.8 and len(switched) == 2
    first = scale_tokenizer(cfg, record["factor"])
    true = dataclasses.replace(calibrated, continuous_step=1.0)
    assert _minutes(first, true) > 20  # the first re-fit alone: cut by the budget's stop
    assert 0.97 * AIM * 20 < _minutes(ended, true) <= AIM * 20  # the budget, filled
    [quantized, gan] = record["rest"]
    assert (quantized["step"], quantized["step_ratio"]) == (switched[1], 1.0)
    assert quantized["kind"] == repr((True, False)) and quantized["share"] < 1
    assert gan["step_ratio"] == 1.0 and gan["share"] == 1.0  # as fitted
    assert ended.continuous_steps == first.continuous_steps < switched[1]  # begun: stays
    assert switched[1] < ended.loss.disc_start_step < first.loss.disc_start_step
    assert ended.eval_every == first.eval_every
    resumed = fit_tokenizer(cfg, tmp_path)
    assert resumed == ended
    assert not Refit(cfg, resumed, tmp_path, TOKENIZER, resumed=True).active


def _run_on_a_clock(refit, cfg, seconds, late: bool = True):
    """Step the budgeted tokenizer run ``cfg`` as the loop would, on a clock: step n takes
    ``seconds(n, quantized, gan)`` and each event (an evaluation, preview or checkpoint) costs
    ``COSTS.event`` times the step's slowdown; the run stops at its ``max_minutes`` as the loop
    does. The config it ended with, the steps taken and the clock's seconds at the end."""
    step, clock = 0, 0.0
    while step < cfg.steps and clock <= 60 * cfg.max_minutes:
        quantized = step >= cfg.continuous_steps
        gan = step >= cfg.loss.disc_start_step and cfg.loss.gan_weight > 0
        step += 1
        took = seconds(step, quantized, gan)
        clock += took
        new = refit.observe(step, took, (quantized, gan), clock if late else None)
        if new is not None:
            cfg = new
        intervals = (cfg.eval_every, cfg.preview_every, cfg.checkpoint_every)
        if any(step % i == 0 for i in intervals):
            clock += COSTS.event * took / (3.0 if gan else 1.0)
    return cfg, step, clock


def test_a_run_that_slows_down_late_fits_its_last_steps_into_the_time_left(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """Steps as calibrated, then twice as slow once the quantized steps are timed (another job
    started; no GAN phase, whose first steps' timing would catch it too), then three times:
    without the late checks the run reaches its stop with steps to go; with them it fits the
    steps still to come into the time left, ends before the stop with its learning rate
    decayed, and a resumed run replays the re-fit."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0, **{"loss.gan_weight": 0.0})
    fitted = fit_tokenizer(cfg, tmp_path / "late")
    fit_tokenizer(cfg, tmp_path / "unchecked")
    slow_from = fitted.continuous_steps + 50  # the quantized steps' timing: their first 26

    def seconds(step: int, quantized: bool, gan: bool) -> float:
        return 1.0 if step <= slow_from else 2.0 if step <= slow_from + 100 else 3.0

    def run(name: str, late: bool):
        refit = Refit(cfg, fitted, tmp_path / name, TOKENIZER, resumed=False)
        return _run_on_a_clock(refit, fitted, seconds, late=late)

    unchecked, taken, clock = run("unchecked", late=False)
    assert unchecked.steps == fitted.steps and taken < fitted.steps  # stopped part-way
    assert clock > 60 * fitted.max_minutes
    ended, taken, clock = run("late", late=True)
    assert taken == ended.steps < fitted.steps and clock <= 60 * fitted.max_minutes
    assert clock > 0.8 * 60 * fitted.max_minutes  # the time left, used
    record = json.loads((tmp_path / "late" / BUDGET_FILE).read_text())
    [late, later] = [r for r in record["rest"] if r["kind"] == "late"]
    assert late["step"] > slow_from and late["step_ratio"] == 2.0 and late["share"] < 1
    assert later["step"] > slow_from + 100 and later["step_ratio"] == 1.5 and later["share"] < 1
    assert ended.continuous_steps == fitted.continuous_steps  # begun before the re-fit: stays
    assert ended.optim.lr_at(ended.steps - 1, ended.steps) < 0.2 * fitted.optim.lr
    # the rate at the first re-fit's step is the one the run had there
    at = fitted.optim.lr_at(late["step"], fitted.steps)
    assert ended.optim.lr_at(late["step"], ended.steps) == pytest.approx(at)
    assert fit_tokenizer(cfg, tmp_path / "late") == ended  # resumed: the re-fit replayed


def test_stalls_a_windows_median_leaves_out_refit_the_run_once_they_spend_its_margin(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """Steps as calibrated, but once the quantized steps are timed every 25th stalls for 40 s
    (a machine shared by more threads than cores): no window's median moves, the clock falls
    behind, and once the stalls have spent the margin the run fits the steps still to come
    into the time left at its clock's pace (stalls included) and ends them before the stop,
    its learning rate at its floor, where without the checks the stop cut it with the rate
    far above; a resumed run replays that."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0, **{"loss.gan_weight": 0.0})
    fitted = fit_tokenizer(cfg, tmp_path)
    stall_from = fitted.continuous_steps + 50

    def seconds(step: int, quantized: bool, gan: bool) -> float:
        return 40.0 if step > stall_from and step % 25 == 12 else 1.0  # never at an event

    refit = Refit(cfg, fitted, tmp_path, TOKENIZER, resumed=False)
    ended, taken, clock = _run_on_a_clock(refit, fitted, seconds)
    late = [r for r in json.loads((tmp_path / BUDGET_FILE).read_text())["rest"]]
    assert not [r for r in late if r["kind"] == "late"]  # no window's median moved
    late = [r for r in late if r["kind"] == "clock"]
    assert late and late[0]["step"] > stall_from
    assert all(r["step_ratio"] > 1.25 and r["share"] < 1 for r in late)
    assert taken == ended.steps < fitted.steps and clock <= 60 * fitted.max_minutes
    floor = fitted.optim.lr * fitted.optim.lr_min_ratio
    assert ended.optim.lr_at(taken - 1, ended.steps) < 1.05 * floor
    fit_tokenizer(cfg, tmp_path / "unchecked")
    unchecked, taken_unchecked, _ = _run_on_a_clock(
        Refit(cfg, fitted, tmp_path / "unchecked", TOKENIZER, resumed=False),
        fitted,
        seconds,
        late=False,
    )
    assert taken_unchecked < unchecked.steps  # cut by the stop
    assert unchecked.optim.lr_at(taken_unchecked - 1, unchecked.steps) > 1.5 * floor
    assert fit_tokenizer(cfg, tmp_path) == ended


def test_a_stall_the_margin_holds_moves_nothing_and_a_longer_one_is_given_back(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """One stall mid-run: 20 s, which the budget's margin holds, re-fits nothing; 150 s, more
    than the margin, fits the steps still to come into the time left at the clock's pace over
    the last windows, the stall among them, and once it has left them gives the steps back
    at the steps' own pace: the run ends them before the stop, using its time."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0, **{"loss.gan_weight": 0.0})
    fitted = fit_tokenizer(cfg, tmp_path / "fit")
    stall_at = fitted.continuous_steps + 112  # not at an event
    for stall, name in ((20.0, "short"), (150.0, "long")):
        fit_tokenizer(cfg, tmp_path / name)
        refit = Refit(cfg, fitted, tmp_path / name, TOKENIZER, resumed=False)
        ended, taken, clock = _run_on_a_clock(
            refit, fitted, lambda n, q, g, stall=stall: stall if n == stall_at else 1.0
        )
        rest = json.loads((tmp_path / name / BUDGET_FILE).read_text()).get("rest", [])
        late = [r for r in rest if r["kind"] in ("late", "clock")]
        assert taken == ended.steps and clock <= 60 * fitted.max_minutes
        if name == "short":
            assert late == [] and ended == fitted
        else:
            [shrink, grow] = late
            assert shrink["kind"] == grow["kind"] == "clock" and shrink["step"] >= stall_at
            assert shrink["step_ratio"] > 1.25 and shrink["share"] < 1
            assert grow["step_ratio"] == 1.0 and grow["share"] > 1
            assert 0.85 * 60 * fitted.max_minutes < clock
            assert fit_tokenizer(cfg, tmp_path / name) == ended


def test_a_run_ten_times_slower_is_checked_before_a_window_of_its_steps_is_full(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """Ten times slower once the quantized steps are timed: a window of steps would take ten
    windows' time, so the check comes once the steps since the last one took two windows' time
    at the speed fitted, and the run still ends its steps before the stop."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0, **{"loss.gan_weight": 0.0})
    fitted = fit_tokenizer(cfg, tmp_path)
    slow_from = fitted.continuous_steps + 50
    refit = Refit(cfg, fitted, tmp_path, TOKENIZER, resumed=False)
    ended, taken, clock = _run_on_a_clock(
        refit, fitted, lambda n, q, g: 10.0 if n > slow_from else 1.0
    )
    [late, *_] = [
        r for r in json.loads((tmp_path / BUDGET_FILE).read_text())["rest"] if r["kind"] == "late"
    ]
    window = refit.recent.maxlen
    assert late["step_ratio"] == 10.0 and late["step"] < slow_from + window // 2
    assert taken == ended.steps and clock <= 60 * fitted.max_minutes
    assert fit_tokenizer(cfg, tmp_path) == ended


def test_a_slow_spell_late_in_a_run_costs_it_no_steps_for_good(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """Twice as slow for 100 steps, then as calibrated again: the run gives up steps while it
    is slow, takes them back once the machine is free again, and uses its time."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0, **{"loss.gan_weight": 0.0})
    fitted = fit_tokenizer(cfg, tmp_path)
    slow = range(fitted.continuous_steps + 50, fitted.continuous_steps + 150)
    refit = Refit(cfg, fitted, tmp_path, TOKENIZER, resumed=False)
    ended, taken, clock = _run_on_a_clock(refit, fitted, lambda n, q, g: 2.0 if n in slow else 1.0)
    rest = json.loads((tmp_path / BUDGET_FILE).read_text())["rest"]
    late = [r for r in rest if r["kind"] == "late"]
    assert len(late) == 2
    assert late[0]["step_ratio"] == 2.0 and late[0]["share"] < 1
    assert late[1]["step_ratio"] == 0.5 and late[1]["share"] > 1
    assert taken == ended.steps <= cfg.steps and 0.9 * 60 * fitted.max_minutes < clock
    assert clock <= 60 * fitted.max_minutes
    assert fit_tokenizer(cfg, tmp_path) == ended


def test_a_run_fitted_to_a_slow_spell_gets_its_steps_back_when_the_machine_is_faster_again(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """The quantized steps 1.15× the calibrated time while they are timed, so the rest of the
    run is fitted to that speed, then as calibrated (0.87× the speed fitted: inside the late
    checks' median tolerance): the clock's pace gives the steps back and the run uses its time,
    where it used to end with a tenth of the budget unused; the rate still ends at its floor."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    cfg = _long(train_config, budget_minutes=20.0, **{"loss.gan_weight": 0.0})
    fitted = fit_tokenizer(cfg, tmp_path)
    spell = range(fitted.continuous_steps, fitted.continuous_steps + 150)
    refit = Refit(cfg, fitted, tmp_path, TOKENIZER, resumed=False)
    ended, taken, clock = _run_on_a_clock(
        refit, fitted, lambda n, q, g: 1.15 if n in spell else 1.0
    )
    rest = json.loads((tmp_path / BUDGET_FILE).read_text())["rest"]
    assert rest[0]["kind"] == repr((True, False)) and rest[0]["share"] < 1  # the slow spell
    assert not [r for r in rest if r["kind"] == "late"]  # no window's median moved
    [ahead, *_] = [r for r in rest if r["kind"] == "clock"]
    assert ahead["step_ratio"] < 0.9 and ahead["share"] > 1
    assert taken == ended.steps <= cfg.steps and clock <= 60 * fitted.max_minutes
    assert clock > 0.95 * AIM * 60 * fitted.max_minutes  # the time, used
    floor = fitted.optim.lr * fitted.optim.lr_min_ratio
    assert ended.optim.lr_at(taken - 1, ended.steps) < 1.05 * floor
    assert fit_tokenizer(cfg, tmp_path) == ended


def test_a_run_too_short_to_re_fit_early_is_fitted_late_to_its_own_speed(
    tmp_path,
    train_config,  # noqa: F811
    monkeypatch,
):
    """Every step 1.5× the calibrated time in a run too short for the early re-fit (which keeps
    the factor): the late checks compare with the speed the run was fitted at, not the one
    measured, and fit its steps into the time left."""
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: COSTS)
    one_kind = {"continuous_steps": 0, "loss.gan_weight": 0.0}
    cfg = _long(train_config, budget_minutes=3.0, **one_kind)
    fitted = fit_tokenizer(cfg, tmp_path)
    refit = Refit(cfg, fitted, tmp_path, TOKENIZER, resumed=False)
    ended, taken, clock = _run_on_a_clock(refit, fitted, lambda n, q, g: 1.5)
    record = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert record["factor"] == record["calibrated_factor"]  # the early re-fit kept it
    assert [r["step_ratio"] for r in record["rest"] if r["kind"] == "late"] == [1.5]
    assert taken == ended.steps < fitted.steps and clock <= 60 * fitted.max_minutes


def test_the_rest_of_a_run_scales_after_its_steps_taken():
    tok = apply_overrides(
        TokenizerTrainConfig(),
        {"steps": 1000, "continuous_steps": 300, "loss.disc_start_step": 800},
    )
    assert budget.rest_tokenizer(tok, 400, 1.0) is tok
    rest = budget.rest_tokenizer(tok, 400, 0.5)
    assert (rest.steps, rest.continuous_steps, rest.loss.disc_start_step) == (700, 300, 600)
    rest = budget.rest_tokenizer(tok, 100, 2.0)
    assert (rest.steps, rest.continuous_steps, rest.loss.disc_start_step) == (1900, 500, 1500)
    no_gan = apply_overrides(tok, {"loss.disc_start_step": 1000})
    assert budget.rest_tokenizer(no_gan, 400, 0.5).loss.disc_start_step == 700  # still none
    lm = LMTrainConfig()  # stages of 1,000, 1,000 and 2,000 steps
    assert budget.rest_lm(lm, 1500, 1.0) is lm
    rest = budget.rest_lm(lm, 1500, 0.5)
    assert [stage.steps for stage in rest.stages] == [1000, 750, 1000]
    assert [stage.lengths for stage in rest.stages] == [stage.lengths for stage in lm.stages]
    rest = budget.rest_lm(lm, 1999, 0.001)
    assert [stage.steps for stage in rest.stages] == [1000, 1000, 1]  # each keeps a step


@pytest.mark.parametrize("share", [0.2, 0.5, 3.0])
def test_the_learning_rate_goes_on_from_where_it_was_when_the_rest_is_refitted(share):
    """The steps after ``done`` re-fitted: the rate at ``done`` and its next steps is what it
    was (following the new total instead, a cut would make it jump down), and it still reaches
    its floor at the last step; twice in a row too, and for an LM's stages."""
    tok = apply_overrides(TokenizerTrainConfig(), {"steps": 1000, "continuous_steps": 300})
    for run, total, rest in (
        (tok, lambda r: r.steps, budget.rest_tokenizer),
        (LMTrainConfig(), lambda r: r.total_steps, budget.rest_lm),
    ):
        done = total(run) // 2
        new = rest(run, done, share)
        assert total(new) != total(run)
        lr, lr_new = run.optim.lr_at, new.optim.lr_at
        assert lr_new(done, total(new)) == pytest.approx(lr(done, total(run)))

        def steepest(rate, steps, done=done):  # the largest change from one step to the next
            rates = [rate(n, steps) for n in range(done, steps)]
            return max(abs(a - b) for a, b in itertools.pairwise(rates))

        pace = max(1.0, 1 / share)  # a cut walks the same curve in fewer steps
        assert steepest(lr_new, total(new)) <= 1.001 * pace * steepest(lr, total(run))
        floor = run.optim.lr * run.optim.lr_min_ratio
        assert lr_new(total(new) - 1, total(new)) == pytest.approx(floor, rel=0.02)
        # the old way, the new total with the old schedule, jumps at a cut
        jump = lr(done, total(new)) / lr(done, total(run))
        assert jump < 0.9 if share < 1 else jump > 1
        later = total(new) - (total(new) - done) // 2
        twice = rest(new, later, 0.5)
        assert twice.optim.lr_at(later, total(twice)) == pytest.approx(lr_new(later, total(new)))
        assert twice.optim.lr_at(total(twice) - 1, total(twice)) == pytest.approx(floor, rel=0.05)


def test_a_refit_inside_the_warm_up_stretches_what_is_left_of_it():
    tok = apply_overrides(TokenizerTrainConfig(), {"steps": 1000, "optim.warmup_steps": 100})
    rest = budget.rest_tokenizer(tok, 50, 0.5)  # 950 steps to come → 475
    assert rest.optim.lr_at(49, rest.steps) == tok.optim.lr_at(49, tok.steps)
    assert rest.optim.lr_at(75, rest.steps) == pytest.approx(tok.optim.lr_at(100, tok.steps))
    assert rest.optim.lr_at(74, rest.steps) < tok.optim.lr


def test_an_lm_run_is_refitted_again_from_its_later_lengths(tmp_path, monkeypatch):
    """t = 1 steps as calibrated, t = 5 steps at twice their calibrated time: the rest of the
    run is re-fitted when the second stage's t = 5 steps are timed, to the budget at those
    speeds (t = 17, not timed yet, taken at t = 5's ratio); the first stage stays."""
    costs = budget.LMCosts(step={1: 0.5, 5: 2.0, 17: 6.0}, compile=10.0, event=3.0, setup=5.0)
    monkeypatch.setattr(budget, "calibrate_lm", lambda *a: costs)
    cfg = LMTrainConfig(budget_minutes=240.0)
    fitted = budget.fit_lm(cfg, tmp_path)
    refit = Refit(cfg, fitted, tmp_path, LM, resumed=False)
    real = {1: 0.5, 5: 4.0, 17: 12.0}
    run, step, switched = fitted, 0, []
    while step < run.total_steps:
        stage = run.stages[stage_at(run.stages, step)]
        length = stage.lengths[step % len(stage.lengths)]
        step += 1
        new = refit.observe(step, real[length], [length])
        if new is not None:
            run = new
            switched.append(step)
    record = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert record["refit"]["step_ratio"] == 1.0 and record["factor"] == record["calibrated_factor"]
    [short, long] = record["rest"]
    assert (short["kind"], short["step_ratio"]) == ("(5,)", 2.0) and short["share"] < 1
    assert (long["kind"], long["step_ratio"], long["share"]) == ("(17,)", 2.0, 1.0)  # as fitted
    assert switched == [short["step"]]
    assert run.stages[0] == fitted.stages[0] and run.total_steps < fitted.total_steps
    slower = budget.LM.measured(costs, {(1,): 1.0, (5,): 2.0}, 2.0)
    assert slower.step == {1: 0.5, 5: 4.0, 17: 12.0}
    assert 0.97 * AIM * 240 < budget.run_minutes(LM, run, slower) <= AIM * 240
    assert budget.fit_lm(cfg, tmp_path) == run


def _by_weight(stage) -> list[int]:
    """The stage's lengths, each as many times as its weight: cycled through, the mix of
    lengths the loop draws at random and the budget projects."""
    weights = stage.weights or [1] * len(stage.lengths)
    return [t for t, w in zip(stage.lengths, weights, strict=True) for _ in range(w)]


def test_an_lm_run_that_slows_down_in_its_last_stage_fits_it_into_the_time_left(
    tmp_path, monkeypatch
):
    """Every length as calibrated until a third of the way into the last stage, then twice as
    slow: the rest of the last stage is fitted into the time left before the stop."""
    costs = budget.LMCosts(step={1: 0.5, 5: 2.0, 17: 6.0}, compile=10.0, event=3.0, setup=5.0)
    monkeypatch.setattr(budget, "calibrate_lm", lambda *a: costs)
    cfg = LMTrainConfig(budget_minutes=240.0)
    fitted = budget.fit_lm(cfg, tmp_path)
    last = sum(stage.steps for stage in fitted.stages[:-1])
    slow_from = last + fitted.stages[-1].steps // 3
    refit = Refit(cfg, fitted, tmp_path, LM, resumed=False)
    run, step, clock = fitted, 0, 0.0
    while step < run.total_steps and clock <= 60 * run.max_minutes:
        stage = run.stages[stage_at(run.stages, step)]
        length = _by_weight(stage)[step % sum(stage.weights or [1] * len(stage.lengths))]
        step += 1
        took = costs.step[length] * (2.0 if step > slow_from else 1.0)
        clock += took
        run = refit.observe(step, took, [length], clock) or run
        if step % run.eval_every == 0 or step % run.checkpoint_every == 0:
            clock += costs.event * (2.0 if step > slow_from else 1.0)
    late = [r for r in json.loads((tmp_path / BUDGET_FILE).read_text())["rest"]]
    late = [r for r in late if r["kind"] == "late"]
    assert [r["step_ratio"] for r in late] == [2.0] and late[0]["step"] > slow_from
    assert step == run.total_steps < fitted.total_steps and clock <= 60 * run.max_minutes
    assert run.stages[:-1] == fitted.stages[:-1]  # stages begun before stay
    assert budget.fit_lm(cfg, tmp_path) == run


def test_costs_timed_elsewhere_give_a_run_its_budget_without_a_calibration(tmp_path, monkeypatch):
    """``budget_from_costs`` (the recipe's LM phase): the factor fitted to the minutes given
    and recorded as ``fit_run`` records its own, which then trains it as a budgeted run: it
    keeps the factor, stops at the budget and re-fits from its steps."""

    def no_calibration(*args):
        raise AssertionError("costs timed elsewhere are timed again")

    monkeypatch.setattr(budget, "calibrate_lm", no_calibration)
    costs = budget.LMCosts(step={1: 0.5, 5: 2.0, 17: 6.0}, compile=10.0, event=3.0, setup=5.0)
    cfg = LMTrainConfig()  # Loong's stages: t = 1, 5 and 17
    full = budget.projected_minutes(LM, cfg, 1.0, costs)
    minutes = 0.5 * full
    given = budget.budget_from_costs(cfg, tmp_path, LM, costs, minutes)
    assert given == dataclasses.replace(cfg, budget_minutes=minutes)
    record = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert record["minutes"] == minutes and 0.3 < record["factor"] < 0.5
    assert LMCosts.from_record(record["calibration"]) == costs
    fitted = budget.fit_lm(given, tmp_path)
    assert fitted.total_steps == budget.scale_lm(cfg, record["factor"]).total_steps
    assert budget.projected_minutes(LM, cfg, record["factor"], costs) <= AIM * minutes
    assert fitted.max_minutes == pytest.approx(minutes - 5.0 / 60)  # less the run's set-up
    assert Refit(given, fitted, tmp_path, LM, resumed=False).active
    # a resumed run keeps its record, whatever it is given now
    assert budget.budget_from_costs(cfg, tmp_path, LM, costs, 2 * minutes) == given
    assert json.loads((tmp_path / BUDGET_FILE).read_text()) == record
    # a run that started without a budget gets none; a budget too short, none either
    started = tmp_path / "started"
    (started / "checkpoints" / "step_00000010").mkdir(parents=True)
    assert budget.budget_from_costs(cfg, started, LM, costs, minutes) is None
    assert not (started / BUDGET_FILE).exists()
    with pytest.raises(ValueError, match="too short for this language-model run"):
        budget.budget_from_costs(cfg, tmp_path / "short", LM, costs, 0.01 * full)
    assert not (tmp_path / "short" / BUDGET_FILE).exists()


def test_the_cli_refits_a_run_whose_steps_beat_the_calibration(tmp_path, train_config, monkeypatch):  # noqa: F811
    """``loong tokenizer train --minutes`` calibrated at 30 s a step, whose steps then take a
    fraction of a second: after its first steps it is re-fitted to every configured step, and
    resumed it keeps them."""
    costs = TokenizerCosts(step=30.0, gan_step=30.0, event=0.0, setup=0.0, seconds=0.0)
    monkeypatch.setattr(budget, "calibrate_tokenizer", lambda *a, **k: costs)
    monkeypatch.setattr(budget, "REFIT_SHARE", 0.5)  # re-fit a 8-step run after 1 + 4 steps
    monkeypatch.setattr(budget, "REFIT_MIN_STEPS", 4)
    monkeypatch.setattr(budget, "REFIT_SKIP", 1)
    out = tmp_path / "run"
    sets = ["data.n_frames=5", "data.batch_size=2", "eval_clips=2", "continuous_steps=0"]
    sets += ["loss.disc_start_step=1000", "eval_every=1000", "model.base_width=8"]
    args = ["tokenizer", "train", "--preset", "tiny", "--steps", "16", "--out", str(out)]
    args += [arg for s in sets for arg in ("--set", s)]
    minutes = 8.25 * 30 / 60 / AIM  # 8 of the calibrated steps fit: half the 16 configured
    assert cli.main([*args, "--minutes", str(minutes)]) == 0
    record = json.loads((out / BUDGET_FILE).read_text())
    assert round(16 * record["calibrated_factor"]) == 8
    assert record["factor"] == 1.0 and record["refit"]["step"] == 5
    assert json.loads((out / "config.json").read_text())["steps"] == 16
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps[-1] == 16
    assert cli.main(args) == 0  # resumed: the re-fitted steps, already done
    assert json.loads((out / "config.json").read_text())["steps"] == 16


@pytest.mark.parametrize("minutes", [-1.0, math.nan, math.inf])
def test_bad_budgets_are_refused(train_config, minutes):  # noqa: F811
    with pytest.raises(ValueError, match="budget_minutes must be a finite number >= 0"):
        apply_overrides(train_config, {"budget_minutes": minutes})
    with pytest.raises(ValueError, match="budget_minutes must be a finite number >= 0"):
        LMTrainConfig(budget_minutes=minutes)


def test_torchrun_runs_take_steps_not_a_budget(tmp_path, train_config):  # noqa: F811
    with pytest.raises(ValueError, match="under torchrun give --steps"):
        fit_tokenizer(_long(train_config, budget_minutes=10.0), tmp_path, world_size=2)
    assert fit_tokenizer(_long(train_config), tmp_path, world_size=2).steps == 1000
