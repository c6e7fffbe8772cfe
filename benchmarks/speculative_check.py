"""Does speculative decoding sample what plain sampling samples? Statistics of many seeds.

    python benchmarks/speculative_check.py [--model DIR] [--seeds 150] [--first-seed 0]
        [--latents 4] [--prompts "a red circle moves right" ...] [--speculate 0 64]

For each prompt and ``--speculate`` setting, samples ``--latents`` latent frames after the
prompt ``[BOS] caption [BOV]`` (with ``--context-latents n`` followed by n latent frames of the
world's rendering of the caption, as a sliding window's prefix) for ``--seeds`` seeds from
``--first-seed``, and reports, as mean ± standard error over the seeds: the mean log-probability
the model gives its own sampled ids (teacher-forced, one full forward) and the share of the last
latent frame's ids equal to the one before (the statistic the drafts bet on). Speculative
sampling keeps the model's distribution, so every setting should agree within a few standard
errors; only the speed may differ. The tests prove the pieces (``verify_drafts`` reproduces p,
greedy ids are the same with and without drafts); this asks the same of the whole sampler on a
trained model. Writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import block_network
from loong.data.shapes import parse_caption, render
from loong.data.video import frames_to_tensor
from loong.generate import GenerateConfig, TextToVideo
from loong.lm.sampling import generate_video_tokens


def mean_and_error(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="LM export (default: the bundled model)")
    parser.add_argument("--prompts", nargs="+", default=["a red circle moves right"])
    parser.add_argument("--seeds", type=int, default=150)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--latents", type=int, default=4)
    parser.add_argument(
        "--context-latents",
        type=int,
        default=0,
        help="latent frames of the world's rendering (seed 0) after [BOV], as a window's prefix",
    )
    parser.add_argument("--speculate", type=int, nargs="+", default=[0, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="runs/speculative_check.json")
    args = parser.parse_args()
    block_network("speculative_check")
    torch.set_num_threads(args.threads)
    pipe = TextToVideo.from_pretrained(args.model)
    lm, vocab, (h, w) = pipe.lm, pipe.vocab, pipe.grid
    lo, hi = vocab.video_id_range
    rows = []
    for prompt in args.prompts:
        cond = vocab.layout(pipe.encode_prompt(prompt, GenerateConfig()), None).token_ids
        if args.context_latents:
            r = pipe.video_tokenizer.config.temporal_compression
            size = h * pipe.video_tokenizer.config.spatial_compression
            n_frames = 1 + r * (args.context_latents - 1)
            frames = render(
                parse_caption(prompt), seed=0, n_frames=n_frames, height=size, width=size
            )
            with torch.no_grad():
                indices = pipe.video_tokenizer.encode(frames_to_tensor(frames)[None])
            cond = torch.cat([cond, vocab.video_to_ids(indices)[0].flatten()])
        cond = cond[None]  # (1, L)
        for speculate in args.speculate:
            log_probs, repeats = [], []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                ids = generate_video_tokens(
                    lm,
                    cond,
                    args.latents * h * w,
                    vocab=vocab,
                    seed=seed,
                    speculate=speculate,
                    draft_lag=h * w,
                )  # (1, N)
                with torch.no_grad():
                    logits = lm(torch.cat([cond, ids], dim=1))[0, cond.shape[1] - 1 : -1, lo:hi]
                log_p = torch.log_softmax(logits.float(), dim=-1)  # (N, V_video)
                log_probs.append(log_p.gather(-1, (ids[0] - lo)[:, None]).mean().item())
                frames = ids[0].view(args.latents, h * w)
                repeats.append((frames[-1] == frames[-2]).float().mean().item())
            row = {
                "prompt": prompt,
                "speculate": speculate,
                "context_latents": args.context_latents,
                "seeds": args.seeds,
                "mean_log_p": mean_and_error(log_probs),
                "repeat_share": mean_and_error(repeats),
            }
            rows.append(row)
            print(
                f"{prompt!r} speculate={speculate}: mean log p "
                f"{row['mean_log_p'][0]:.4f} ± {row['mean_log_p'][1]:.4f}, last frame repeats "
                f"{row['repeat_share'][0]:.3f} ± {row['repeat_share'][1]:.3f}",
                flush=True,
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
