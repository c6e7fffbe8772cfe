"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), for FSDP runs.

Every rank writes its own shards of the model and optimizer state in parallel; a checkpoint can be
loaded by a different number of ranks (or by one process with a plain model), since DCP reshards
on load. Model and optimizer go through ``get_state_dict`` / ``set_state_dict``, so FSDP2, DDP and
plain modules give the same keys.

One checkpoint is a directory ``step_<step>/``::

    __0_0.distcp, __1_0.distcp, ...   the shards (DCP's files, one or more per rank)
    .metadata                         DCP's index of the shards
    extra.pt                          rank 0's extra state: step, data position, ... (TrainState)
    rng_rank<r>.pt                    each rank's torch random-number generator states
    checkpoint.json                   the step and every file's size, written last

It is written under a temporary name and renamed by rank 0 once every rank has finished, so a
killed run never leaves a half-written ``step_*`` directory; ``latest.json`` lists the kept ones,
oldest first, and the step is read from ``checkpoint.json``, never from a name. On load, a
checkpoint whose files are missing, truncated or unreadable is reported and the previous one is
tried.

What is unpickled: DCP's ``.metadata`` index is a pickle that DCP writes and reads itself, so
resume only from directories your own runs wrote. Everything else (the non-tensor optimizer
entries, ``extra.pt``, the RNG files) is read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from loong.pretrained import atomic_write_text
from loong.train.dist import all_true, barrier, broadcast_object, is_main_process, rank

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
EXTRA = "extra.pt"
POINTER = "latest.json"


@dataclass(kw_only=True)
class TrainState:
    """What a sharded checkpoint holds: the model and optimizer (loaded in place) and ``extra``,
    plain values from rank 0 (numbers, strings, lists, dicts, tensors: step, data position, ...).
    Each rank's torch RNG states are saved and restored as well."""

    model: nn.Module
    """The module being trained: plain, DDP-wrapped or FSDP2-sharded (or a ModuleDict of them)."""
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None
    """Its optimizer (or optimizers, each over its own parameters), or None for the model only."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Rank 0's extra state; replaced by the loaded one."""


def save_sharded(directory: str | Path, state: TrainState, *, step: int, keep: int = 2) -> Path:
    """Write ``directory/step_<step>/`` from every rank, point ``latest.json`` at it and delete
    all but the newest ``keep`` checkpoints. Call it on every rank; returns the directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}: pass e.g. 2")
    extra = _plain_bytes(state.extra)
    directory = Path(directory)
    final = directory / f"step_{step:09d}"
    tmp = directory / f"step_{step:09d}.tmp"
    if is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale)
        tmp.mkdir()
    barrier()

    # 1. every rank: its shards, then its RNG states
    model_sd, optim_sd = _state_dicts(state)
    with _one_process_is_fine():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / f"rng_rank{rank()}.pt")
    barrier()

    # 2. rank 0: the extra state and the manifest, then the rename and the history
    if is_main_process():
        (tmp / EXTRA).write_bytes(extra)
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": sizes}) + "\n")
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        history = [name for name in _history(directory) if name != final.name] + [final.name]
        # the pointer first: a kill between the two steps leaves an extra directory, not a
        # pointer to deleted ones
        atomic_write_text(directory / POINTER, json.dumps({"history": history[-keep:]}) + "\n")
        for old in history[:-keep]:
            shutil.rmtree(directory / old, ignore_errors=True)
    barrier()
    return final


def load_sharded(directory: str | Path, state: TrainState) -> int | None:
    """Load the newest readable checkpoint in ``directory`` into ``state``; return its step.

    Call it on every rank, after ``parallelize`` and after building the optimizer. None when
    there is no checkpoint (start from scratch). A damaged checkpoint (a missing, truncated or
    unreadable file) is logged and the previous one is tried; all ranks take the same one. Raises
    RuntimeError when checkpoints exist but none can be read.
    """
    directory = Path(directory)
    history = broadcast_object(_history(directory) if is_main_process() else None)
    assert isinstance(history, list)
    failures = []
    for name in reversed(history):
        path = directory / name
        problem = broadcast_object(_check_files(path) if is_main_process() else None)
        if problem is None:
            try:
                step = _load(path, state)
            except (Exception, dcp.CheckpointException) as e:  # the same on every rank
                problem = f"{type(e).__name__}: {e}"
            else:
                if failures:
                    log.warning("resumed from the older checkpoint %s (step %d)", path, step)
                return step
        log.warning("checkpoint %s is damaged (%s); trying the previous one", path, problem)
        failures.append(f"{path}: {problem}")
    if failures:
        raise RuntimeError(
            "no readable checkpoint in "
            f"{directory} ({'; '.join(failures)}); the model may be partly overwritten: move "
            "the directory away to start from scratch"
        )
    return None


# --- helpers ---------------------------------------------------------------------------------


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but the non-tensor entries (optimizer hyper-parameters) are first read with
    ``weights_only=True``, which refuses anything but plain data, before DCP's own read."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def _state_dicts(state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state dicts under the plain model's keys (DTensor shards under FSDP)."""
    return get_state_dict(state.model, _optimizers(state))


def _optimizers(state: TrainState) -> list[torch.optim.Optimizer]:
    if state.optimizer is None:
        return []
    if isinstance(state.optimizer, torch.optim.Optimizer):
        return [state.optimizer]
    return list(state.optimizer)


def _plain_bytes(extra: dict[str, Any]) -> bytes:
    """``torch.save(extra)``, checked to load back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as e:
        raise ValueError(
            "TrainState.extra must hold plain values (numbers, strings, lists, dicts, tensors) "
            f"that load with weights_only=True; convert the others (numpy arrays: .tolist()): {e}"
        ) from None
    return buffer.getvalue()


def _load(path: Path, state: TrainState) -> int:
    # 1. the small files first, so that a bad one is found before the model is touched
    ok, step, extra, rng = True, -1, {}, None
    try:
        step = int(json.loads((path / MANIFEST).read_text())["step"])
        extra = torch.load(path / EXTRA, map_location="cpu", weights_only=True)
        rng_path = path / f"rng_rank{rank()}.pt"
        if rng_path.is_file():  # absent when the run had fewer ranks
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        else:
            log.warning("%s has no RNG state for rank %d: it keeps its own", path, rank())
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as e:
        log.warning("rank %d cannot read %s: %s", rank(), path, e)
        ok = False
    if not all_true(ok):
        raise RuntimeError(f"{path}: a rank cannot read its extra state or RNG file")

    # 2. the shards, into the (sharded) tensors of the live model and optimizer
    model_sd, optim_sd = _state_dicts(state)
    sharded = {"model": model_sd, "optimizer": optim_sd}
    with _one_process_is_fine():
        dcp.load(sharded, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    set_state_dict(
        state.model,
        _optimizers(state),
        model_state_dict=sharded["model"],
        optim_state_dict=sharded["optimizer"],
    )
    state.extra = extra
    if rng is not None:
        set_rng_state(rng)
    return step


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """Silence DCP's warning that it saves or loads in a single process: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_files(path: Path) -> str | None:
    """What is wrong with the checkpoint directory ``path`` (None: every file is there, whole)."""
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"no readable {MANIFEST} ({e})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch random-number generator states (CPU, and CUDA when in use)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore states that :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _history(directory: Path) -> list[str]:
    pointer = directory / POINTER
    if not pointer.is_file():
        return []
    try:
        return [str(name) for name in json.loads(pointer.read_text())["history"]]
    except (ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; no checkpoint to resume from", pointer)
        return []
