"""Wall time of a one-minute video, the way `loong generate` makes it, per LM dtype.

    python benchmarks/generate_speed.py [--model DIR] [--seconds 60] [--dtypes float32 float16]

Times ``generate_video`` end to end (prompt → sampled ids → decoded frames → mp4 on disk, with
re-encoding) for the same prompt and seed in each dtype, in one process, one after the other.
Without ``--model`` it uses the bundled model; ``--random`` instead builds the ``shapes``
presets with random weights, which sample just as fast (speed does not depend on the weights).
Writes a JSON line per dtype to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import block_network, cpu_model
from loong.generate import GenerationMetadata, generate_video
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
    parser.add_argument("--prompt", default="a red circle moves right")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="runs/generate_speed.json")
    args = parser.parse_args()
    block_network("generate_speed")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = random_bundle(Path(tmp) / "bundle") if args.random else args.model
        results = []
        for dtype in args.dtypes:
            started = time.perf_counter()
            generate_video(
                args.prompt,
                model_dir=model,
                out=Path(tmp) / f"{dtype}.mp4",
                seconds=args.seconds,
                seed=0,
                lm_dtype=dtype,
            )
            wall = time.perf_counter() - started
            frames = round(args.seconds * 8)
            row = {
                "dtype": dtype,
                "seconds_of_video": args.seconds,
                "wall_s": round(wall, 2),
                "frames_per_s": round(frames / wall, 2),
                "model": "random shapes presets" if args.random else str(model or "bundled"),
                "threads": args.threads,
                "cpu": cpu_model(),
            }
            results.append(row)
            print(json.dumps(row))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
