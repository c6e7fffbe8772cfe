"""The ``loong`` command line: argparse only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="named size to start from (default: tiny)")
    p.add_argument("--config", help="TOML file overriding the preset")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. optim.lr=3e-4",
    )
    p.add_argument(
        "--parallel",
        choices=("none", "ddp", "fsdp"),
        help="data parallelism when launched with torchrun (sets parallel.mode)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loong", description="Text-to-video with an autoregressive model over video tokens."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenizer", help="train and use the video tokenizer")
    tok_cmds = tok.add_subparsers(dest="action", required=True)

    train = tok_cmds.add_parser("train", help="train a tokenizer (resumes if OUT has a checkpoint)")
    _add_config_args(train)
    train.add_argument(
        "--out", default="runs/tokenizer", help="run directory (default: runs/tokenizer)"
    )
    train.add_argument(
        "--data",
        help='"shapes", a folder of videos, or WebDataset tar shards (a .tar file, a brace '
        "pattern or a folder of .tar files); sets data.source",
    )
    train.add_argument("--steps", type=int, help="training steps (sets steps)")
    train.add_argument(
        "--minutes",
        type=float,
        help="fit the run into this much wall time: a few steps are timed first, every step "
        "count is scaled down if the configured ones would not fit, and the run stops there at "
        "the latest (sets budget_minutes; 0 in a new --out: every configured step)",
    )

    enc = tok_cmds.add_parser("encode", help="video file → token file (.safetensors)")
    enc.add_argument("video")
    enc.add_argument(
        "--model", required=True, help="tokenizer directory (config.json + model.safetensors)"
    )
    enc.add_argument("--out", required=True, help="token file to write (.safetensors)")
    enc.add_argument("--size", type=int, help="resize (centre crop) to SIZE×SIZE first")
    enc.add_argument("--fps", type=float, help="resample to this frame rate first")
    enc.add_argument(
        "--chunk-frames", type=int, default=64, help="frames per chunk (multiple of 4)"
    )

    dec = tok_cmds.add_parser("decode", help="token file → video (.mp4 or .gif)")
    dec.add_argument("tokens")
    dec.add_argument("--model", required=True, help="tokenizer directory")
    dec.add_argument("--out", required=True, help="video to write (.mp4 or .gif)")

    ev = tok_cmds.add_parser("eval", help="PSNR, SSIM and codebook usage on held-out clips")
    ev.add_argument("--model", required=True, help="tokenizer directory")
    ev.add_argument(
        "--data", default="shapes", help='"shapes" (held-out seeds) or a folder of videos'
    )
    ev.add_argument("--clips", type=int, default=32, help="clips to evaluate (default: 32)")
    ev.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k (default: 17)")
    ev.add_argument("--size", type=int, default=64, help="clip size in pixels (default: 64)")
    ev.add_argument("--fps", type=float, default=8.0, help="frame rate clips are resampled to")
    lm = commands.add_parser("lm", help="tokenize a dataset and train the video language model")
    lm_cmds = lm.add_subparsers(dest="action", required=True)
    tokenize = lm_cmds.add_parser("tokenize", help="videos + captions → token shards (resumable)")
    tokenize.add_argument("--video-tokenizer", required=True, help="video tokenizer export dir")
    tokenize.add_argument(
        "--data",
        help='"shapes", a folder of captioned videos, or WebDataset tar shards (a .tar file, a '
        "brace pattern or a folder of .tar files); sets source",
    )
    tokenize.add_argument("--captions", help="JSONL of {file, caption} (else sidecar .txt files)")
    tokenize.add_argument(
        "--out", default="runs/shards", help="shards directory (default: runs/shards)"
    )
    tokenize.add_argument("--config", help="TOML file of tokenize settings")
    tokenize.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    lm_train = lm_cmds.add_parser("train", help="progressive short-to-long training (resumes)")
    _add_config_args(lm_train)
    lm_train.add_argument("--shards", nargs="+", help="token shard directories (sets data.shards)")
    lm_train.add_argument("--out", default="runs/lm", help="run directory (default: runs/lm)")
    lm_train.add_argument("--steps", type=int, help="scale every stage to this many steps in all")
    lm_train.add_argument(
        "--minutes",
        type=float,
        help="fit the run into this much wall time: a few steps of each latent length are "
        "timed first, every stage's steps are scaled down if the configured ones would not "
        "fit, and the run stops there at the latest (sets budget_minutes; 0 in a new --out: every "
        "step)",
    )

    gen = commands.add_parser("generate", help="text → video (.mp4/.gif), written as it is sampled")
    gen.add_argument("prompt", help='e.g. "a red circle moves right"')
    gen.add_argument("--model", help="language model export directory (default: the bundled model)")
    gen.add_argument("--video-tokenizer", help="override the model's paired video tokenizer")
    gen.add_argument("--seconds", type=float, default=4.0, help="video length (default: 4)")
    gen.add_argument("--out", required=True, help="video to write (.mp4 or .gif)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--gif", action="store_true", help="also write a GIF beside the mp4")
    gen.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    gen.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16", "int8"),
        help="language model dtype while sampling (auto: float32 on CPU, bfloat16 on GPU; "
        "int8: int8 weights, bfloat16 activations)",
    )
    gen.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="sampling override, e.g. temperature=0.9, top_k=100, reencode=false",
    )

    recipe = commands.add_parser("recipe", help="train a whole model from scratch in one command")
    recipe_cmds = recipe.add_subparsers(dest="name", required=True)
    shapes = recipe_cmds.add_parser(
        "shapes", help="tokenizer + LM on the shapes world, on a CPU, into a bundle (resumes)"
    )
    shapes.add_argument("--out", default="runs/recipe", help="run directory (default: runs/recipe)")
    shapes.add_argument("--config", help="TOML file overriding the recipe")
    shapes.add_argument(
        "--minutes",
        type=float,
        help="wall-time budget (default 90): fewer steps of everything when this machine is "
        "slower; 0: every configured step (sets minutes)",
    )
    shapes.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. lm.batch_size=4"
    )
    shapes.add_argument(
        "--install",
        action="store_true",
        help="copy the bundle into this install of loong as the default model of `generate`",
    )

    bench = commands.add_parser("bench", help="measure a model")
    bench_cmds = bench.add_subparsers(dest="name", required=True)
    fid = bench_cmds.add_parser(
        "fidelity", help="minute-long videos of canonical prompts, scored from their pixels"
    )
    fid.add_argument("--model", help="LM export directory (default: the bundled model)")
    fid.add_argument(
        "--source",
        default="model",
        choices=("model", "tokenizer", "world"),
        help="generated videos (default), or the world's own through the tokenizer, or as is",
    )
    fid.add_argument("--prompt", action="append", help="a prompt (repeatable; default: canonical)")
    fid.add_argument("--seeds", type=int, nargs="+", help="seeds per prompt (default: 0)")
    fid.add_argument("--seconds", type=float, help="video length (default: 60)")
    fid.add_argument("--out", default="runs/bench/fidelity", help="output directory")
    fid.add_argument("--save-videos", action="store_true", help="also write every video (mp4)")
    fid.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    fid.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16", "int8"),
        help="language model dtype (auto: float32 on CPU, else bf16; int8: int8 weights, bf16 "
        "activations)",
    )
    fid.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. generate.reencode=false, generate.temperature=0.9",
    )

    from loong.plan import add_plan_parser

    add_plan_parser(commands)

    info = tok_cmds.add_parser("info", help="a preset's parameter count and shapes (built on meta)")
    info.add_argument("--preset", default="tiny", help="preset name (default: tiny)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        if args.command == "tokenizer":
            return _tokenizer(args)
        if args.command == "lm":
            return _lm(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "recipe":
            return _recipe(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "plan":
            from loong.plan import run_plan

            return run_plan(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"loong: error: {e}", file=sys.stderr)
        return 2
    return 1


def _tokenizer(args: argparse.Namespace) -> int:
    from loong.video_tokenizer.model import VideoTokenizer

    if args.action == "train":
        from loong.config import resolve_config
        from loong.train.tokenizer import train_tokenizer
        from loong.train.tokenizer_config import tokenizer_train_preset

        sets = list(args.set)
        if args.data:
            sets.append(f"data.source={_toml_string(args.data)}")
        if args.steps is not None:
            sets.append(f"steps={args.steps}")
        if args.minutes is not None:
            sets.append(f"budget_minutes={args.minutes}")
        if args.parallel:
            sets.append(f"parallel.mode={_toml_string(args.parallel)}")
        cfg = resolve_config(tokenizer_train_preset(args.preset), args.config, sets)
        with _process_group():
            export = train_tokenizer(cfg, args.out)
            _say(f"tokenizer exported to {export}; previews in {Path(args.out) / 'previews'}")
        return 0

    if args.action == "info":
        import torch

        with torch.device("meta"):
            model = VideoTokenizer.from_preset(args.preset)
        cfg = model.config
        s, r = cfg.spatial_compression, cfg.temporal_compression
        print(f"preset {args.preset}: {model.num_parameters():,} parameters")
        print(
            f"  compression {r}× time, {s}× space; "
            f"{cfg.quantizer.kind} with {cfg.vocab_size:,} codes"
        )
        print(
            f"  encoder {sum(p.numel() for p in model.encoder.parameters()):,}, "
            f"decoder {sum(p.numel() for p in model.decoder.parameters()):,}"
        )
        return 0

    model = VideoTokenizer.from_pretrained(args.model)
    if args.action == "encode":
        from loong.video_tokenizer.files import encode_file

        shape = encode_file(
            model,
            args.video,
            args.out,
            size=args.size,
            fps=args.fps,
            chunk_frames=args.chunk_frames,
        )
        print(f"wrote {args.out}: tokens {shape[0]}×{shape[1]}×{shape[2]}")
    elif args.action == "decode":
        from loong.video_tokenizer.files import decode_file

        n = decode_file(model, args.tokens, args.out)
        print(f"wrote {args.out}: {n} frames")
    elif args.action == "eval":
        from loong.train.tokenizer import evaluate
        from loong.train.tokenizer_config import TokenizerDataConfig
        from loong.train.tokenizer_data import held_out_clips

        source = "" if args.data == "shapes" else args.data
        data = TokenizerDataConfig(
            n_frames=args.frames, size=args.size, fps=args.fps, eval_folder=source
        )
        result = evaluate(model, held_out_clips(data, args.clips))
        for key, value in result.items():
            print(f"{key:>15}: {value:.4f}")
    return 0


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Leave the process group a loop joined under torchrun (training, tokenizing) when done."""
    from loong.train.dist import destroy_distributed

    try:
        yield
    finally:
        destroy_distributed()


