"""``loong recipe shapes`` at toy size: every step runs, the bundle loads and generates, and a
second run resumes by skipping what is done; ``loong bench fidelity`` on the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loong.cli import main
from loong.data.video import read_video
from loong.generate import TextToVideo

TOY = {
    "minutes": 0,  # no calibration (tests/test_recipe_budget.py has it)
    # tokenizer: the shapes preset's layout at a fraction of its width, two steps
    "tokenizer.model.base_width": 8,
    "tokenizer.model.num_groups": 4,
    "tokenizer.model.quantizer.latent_dim": 6,
    "tokenizer.model.quantizer.entropy_group_bits": 6,
    "tokenizer.steps": 2,
    "tokenizer.continuous_steps": 1,  # the recipe's warm start, then one quantized step
    "tokenizer.eval_every": 2,
    "tokenizer.eval_clips": 2,
    "tokenizer.preview_every": 1000,
    "tokenizer.data.batch_size": 2,
    "tokenizer.data.n_frames": 5,
    "tokenizer_long.steps": 1,  # then one step on clips as long as the shards'
    "tokenizer_long.n_frames": 9,
    # shards: a few 9-frame clips
    "shards.n_clips": 12,
    "shards.n_frames": 9,
    "shards.text_vocab_size": 300,
    "eval_clips": 3,
    # lm: a two-layer model, stages of a few steps over t = 1, 2, 3
    "lm.model.dim": 32,
    "lm.model.n_layers": 2,
    "lm.model.n_heads": 2,
    "lm.model.n_kv_heads": 1,
    "lm.model.vocab.text_vocab_size": 300,
    "lm.model.vocab.video_vocab_size": 64,
    "lm.model.video_code_bits": 6,  # trained with the bit terms, bundled without them
    "lm.model.max_seq_len": 512,
    "lm.batch_size": 2,
    "lm.eval_items": 2,
    "lm.log_every": 1,
    "lm.stages": (
        '[{name="image", steps=2, lengths=[1]}, {name="short", steps=2, lengths=[1, 2]},'
        ' {name="long", steps=2, lengths=[1, 3], weights=[1, 3]}]'
    ),
}


def _sets(values: dict[str, object]) -> list[str]:
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    assert main(["recipe", "shapes", "--out", str(out), *_sets(TOY)]) == 0
    return out


def test_recipe_runs_every_step_and_records_it(recipe_dir):
    state = json.loads((recipe_dir / "recipe.json").read_text())
    assert list(state) == ["tokenizer", "tokenizer_long", "shards", "lm", "bundle"]
    assert all(step["seconds"] >= 0 for step in state.values())
    assert np.isfinite(state["lm"]["loss"]) and np.isfinite(state["tokenizer"]["eval_psnr"])
    assert 0 < state["bundle"]["megabytes"] < 1
    stages = [json.loads(line)["stage"] for line in (recipe_dir / "lm" / "metrics.jsonl").open()]
    assert stages[0] == "image" and stages[-1] == "long"  # progressive, in order
    # the LM is evaluated on clips of another seed, which it never trains on
    train = json.loads((recipe_dir / "lm" / "config.json").read_text())
    assert train["data"]["eval_shards"] == str(recipe_dir / "eval_shards")
    seeds = [
        json.loads((recipe_dir / d / "meta.json").read_text())["params"]["seed"]
        for d in ("shards", "eval_shards")
    ]
    assert seeds[0] != seeds[1]


def test_bundle_is_float16_self_contained_and_generates(recipe_dir, tmp_path):
    bundle = recipe_dir / "bundle"
    for part in ("lm", "tokenizer"):
        weights = load_file(bundle / part / "model.safetensors")
        assert {str(w.dtype) for w in weights.values()} == {"torch.float16"}
    meta = json.loads((bundle / "lm" / "generation.json").read_text())
    assert meta["video_tokenizer"] == "../tokenizer" and meta["clip_latents"] == 3
    assert meta["reencode"] is False  # the recipe's measured default (ShapesRecipeConfig)
    moved = tmp_path / "elsewhere"
    bundle.rename(moved)  # the bundle names nothing outside itself
    try:
        pipe = TextToVideo.from_pretrained(moved / "lm")
        out = tmp_path / "clip.mp4"
        args = ["generate", "a red circle moves right", "--model", str(moved / "lm")]
        assert main([*args, "--out", str(out), "--seconds", "3"]) == 0
        frames, _ = read_video(out)
        assert frames.shape == (24, 64, 64, 3)  # past the 9-frame clips by sliding windows
        assert next(pipe.lm.parameters()).dtype == torch.float32  # float16 on disk, cast back
        assert pipe.lm.config.video_code_bits == 0 and pipe.lm.code_embedding is None
    finally:
        moved.rename(bundle)


def test_a_second_run_skips_the_finished_steps(recipe_dir, caplog):
    before = (recipe_dir / "recipe.json").read_text()
    with caplog.at_level("INFO", logger="loong"):
        assert main(["recipe", "shapes", "--out", str(recipe_dir), *_sets(TOY)]) == 0
    assert (recipe_dir / "recipe.json").read_text() == before
    assert sum("skipped" in r.message for r in caplog.records) == 5


def test_the_long_clip_run_starts_from_the_first_and_is_what_ships(recipe_dir):
    state = json.loads((recipe_dir / "recipe.json").read_text())
    assert np.isfinite(state["tokenizer_long"]["eval_psnr"])
    run = json.loads((recipe_dir / "tokenizer_long" / "config.json").read_text())
    first = json.loads((recipe_dir / "tokenizer" / "config.json").read_text())
    assert run["init_from"] == str(recipe_dir / "tokenizer" / "export")
    assert (run["steps"], run["continuous_steps"], run["data"]["n_frames"]) == (1, 0, 9)
    assert run["model"] == first["model"] and first["data"]["n_frames"] == 5
    long = load_file(recipe_dir / "tokenizer_long" / "export" / "model.safetensors")
    short = load_file(recipe_dir / "tokenizer" / "export" / "model.safetensors")
    shipped = load_file(recipe_dir / "bundle" / "tokenizer" / "model.safetensors")
    assert all(torch.equal(shipped[k], long[k].half()) for k in long)
    assert not all(torch.equal(long[k], short[k]) for k in long)  # the step trained


def test_tokenizer_from_reuses_an_export_instead_of_training(recipe_dir, tmp_path):
    source = recipe_dir / "tokenizer_long" / "export"
    out = tmp_path / "reuse"
    sets = [*_sets(TOY), "--set", f'tokenizer_from="{source}"', "--set", "tokenizer_long.steps=0"]
    assert main(["recipe", "shapes", "--out", str(out), *sets]) == 0
    assert not (out / "tokenizer" / "checkpoints").exists()  # nothing was trained
    assert not (out / "tokenizer_long").exists()
    assert "eval_psnr" not in json.loads((out / "recipe.json").read_text())["tokenizer"]
    copied = load_file(out / "tokenizer" / "export" / "model.safetensors")
    original = load_file(source / "model.safetensors")
    assert copied.keys() == original.keys()
    assert all(torch.equal(copied[k], original[k]) for k in original)
    # the shards were made with the reused tokenizer: the same clips give the same ids
    for name in ("shards", "eval_shards"):
        ids = sorted((recipe_dir / name).glob("*.npy"))
        assert ids and [p.name for p in ids] == sorted(p.name for p in (out / name).glob("*.npy"))
        assert all(np.array_equal(np.load(p), np.load(out / name / p.name)) for p in ids)


def test_code_bits_need_an_lfq_tokenizer(tmp_path, capsys):
    args = ["recipe", "shapes", "--out", str(tmp_path / "r"), *_sets(TOY)]
    assert main([*args, "--set", 'tokenizer.model.quantizer.kind="cvq"']) == 2
    err = capsys.readouterr().err
    assert "video_code_bits" in err and "'cvq'" in err and "video_code_bits=0" in err


def test_negative_long_clip_steps_are_refused(tmp_path, capsys):
    args = ["recipe", "shapes", "--out", str(tmp_path / "r"), *_sets(TOY)]
    assert main([*args, "--set", "tokenizer_long.steps=-1"]) == 2
    assert "tokenizer_long.steps" in capsys.readouterr().err


def test_tokenizer_from_must_be_an_export(tmp_path, capsys):
    args = ["recipe", "shapes", "--out", str(tmp_path / "r"), *_sets(TOY)]
    assert main([*args, "--set", f'tokenizer_from="{tmp_path}"']) == 2
    assert "tokenizer_from" in capsys.readouterr().err


def test_bench_fidelity_on_the_toy_bundle_writes_table_json_and_plot(recipe_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "fidelity", "--model", str(recipe_dir / "bundle" / "lm"), "--out", str(out)]
    args += ["--prompt", "a red circle moves right", "--seconds", "4", "--seeds", "0", "1"]
    args += ["--set", "span_seconds=2.0", "--set", "generate.reencode=true"]  # bundle: off
    assert main(args) == 0
    result = json.loads((out / "fidelity.json").read_text())
    assert len(result["videos"]) == 2 and len(result["mean_spans"]) == 2
    assert result["config"]["generate"]["reencode"] is True
    assert all(0.0 <= x <= 1.0 for x in result["mean_spans"])
    assert (out / "fidelity.png").stat().st_size > 1000
    assert "a red circle moves right (1)" in capsys.readouterr().out


def test_bench_fidelity_records_the_models_own_reencode_setting(recipe_dir, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "fidelity", "--model", str(recipe_dir / "bundle" / "lm"), "--out", str(out)]
    args += ["--prompt", "a red circle moves right", "--seconds", "2", "--seeds", "0"]
    assert main(args) == 0  # no generate.reencode: the bundle's generation.json decides
    result = json.loads((out / "fidelity.json").read_text())
    assert result["config"]["generate"]["reencode"] is False


def test_bench_fidelity_scores_the_worlds_own_videos_one(tmp_path, capsys):
    out = tmp_path / "world"
    args = ["bench", "fidelity", "--source", "world", "--seconds", "20", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "fidelity.json").read_text())
    assert len(result["videos"]) == 8 and result["mean_spans"] == [1.0, 1.0]
    assert set(result["mean_checks"].values()) == {1.0}


def test_bench_rejects_two_object_prompts(tmp_path, capsys):
    args = ["bench", "fidelity", "--source", "world", "--out", str(tmp_path)]
    args += ["--prompt", "a red circle moves right and a blue square moves up"]
    assert main(args) == 2
    assert "single-object" in capsys.readouterr().err


@pytest.mark.parametrize("native_bf16", [False, True])
def test_the_recipe_warns_on_a_cpu_without_native_bf16(native_bf16, monkeypatch, caplog):
    import loong.recipe as recipe

    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = recipe.ShapesRecipeConfig().lm
    with caplog.at_level("WARNING", logger="loong"):
        recipe._warn_if_fp32_cpu(lm)
    warned = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native_bf16 else 1)
    # fp32 asked for explicitly: the user knows, no warning
    caplog.clear()
    fp32 = recipe.ShapesRecipeConfig().lm
    fp32.parallel.cpu_mixed_precision = "fp32"
    with caplog.at_level("WARNING", logger="loong"):
        recipe._warn_if_fp32_cpu(fp32)
    assert not [r for r in caplog.records if "no native bf16" in r.getMessage()]
