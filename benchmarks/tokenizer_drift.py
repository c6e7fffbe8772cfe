"""Whether a video tokenizer holds past its training clips: one long pass against short clips.

    python benchmarks/tokenizer_drift.py runs/recipe/tokenizer/export [more exports ...]
    python benchmarks/tokenizer_drift.py src/loong/models/shapes/tokenizer --frames 161 --clip 33

A causal tokenizer trained on 9-frame clips sees, in a longer video, histories longer than any it
trained on. This renders each canonical prompt of ``loong bench fidelity`` (world seed 0) and
passes it through the tokenizer two ways: the whole video in one pass (as the LM's shards and a
minute's decoding do), and as fresh clips of the training length, each starting where the last
ended (its first frame encoded again as an image). Per prompt it prints the share of frames whose
object the scorer reads in the caption's colour, each way, and the share of the video ids of
the one-pass encoding that a fresh clip gives too (its first latent frame left out: that one is
an image's id by design). A tokenizer that holds gives the same colours both ways and ids that
mostly agree; one that drifts loses colours in the long pass only.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from loong.data.shapes import parse_caption, render
from loong.data.video import frames_to_tensor, tensor_to_frames
from loong.evaluate.bench import CANONICAL_PROMPTS
from loong.evaluate.fidelity import measure_frame
from loong.video_tokenizer.model import VideoTokenizer


def colour_share(frames: np.ndarray, colour: str) -> float:
    """Share of ``frames`` (T, H, W, 3) whose largest blob reads as ``colour`` (none: wrong)."""
    measured = [measure_frame(f) for f in frames]
    return float(np.mean([m is not None and m.colour == colour for m in measured]))


def report(directory: str, tokenizer: VideoTokenizer, n_frames: int, clip: int) -> None:
    r = tokenizer.config.temporal_compression
    if (n_frames - 1) % (clip - 1) or (clip - 1) % r:
        raise SystemExit(
            f"--frames {n_frames} and --clip {clip}: need clip = 1 + {r}k and frames = "
            f"1 + a whole number of (clip - 1)"
        )
    print(f"{directory}: {n_frames} frames, one pass against fresh {clip}-frame clips")
    print(f"{'prompt':52s} {'colour, one pass':>16s} {'colour, clips':>14s} {'same ids':>9s}")
    totals = []
    for prompt in CANONICAL_PROMPTS:
        scene = parse_caption(prompt)
        colour = scene.objects[0].colour
        frames = render(scene, seed=0, n_frames=n_frames, height=64, width=64)
        video = frames_to_tensor(frames)[None]  # (1, C, T, H, W)
        with torch.no_grad():
            ids = tokenizer.encode(video)  # (1, t, h, w)
            whole = tensor_to_frames(tokenizer.decode(ids)[0])
            pieces, agree = [], []
            for start in range(0, n_frames - 1, clip - 1):
                part = tokenizer.encode(video[:, :, start : start + clip])  # (1, 1 + k, h, w)
                first = start // r
                agree.append((part[:, 1:] == ids[:, first + 1 : first + part.shape[1]]).float())
                decoded = tensor_to_frames(tokenizer.decode(part)[0])
                pieces.append(decoded if start == 0 else decoded[1:])
        clips = np.concatenate(pieces)
        row = (
            colour_share(whole, colour),
            colour_share(clips, colour),
            float(torch.cat([a.flatten() for a in agree]).mean()),
        )
        totals.append(row)
        print(f"{prompt:52s} {row[0]:16.2f} {row[1]:14.2f} {row[2]:9.2f}")
    mean = np.mean(totals, axis=0)
    print(f"{'all prompts':52s} {mean[0]:16.2f} {mean[1]:14.2f} {mean[2]:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", help="video tokenizer export directories")
    parser.add_argument("--frames", type=int, default=81, help="length of each video (1 + 8k)")
    parser.add_argument("--clip", type=int, default=9, help="the training clips' length")
    args = parser.parse_args()
    for directory in args.exports:
        report(directory, VideoTokenizer.from_pretrained(directory).eval(), args.frames, args.clip)


if __name__ == "__main__":
    main()
