"""LFQ's batch entropy: the batch mean of ``q(c|z)`` as one matrix product of two half-bit
tables, against the full ``(N, 2^K)`` softmax and against vector-quantize-pytorch's ``LFQ``.

For each (N latents, K bits), forward + backward of the batch-entropy term three ways:

- split: ``LookupFreeQuantizer.mean_code_distribution`` (what training runs): ``q`` over the low
  and the high half of the bits, ``(N, 2^(K/2))`` each, then ``q_hi^T q_lo / N``;
- softmax: ``code_distribution(z).mean(0)``, the ``(N, 2^K)`` softmax this replaced;
- vector-quantize-pytorch: its ``LFQ`` forward in training mode (``entropy_loss_weight=1``, no
  commitment loss), backward of its auxiliary loss, which holds the same batch entropy (and its
  per-sample entropy, also over ``2^K`` codes).

Each case runs in a fresh process, so that its peak memory (the rise in the process's maximum
resident set over the inputs) is its own; the time is the median of ``--repeats`` after two
untimed calls. The largest tensor a path allocates is ``N·2^K`` floats for the softmax and the
peer, ``N·2^(K/2) + 2^K`` for the split: cases whose softmax would need more than
``--max-gib`` are run on the split path only. Batch entropies of the paths are printed; they agree.

    .venv/bin/python benchmarks/lfq_entropy.py --json runs/lfq_entropy.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import block_network, machine, write_json
from loong.video_tokenizer.quantize import LookupFreeQuantizer, QuantizerConfig, _entropy

# (N, K): the shapes preset's training batch (4 clips × 3 latent frames × 8 × 8, 12 bits), a
# 16-bit case, and MAGVIT-v2's 18 bits on one 17×128×128 clip (5 × 16 × 16 tokens)
CASES = ((768, 12), (4096, 12), (4096, 16), (1280, 18))
PATHS = ("split", "softmax", "vector-quantize-pytorch")
TAU = 0.01


def peak_rss_gib() -> float:
    """The process's maximum resident set so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_case(n: int, bits: int, path: str, repeats: int) -> dict[str, float]:
    """Time and peak memory of one path's batch entropy, forward + backward, in this process."""
    torch.manual_seed(0)
    z = (0.05 * torch.randn(n, bits)).requires_grad_()
    quantizer = LookupFreeQuantizer(
        QuantizerConfig(kind="lfq", latent_dim=bits, entropy_group_bits=bits)
    )
    if path == "vector-quantize-pytorch":
        from vector_quantize_pytorch import LFQ

        peer = LFQ(
            dim=bits,
            codebook_size=2**bits,
            entropy_loss_weight=1.0,
            commitment_loss_weight=0.0,
            diversity_gamma=1.0,
            num_codebooks=1,
        ).train()

        def entropy() -> torch.Tensor:
            # its index is MSB-first: component i is bit K−1−i, so feed z reversed
            (_, _, _), parts = peer(
                z.flip(-1)[None], inv_temperature=1 / TAU, return_loss_breakdown=True
            )
            parts.batch_entropy.backward()
            return parts.batch_entropy

    else:

        def entropy() -> torch.Tensor:
            if path == "split":
                mean_q = quantizer.mean_code_distribution(z)
            else:
                mean_q = quantizer.code_distribution(z).mean(0)
            value = _entropy(mean_q)
            value.backward()
            return value

    before = peak_rss_gib()
    for _ in range(2):
        value = entropy().item()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        entropy()
        times.append(time.perf_counter() - start)
    return {
        "ms": 1e3 * statistics.median(times),
        "peak_gib": peak_rss_gib() - before,
        "batch_entropy": value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls (median reported)")
    parser.add_argument(
        "--max-gib",
        type=float,
        default=4.0,
        help="skip the N·2^K paths of cases whose softmax is larger",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", nargs=3, metavar=("N", "K", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    block_network("lfq_entropy")
    if args.case:  # one case, in a child process
        n, bits, path = int(args.case[0]), int(args.case[1]), args.case[2]
        print(json.dumps(run_case(n, bits, path, args.repeats)))
        return

    info = machine()
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    results = []
    for n, bits in CASES:
        softmax_gib = n * 2**bits * 4 / 2**30
        row: dict[str, object] = {"n": n, "bits": bits, "softmax_gib": softmax_gib}
        for path in PATHS:
            if path != "split" and softmax_gib > args.max_gib:
                continue
            child = [
                sys.executable,
                __file__,
                "--repeats",
                str(args.repeats),
                "--case",
                str(n),
                str(bits),
                path,
            ]
            out = subprocess.run(child, capture_output=True, text=True, check=True)
            row[path] = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        cells = []
        for path in PATHS:
            if path in row:
                r = row[path]
                cells.append(
                    f"{path} {r['ms']:.2f} ms {r['peak_gib']:.3f} GiB H {r['batch_entropy']:.4f}"
                )
            else:
                cells.append(f"{path} not run (its N·2^K table is {softmax_gib:.1f} GiB)")
        ratio = ""
        if "softmax" in row:
            ratio = f"  softmax/split {row['softmax']['ms'] / row['split']['ms']:.1f}x"
        print(f"N={n:>6} K={bits}: " + " | ".join(cells) + ratio)
    write_json(args.json, {"machine": info, "results": results})


if __name__ == "__main__":
    main()
