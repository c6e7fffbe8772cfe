"""CPU training step of the ``shapes`` LM: the loss on the targets' logits, fused, or on all logits.

One process, one model: the ``shapes`` LM preset as ``loong recipe shapes`` trains it (blocks
compiled, ``cpu_mixed_precision="auto"``). A step is forward + backward + AdamW on a batch of
``B`` sequences laid out as training lays them out (a caption of 6 to 16 text ids, then t latent
frames of 8×8 random video ids), for each t of the recipe's last stage (1, 5, 9), with the
weighted loss of ``loong lm train`` computed two ways:

- all logits: ``model(ids)`` gives ``(B, L, V)``; ``weighted_loss`` picks the targets' rows and
  takes the cross-entropy eagerly;
- targets' logits: ``model(ids, output_mask=target_positions(...))`` applies the head to those
  rows only, and ``weighted_loss(..., fused=True)`` runs the cross-entropy through
  ``torch.compile`` (what ``loong lm train`` does when ``parallel.compile`` is on).

The two paths give the same loss (each length's, before its steps, is printed). The first two
steps of each path and length are untimed (inductor compiles there); then the paths alternate,
the order flipped every round, so that both share the machine's noise. Medians per length and
the mean over the last stage's length mixture (weights 1, 2, 4) are printed with the ratio
all / targets (> 1: the targets' path is faster).

    .venv/bin/python benchmarks/lm_loss_path.py --json runs/lm_loss_path.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import block_network, machine, write_json
from cpu_compile import LAST_STAGE
from cpu_precision import CPU
from loong.lm.model import VideoLM
from loong.lm.vocab import Batch, Vocabulary
from loong.train.lm_batches import target_positions, weighted_loss
from loong.train.lm_config import LossWeightConfig
from loong.train.parallel import ParallelConfig, autocast, cpu_can_compile, parallelize

PATHS = ("all", "targets")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--batch", type=int, default=8, help="the preset's batch size")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def make_batch(vocab: Vocabulary, batch: int, t: int, gen: torch.Generator) -> Batch:
    """``batch`` training sequences: a caption of 6-16 random text ids and t latent frames."""
    layouts = []
    for _ in range(batch):
        n_text = int(torch.randint(6, 17, (1,), generator=gen))
        text = torch.randint(vocab.config.text_vocab_size, (n_text,), generator=gen).tolist()
        video = torch.randint(vocab.config.video_vocab_size, (t, 8, 8), generator=gen)
        layouts.append(vocab.layout(text, video))
    return vocab.collate(layouts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    block_network("lm_loss_path")
    if not cpu_can_compile():
        raise SystemExit("lm_loss_path: inductor cannot build CPU kernels here (see the warning)")
    result: dict[str, object] = machine()
    print(f"{result['cpu']}, {result['threads']} threads, torch {result['torch']}")
    torch.manual_seed(0)
    cfg = ParallelConfig(cpu_mixed_precision="auto", compile=True)
    model = parallelize(VideoLM.from_preset("shapes"), cfg, CPU)
    vocab = Vocabulary(model.config.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = LossWeightConfig(short_frames=5)

    def loss_of(path: str, batch: Batch) -> torch.Tensor:
        with autocast(cfg, CPU):
            if path == "all":
                logits = model(batch.token_ids)  # (B, L, V)
            else:
                logits = model(batch.token_ids, output_mask=target_positions(batch, vocab))
        return weighted_loss(logits, batch, vocab, weights, fused=path == "targets")[0]

    def step(path: str, batch: Batch) -> float:
        loss = loss_of(path, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    gen = torch.Generator().manual_seed(0)
    batches = {t: make_batch(vocab, args.batch, t, gen) for t in LAST_STAGE}
    per_length: dict[int, dict[str, float]] = {}
    for t, batch in batches.items():
        with torch.no_grad():
            first = {path: loss_of(path, batch).item() for path in PATHS}
        for path in PATHS:
            step(path, batch)
            step(path, batch)
        times: dict[str, list[float]] = {path: [] for path in PATHS}
        for r in range(args.repeats):
            for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                start = time.perf_counter()
                step(path, batch)
                times[path].append(time.perf_counter() - start)
        median = {path: statistics.median(times[path]) for path in PATHS}
        per_length[t] = {
            "all_s": median["all"],
            "targets_s": median["targets"],
            "ratio": median["all"] / median["targets"],
            "first_loss_all": first["all"],
            "first_loss_targets": first["targets"],
        }
        print(
            f"t={t} L={batch.token_ids.shape[1]:4d}  all logits {median['all']:.3f} s  targets' "
            f"logits {median['targets']:.3f} s  all/targets {per_length[t]['ratio']:.2f}x  "
            f"loss {first['all']:.5f} / {first['targets']:.5f}"
        )
    weight = sum(LAST_STAGE.values())
    mix = {
        path: sum(LAST_STAGE[t] * per_length[t][f"{path}_s"] for t in LAST_STAGE) / weight
        for path in PATHS
    }
    print(
        f"last stage mixture (t 1/5/9, weights 1/2/4): all logits {mix['all']:.3f} s  targets' "
        f"logits {mix['targets']:.3f} s  all/targets {mix['all'] / mix['targets']:.2f}x"
    )
    result["lengths"] = {str(t): v for t, v in per_length.items()}
    result["last_stage"] = {**mix, "ratio": mix["all"] / mix["targets"]}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
