"""What both training loops share to run on one process or on many under torchrun.

A loop calls :func:`start` once: under torchrun (``WORLD_SIZE`` set) it joins the process group
and picks this rank's device. Then it wraps its models with :meth:`Runtime.wrap` (DDP or FSDP2,
activation checkpointing, compile: :mod:`loong.train.parallel`), trains each rank on its
:meth:`Runtime.rows` of every global batch, so that a run gives the same losses whatever the
number of ranks, and reduces the numbers it logs with :func:`summed` or :func:`mean_over_ranks`.

Only rank 0 writes metrics (:class:`MetricsLog`), previews and the export (:func:`save_export`).
Checkpoints (:func:`save_state`, :func:`load_state`) are sharded DCP directories under FSDP, where
every rank writes its shards; otherwise one atomic file that rank 0 writes and every rank reads.
Both hold every rank's RNG state. Every function here that takes a :class:`Runtime` must be called
on all ranks, since it may run collectives.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loong.train.checkpoint import load_latest_checkpoint, save_checkpoint
from loong.train.dcp import TrainState, load_sharded, rng_state, save_sharded, set_rng_state
from loong.train.dist import (
    all_gather_object,
    barrier,
    broadcast_object,
    init_distributed,
    is_distributed,
    rank,
    world_size,
)
from loong.train.parallel import ParallelConfig, autocast, export_state_dict, parallelize, unwrap

log = logging.getLogger("loong")


@dataclass(frozen=True)
class Runtime:
    """The processes a loop runs in: its parallel settings, this rank's device and place."""

    parallel: ParallelConfig
    device: torch.device
    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP: weights and optimizer state are split over ranks."""
        return self.parallel.mode == "fsdp"

    def rows(self, batch_size: int, name: str = "batch_size") -> slice:
        """This rank's rows of a global batch of ``batch_size``: an equal share each."""
        if batch_size % self.world_size:
            raise ValueError(
                f"{name}={batch_size} must divide among {self.world_size} ranks: pass a "
                f"multiple of {self.world_size}"
            )
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` on this rank's device, parallelized as configured."""
        return parallelize(model, self.parallel, self.device)

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on CUDA, or on the CPU, when configured; a no-op context otherwise."""
        return autocast(self.parallel, self.device)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (for decisions from clocks, which ranks read apart)."""
        return bool(broadcast_object(flag))


def start(parallel: ParallelConfig, device: str = "auto") -> Runtime:
    """Join torchrun's process group when launched by it; return where this rank runs.

    ``device`` is "auto" (cuda if available), "cpu", "cuda" or "cuda:N" (one process only;
    under torchrun each rank takes GPU ``LOCAL_RANK``).
    """
    if "WORLD_SIZE" in os.environ or is_distributed():
        chosen = init_distributed(device.split(":")[0])
    elif device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(device)
    n = world_size()
    if n > 1 and parallel.mode == "none":
        raise ValueError(
            f'{n} processes with parallel.mode="none" would train {n} separate models: pass '
            "--parallel ddp (or fsdp), or set parallel.mode"
        )
    if rank() != 0:
        log.setLevel(logging.WARNING)  # rank 0 tells the story
    return Runtime(parallel=parallel, device=chosen, rank=rank(), world_size=n)


# --- numbers from every rank -----------------------------------------------------------------


def summed(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """Element-wise sums over ranks of lists of numbers by key (a key may be missing on some
    ranks); ``values`` itself on one process."""
    if not is_distributed():
        return values
    total: dict[str, list[float]] = {}
    for part in all_gather_object(values):
        assert isinstance(part, dict)
        for key, numbers in part.items():
            acc = total.setdefault(key, [0.0] * len(numbers))
            total[key] = [a + b for a, b in zip(acc, numbers, strict=True)]
    return total


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (every rank must pass the same keys)."""
    if not is_distributed():
        return values
    total = summed({key: [value] for key, value in values.items()})
    return {key: total[key][0] / world_size() for key in values}


# --- files -----------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl``, written by rank 0 only. Opening it at ``step`` drops the lines of later
    steps (and a line cut short by a kill), which a resumed run writes again."""

    def __init__(self, path: Path, step: int, rt: Runtime) -> None:
        self.file = None
        if not rt.main:
            return
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line
            path.write_text("".join(kept))
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def save_state(
    directory: Path,
    rt: Runtime,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra: dict[str, Any],
    step: int,
    keep: int,
) -> None:
    """Checkpoint ``modules`` and ``optimizers`` (by name), rank 0's ``extra`` plain values and
    every rank's RNG state, as of ``step``."""
    if rt.sharded:
        state = TrainState(
            model=nn.ModuleDict(modules), optimizer=list(optimizers.values()), extra=extra
        )
        save_sharded(directory, state, step=step, keep=keep)
        return
    rngs = all_gather_object(rng_state())
    if rt.main:
        state = {name: unwrap(m).state_dict() for name, m in modules.items()}
        state |= {name: opt.state_dict() for name, opt in optimizers.items()}
        save_checkpoint(directory, state | extra | {"rng": rngs}, step=step, keep=keep)
    barrier()


def load_state(
    directory: Path,
    rt: Runtime,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any] | None:
    """Load the newest checkpoint into ``modules`` and ``optimizers`` in place (after
    :meth:`Runtime.wrap` and after building the optimizers) and restore this rank's RNG; return
    the ``extra`` values saved with it, or None when there is no checkpoint."""
    if rt.sharded:
        state = TrainState(model=nn.ModuleDict(modules), optimizer=list(optimizers.values()))
        return None if load_sharded(directory, state) is None else state.extra
    saved = load_latest_checkpoint(directory)
    if saved is None:
        return None
    for name, module in modules.items():
        unwrap(module).load_state_dict(saved.pop(name))
    for name, opt in optimizers.items():
        opt.load_state_dict(saved.pop(name))
    rngs = saved.pop("rng")
    if isinstance(rngs, torch.Tensor):  # written by one process before RNG states were per rank
        torch.set_rng_state(rngs)
    elif rt.rank < len(rngs):
        set_rng_state(rngs[rt.rank])
    else:
        log.warning("the checkpoint has no RNG state for rank %d: it keeps its own", rt.rank)
    return saved


def save_export(
    model: nn.Module, rt: Runtime, build: Callable[[], nn.Module], directory: Path
) -> None:
    """``model``'s ``save_pretrained(directory)`` from rank 0. Under FSDP the shards are gathered
    and loaded into ``build()``, a plain copy of the model, on the CPU."""
    if rt.sharded:
        weights = export_state_dict(model)
        if rt.main:
            plain = build()
            plain.load_state_dict(weights)
            plain.save_pretrained(directory)
    elif rt.main:
        unwrap(model).save_pretrained(directory)
    barrier()