def _say(message: str) -> None:
    """Print on one process only (rank 0 under torchrun)."""
    from loong.train.dist import is_main_process

    if is_main_process():
        print(message)


def _lm(args: argparse.Namespace) -> int:
    from loong.config import resolve_config

    if args.action == "tokenize":
        from loong.data.shards import EVAL_DIR, TokenizeConfig, tokenize_dataset

        sets = [f"video_tokenizer={_toml_string(args.video_tokenizer)}", *args.set]
        if args.data:
            sets.append(f"source={_toml_string(args.data)}")
        if args.captions:
            sets.append(f"captions={_toml_string(args.captions)}")
        cfg = resolve_config(TokenizeConfig(), args.config, sets)
        with _process_group():
            out = tokenize_dataset(cfg, args.out)
            held = out / EVAL_DIR
            _say(f"token shards in {out}" + (f", held-out ones in {held}" if held.is_dir() else ""))
        return 0

    from loong.train.lm import train_lm
    from loong.train.lm_config import lm_train_preset, scale_stages

    sets = list(args.set)
    if args.shards:
        sets.append(f"data.shards={json.dumps(args.shards)}")
    if args.minutes is not None:
        sets.append(f"budget_minutes={args.minutes}")
    if args.parallel:
        sets.append(f"parallel.mode={_toml_string(args.parallel)}")
    cfg = resolve_config(lm_train_preset(args.preset), args.config, sets)
    if args.steps is not None:
        cfg = scale_stages(cfg, args.steps)
    with _process_group():
        export = train_lm(cfg, args.out)
        _say(f"language model exported to {export}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from loong.config import apply_overrides, parse_set
    from loong.generate import GenerateConfig, generate_video

    config = GenerateConfig(seconds=args.seconds, seed=args.seed)
    config = apply_overrides(config, parse_set(args.set))
    out = generate_video(
        args.prompt,
        model_dir=args.model,
        out=args.out,
        gif=args.gif,
        config=config,
        video_tokenizer_dir=args.video_tokenizer,
        device=args.device,
        lm_dtype=args.dtype,
    )
    print(f"wrote {out}")
    return 0


def _recipe(args: argparse.Namespace) -> int:
    import shutil

    import loong
    from loong.config import resolve_config
    from loong.generate import BUNDLED_MODEL
    from loong.recipe import ShapesRecipeConfig, run_shapes_recipe

    sets = [*args.set, *([f"minutes={args.minutes}"] if args.minutes is not None else [])]
    cfg = resolve_config(ShapesRecipeConfig(), args.config, sets)
    lm_dir = run_shapes_recipe(cfg, args.out)
    print(f"bundle written to {lm_dir.parent}; run: loong generate PROMPT --model {lm_dir} ...")
    if args.install:
        dest = Path(loong.__file__).parent / Path(BUNDLED_MODEL).parent
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(lm_dir.parent, dest)
        print(f"installed as the default model: {dest}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from loong.config import apply_overrides, parse_set
    from loong.evaluate.bench import FidelityBenchConfig, format_table, run_fidelity_bench
    from loong.generate import TextToVideo

    cfg = FidelityBenchConfig(source=args.source, save_videos=args.save_videos)
    if args.prompt:
        cfg.prompts = tuple(args.prompt)
    if args.seeds:
        cfg.seeds = tuple(args.seeds)
    if args.seconds is not None:
        cfg.seconds = args.seconds
    cfg = apply_overrides(cfg, parse_set(args.set))
    pipe = None
    if cfg.source != "world":
        pipe = TextToVideo.from_pretrained(args.model, device=args.device, lm_dtype=args.dtype)
    result = run_fidelity_bench(cfg, args.out, pipe=pipe)
    print(format_table(result))
    print(f"wrote {Path(args.out) / 'fidelity.json'} and fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
