"""CPU training speed of the ``shapes`` LM with its blocks compiled (``parallel.compile``) or eager.

One process, the same threads, weights and inputs: two copies of the ``shapes`` LM preset from
the same seed, one through ``parallelize`` with ``compile=True`` and one without, both under the
preset's ``cpu_mixed_precision="auto"`` (bf16 on CPUs with native bf16). A step is forward +
backward + AdamW on a batch ``(B, 16 + 64·t)`` of random ids (a caption and t latent frames of
8×8 ids), for each t of the recipe's last stage (1, 5, 9). The first two steps of each length
are untimed (inductor compiles there; their wall time is reported as ``compile_s``); then
eager and compiled steps alternate, the order flipped every round, so that both share the
machine's noise. Medians per length, and the mean over the last stage's length mixture
(weights 1, 2, 4), are printed with the ratio eager / compiled (> 1: compiled is faster).

With ``--model tokenizer`` the same for the ``shapes`` video tokenizer (its encoder and decoder
blocks compiled by ``parallelize``; ``loong tokenizer train`` refuses ``parallel.compile``
because of what this measures, BENCHMARKS.md): a step is forward +
backward + AdamW on ``(B, 3, 9, 64, 64)`` random clips, L2 reconstruction plus the quantizer's
loss, as the quantized phase of its training computes them (no discriminator).

    .venv/bin/python benchmarks/cpu_compile.py --json runs/cpu_compile.json
    .venv/bin/python benchmarks/cpu_compile.py --model tokenizer --json runs/cpu_compile_tok.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import block_network, machine, write_json
from cpu_precision import CPU, lm_train_step, tokenizer_train_step
from loong.lm.model import VideoLM
from loong.train.parallel import ParallelConfig, cpu_can_compile, parallelize
from loong.video_tokenizer.model import VideoTokenizer

LAST_STAGE = {1: 1, 5: 2, 9: 4}
"""The ``shapes`` preset's last stage: latent lengths and their weights."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--model", choices=("lm", "tokenizer"), default="lm")
    parser.add_argument(
        "--batch", type=int, help="batch size (default: the preset's, 8 for the LM, 4 clips)"
    )
    parser.add_argument(
        "--decoder-blocks", type=int, help="tokenizer: blocks a decoder stage (preset: 1)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def lm_step(compile_blocks: bool) -> Callable[[torch.Tensor], float]:
    """A training step of the ``shapes`` LM on ``ids``; returns the loss."""
    torch.manual_seed(0)
    cfg = ParallelConfig(cpu_mixed_precision="auto", compile=compile_blocks)
    model = parallelize(VideoLM.from_preset("shapes"), cfg, CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return lambda ids: lm_train_step(model, opt, cfg, ids)


def tokenizer_step(
    compile_blocks: bool, decoder_blocks: int | None
) -> Callable[[torch.Tensor], float]:
    """A training step of the ``shapes`` video tokenizer on ``clips``; returns the loss."""
    torch.manual_seed(0)
    cfg = ParallelConfig(cpu_mixed_precision="auto", compile=compile_blocks)
    overrides = {} if decoder_blocks is None else {"decoder_blocks": decoder_blocks}
    model = parallelize(VideoTokenizer.from_preset("shapes", **overrides), cfg, CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return lambda clips: tokenizer_train_step(model, opt, cfg, clips)


def time_steps(
    steps: dict[str, Callable[[torch.Tensor], float]], batch: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Eager and compiled steps on ``batch``: two untimed each (the compiled side compiles
    there), then ``repeats`` timed rounds, the order flipped every round; medians, printed."""
    first: dict[str, float] = {}
    warm: dict[str, float] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        first[name] = step(batch)
        step(batch)
        warm[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
            start = time.perf_counter()
            steps[name](batch)
            times[name].append(time.perf_counter() - start)
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(
        f"eager {eager:.3f} s  compiled {compiled:.3f} s  eager/compiled {eager / compiled:.2f}x  "
        f"first two compiled steps {warm['compiled']:.1f} s  "
        f"first loss {first['eager']:.4f} / {first['compiled']:.4f}"
    )
    return {
        "eager_s": eager,
        "compiled_s": compiled,
        "ratio": eager / compiled,
        "compile_s": warm["compiled"] - 2 * compiled,
        "first_loss_eager": first["eager"],
        "first_loss_compiled": first["compiled"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    block_network("cpu_compile")
    if not cpu_can_compile():
        raise SystemExit("cpu_compile: inductor cannot build CPU kernels here (see the warning)")
    result: dict[str, object] = machine()
    print(f"{result['cpu']}, {result['threads']} threads, torch {result['torch']}")
    gen = torch.Generator().manual_seed(0)
    if args.model == "tokenizer":
        steps = {
            "eager": tokenizer_step(False, args.decoder_blocks),
            "compiled": tokenizer_step(True, args.decoder_blocks),
        }
        clips = torch.rand(args.batch or 4, 3, 9, 64, 64, generator=gen) * 2 - 1
        result["tokenizer"] = time_steps(steps, clips, args.repeats)
        write_json(args.json, result)
        return 0
    steps = {"eager": lm_step(False), "compiled": lm_step(True)}
    vocab = VideoLM.from_preset("shapes").config.vocab_size
    batches = {
        t: torch.randint(vocab, (args.batch or 8, 16 + 64 * t), generator=gen) for t in LAST_STAGE
    }
    per_length: dict[int, dict[str, float]] = {}
    for t, ids in batches.items():
        print(f"t={t} L={ids.shape[1]:4d}  ", end="")
        per_length[t] = time_steps(steps, ids, args.repeats)
    weight = sum(LAST_STAGE.values())
    mix = {
        name: sum(LAST_STAGE[t] * per_length[t][f"{name}_s"] for t in LAST_STAGE) / weight
        for name in ("eager", "compiled")
    }
    print(
        f"last stage mixture (t 1/5/9, weights 1/2/4): eager {mix['eager']:.3f} s  "
        f"compiled {mix['compiled']:.3f} s  eager/compiled {mix['eager'] / mix['compiled']:.2f}x"
    )
    result["lengths"] = {str(t): v for t, v in per_length.items()}
    result["last_stage"] = {**mix, "ratio": mix["eager"] / mix["compiled"]}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
