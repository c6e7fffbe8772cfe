"""Wall time of one-minute videos, the way `loong generate` makes them: speculative decoding
on and off, per LM dtype.

    python benchmarks/generate_speed.py [--model DIR] [--seconds 60] [--speculate 0 16]
        [--prompts 8] [--seeds 0] [--dtypes float32]

Times ``generate_video`` end to end (prompt → sampled ids → decoded frames → mp4 on disk, with
re-encoding) for each prompt and seed, every ``--speculate`` setting back to back in one
process, after one untimed warm-up video; the order of the settings rotates from one video to
the next, so drift in the machine's speed and the first runs' costs hit them alike.
Speculative decoding samples from the same distribution but draws other random numbers, so
each setting makes its own (equally likely) video and its speed depends on how often the latent
frame before predicts the next: hence several prompts and seeds, and the LM forwards counted
beside the time.
Without ``--model`` it uses the bundled model; ``--random`` builds the ``shapes`` presets with
random weights (their videos do not repeat, so drafts are rarely kept). Writes a JSON line per
run and a summary to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import block_network, cpu_model
from loong.data.video import VideoWriter
from loong.evaluate.bench import CANONICAL_PROMPTS
from loong.generate import GenerateConfig, GenerationMetadata, TextToVideo
from loong.lm.model import VideoLM
from loong.lm.presets import lm_preset
from loong.text_tokenizer import TextTokenizer
from loong.video_tokenizer.model import VideoTokenizer
from loong.video_tokenizer.presets import tokenizer_preset


def random_bundle(directory: Path) -> Path:
    """The ``shapes`` presets with random weights, laid out as a bundle; returns its LM dir."""
    torch.manual_seed(0)
    VideoTokenizer(tokenizer_preset("shapes")).save_pretrained(directory / "tokenizer")
    VideoLM(lm_preset("shapes")).save_pretrained(directory / "lm")
    captions = ["a red circle moves right", "a large blue square moves up-left quickly"] * 50
    TextTokenizer.train(captions, vocab_size=300).save(directory / "lm")
    GenerationMetadata(
        video_tokenizer="../tokenizer", latent_grid=(8, 8), clip_latents=9, fps=8.0
    ).write(directory / "lm")
    return directory / "lm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="LM export (default: the bundled model)")
    parser.add_argument("--random", action="store_true", help="shapes presets, random weights")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--prompts", type=int, default=len(CANONICAL_PROMPTS), help="the first N")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--speculate", type=int, nargs="+", default=[0, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="runs/generate_speed.json")
    args = parser.parse_args()
    block_network("generate_speed")
    torch.set_num_threads(args.threads)
    forwards = [0]

    def count(module, inputs, output) -> None:
        forwards[0] += 1

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = random_bundle(Path(tmp) / "bundle") if args.random else args.model
        for dtype in args.dtypes:
            pipe = TextToVideo.from_pretrained(model, lm_dtype=dtype)
            pipe.lm.register_forward_hook(count)
            warm = GenerateConfig(seconds=2, progress=False)
            pipe(CANONICAL_PROMPTS[0], warm)  # untimed: first calls allocate and load kernels
            turn = -1
            for prompt in CANONICAL_PROMPTS[: args.prompts]:
                for seed in args.seeds:
                    turn += 1  # rotate the order of the settings from one video to the next
                    shift = turn % len(args.speculate)
                    for speculate in args.speculate[shift:] + args.speculate[:shift]:
                        config = GenerateConfig(
                            seconds=args.seconds, seed=seed, speculate=speculate, progress=False
                        )
                        forwards[0] = 0
                        started = time.perf_counter()
                        with VideoWriter(Path(tmp) / "video.mp4", pipe.plan(config).fps) as writer:
                            for chunk in pipe.stream(prompt, config):
                                writer.write(chunk)
                        wall = time.perf_counter() - started
                        frames = round(args.seconds * pipe.plan(config).fps)
                        row = {
                            "dtype": dtype,
                            "prompt": prompt,
                            "seed": seed,
                            "speculate": speculate,
                            "wall_s": round(wall, 2),
                            "frames_per_s": round(frames / wall, 2),
                            "lm_forwards": forwards[0],
                        }
                        results.append(row)
                        print(json.dumps(row), flush=True)
    summary = []
    for dtype in args.dtypes:
        for speculate in args.speculate:
            rows = [r for r in results if r["dtype"] == dtype and r["speculate"] == speculate]
            walls = sorted(r["wall_s"] for r in rows)
            summary.append(
                {
                    "dtype": dtype,
                    "speculate": speculate,
                    "runs": len(rows),
                    "mean_wall_s": round(sum(walls) / len(walls), 2),
                    "median_wall_s": walls[len(walls) // 2],
                    "max_wall_s": walls[-1],
                    "mean_lm_forwards": round(sum(r["lm_forwards"] for r in rows) / len(rows)),
                }
            )
            print(json.dumps(summary[-1]))
    meta = {
        "seconds_of_video": args.seconds,
        "model": "random shapes presets" if args.random else str(model or "bundled"),
        "threads": args.threads,
        "cpu": cpu_model(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    lines = [meta, *results, *summary]
    Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in lines))


if __name__ == "__main__":
    main()
