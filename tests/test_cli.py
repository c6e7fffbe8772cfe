"""The ``loong`` command line: tokenizer encode → decode → eval, and clear errors for bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.torch import load_file

from loong.cli import main
from loong.data.shapes import Scene, ShapeObject, render
from loong.data.video import read_video, write_video


@pytest.fixture
def model_dir(tmp_path, make_small_tokenizer):
    directory = tmp_path / "tokenizer"
    make_small_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def video_file(tmp_path):
    scene = Scene(objects=(ShapeObject(colour="red", shape="square", direction="right"),))
    path = tmp_path / "clip.mp4"
    write_video(path, render(scene, seed=0, n_frames=20), fps=8)
    return path


def test_encode_then_decode_writes_a_video_of_the_encoded_length(
    tmp_path, model_dir, video_file, capsys
):
    tokens = tmp_path / "tokens.safetensors"
    assert (
        main(
            [
                "tokenizer",
                "encode",
                str(video_file),
                "--model",
                str(model_dir),
                "--out",
                str(tokens),
                "--chunk-frames",
                "8",
            ]
        )
        == 0
    )
    indices = load_file(tokens)["indices"]
    assert tuple(indices.shape) == (5, 8, 8)  # 20 frames → the 17-frame prefix → 5 latent frames
    out = tmp_path / "decoded.mp4"
    assert (
        main(["tokenizer", "decode", str(tokens), "--model", str(model_dir), "--out", str(out)])
        == 0
    )
    frames, fps = read_video(out)
    assert frames.shape == (17, 64, 64, 3) and fps == pytest.approx(8.0)
    assert "17 frames" in capsys.readouterr().out


def test_eval_prints_psnr_ssim_and_codebook_usage(model_dir, capsys):
    args = ["tokenizer", "eval", "--model", str(model_dir), "--clips", "2", "--frames", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for key in ("psnr", "ssim", "codebook_usage", "perplexity"):
        assert key in printed


def test_a_corrupt_video_gives_a_one_line_error_naming_the_file(tmp_path, model_dir, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    code = main(
        [
            "tokenizer",
            "encode",
            str(bad),
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "t.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "broken.mp4" in err and "Traceback" not in err


def test_a_missing_model_directory_is_named_in_the_error(tmp_path, video_file, capsys):
    code = main(
        [
            "tokenizer",
            "encode",
            str(video_file),
            "--model",
            str(tmp_path / "nope"),
            "--out",
            "x.safetensors",
        ]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_unknown_set_keys_are_rejected_before_training(tmp_path, capsys):
    code = main(
        ["tokenizer", "train", "--set", "optim.learning_rate=1", "--out", str(tmp_path / "run")]
    )
    assert code == 2
    assert "optim.learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("steps=1.5", "steps must be an integer, got 1.5"),
        ("model.local_encoder=maybe", "model.local_encoder must be true or false, got 'maybe'"),
        ("loss.reconstruction=1", "loss.reconstruction must be a string, got 1"),
    ],
)
def test_set_values_of_the_wrong_type_are_rejected_by_name(tmp_path, capsys, setting, message):
    args = ["tokenizer", "train", "--preset", "shapes", "--set", setting]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_generate_rejects_a_sampling_setting_of_the_wrong_type(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    args = ["generate", "a red circle moves right", "--seconds", "1", "--out", str(out)]
    assert main([*args, "--set", "reencode=maybe"]) == 2
    assert "reencode must be true or false, got 'maybe'" in capsys.readouterr().err
    assert not out.exists()


def test_info_prints_the_parameter_count_of_the_paper_preset(capsys):
    assert main(["tokenizer", "info", "--preset", "loong-246m"]) == 0
    count = re.search(r"([\d,]+) parameters", capsys.readouterr().out).group(1)
    assert abs(int(count.replace(",", "")) - 246e6) < 0.1 * 246e6


def test_end_to_end_tokenize_train_generate_past_the_trained_length(tmp_path, model_dir, capsys):
    """Shapes world → token shards → a 3-stage LM run → a video 3× longer than its clips."""
    shards, run = tmp_path / "shards", tmp_path / "lm"
    tokenize = ["lm", "tokenize", "--video-tokenizer", str(model_dir), "--out", str(shards)]
    tokenize += ["--set", "n_clips=16", "--set", "n_frames=17", "--set", "text_vocab_size=300"]
    assert main(tokenize) == 0
    model = {
        "model.dim": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.n_kv_heads": 1,
        "model.vocab.text_vocab_size": 300,
        "model.vocab.video_vocab_size": 64,
        "model.max_seq_len": 512,
        "batch_size": 4,
        "eval_every": 1000,
        "log_every": 1,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
    }
    train = ["lm", "train", "--shards", str(shards), "--out", str(run), "--steps", "24"]
    for key, value in model.items():
        train += ["--set", f"{key}={value}"]
    assert main(train) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4])

    out = tmp_path / "video.mp4"
    args = [
        "generate",
        "a red circle moves right",
        "--model",
        str(run / "export"),
        "--out",
        str(out),
    ]
    assert main([*args, "--seconds", "6", "--seed", "1"]) == 0
    frames, fps = read_video(out)
    assert frames.shape == (48, 64, 64, 3) and fps == pytest.approx(8.0)  # clips were 17 frames
    assert main(["generate", "", "--model", str(run / "export"), "--out", str(out)]) == 2
    assert "prompt" in capsys.readouterr().err
