"""Training checkpoints: written atomically, the newest N kept, a pointer file to the latest.

A checkpoint is one ``torch.save`` of plain state dicts, tensors and numbers; it is loaded with
``weights_only=True``, so resuming never unpickles code. The step lives inside the checkpoint
and the pointer file ``latest.json`` names the newest file: nothing is parsed from file names.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from loong.pretrained import atomic_write_text


def save_checkpoint(
    directory: str | Path, state: dict[str, Any], *, step: int, keep: int = 2
) -> Path:
    """Write ``step_<step>.pt`` atomically, point ``latest.json`` at it, prune old ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:09d}.pt"
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
        tmp = f.name
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    history = _history(directory)
    history = [name for name in history if name != path.name] + [path.name]
    for old in history[:-keep]:
        (directory / old).unlink(missing_ok=True)
    atomic_write_text(directory / "latest.json", json.dumps({"history": history[-keep:]}) + "\n")
    return path


def load_latest_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``directory`` (older ones are tried if it is damaged)."""
    directory = Path(directory)
    for name in reversed(_history(directory)):
        path = directory / name
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as e:  # damaged or missing
            import warnings

            warnings.warn(
                f"checkpoint {path} is unreadable ({e}); trying the previous one", stacklevel=2
            )
    return None


def _history(directory: Path) -> list[str]:
    pointer = directory / "latest.json"
    if not pointer.is_file():
        return []
    try:
        return list(json.loads(pointer.read_text())["history"])
    except (ValueError, KeyError):
        return []


BEST_FILE = "best.json"


class BestExport:
    """``directory`` (a run's ``best/``): the export of the evaluated weights with the best
    ``metric`` so far, and ``best.json`` with its step and scores. Read back on resume, so a
    resumed run keeps comparing with the best of the steps before, when it evaluates on the
    same data (``evaluated_on``; else the first evaluation starts it anew).

    The loop asks :meth:`improves` after each evaluation, takes rank 0's answer on every rank
    (the exports gather sharded weights, so every rank writes or none does), writes the export
    there and :meth:`record`s it on every rank. Each file is replaced atomically, ``best.json``
    last: a crash between them leaves the new weights beside the last record."""

    def __init__(self, directory: Path, metric: str, *, higher: bool, evaluated_on: str) -> None:
        self.directory, self.metric, self.higher = directory, metric, higher
        path = directory / BEST_FILE
        self.best: dict[str, Any] | None = json.loads(path.read_text()) if path.is_file() else None
        if self.best is not None and self.best.get("evaluated_on") != evaluated_on:
            self.best = None  # scores on other data: not comparable

    def improves(self, scores: dict[str, float]) -> bool:
        if self.best is None:
            return True
        value, best = scores[self.metric], self.best[self.metric]
        return value > best if self.higher else value < best

    def record(
        self, step: int, scores: dict[str, float], *, write: bool = True, **about: Any
    ) -> None:
        """Keep ``scores`` as the best, and (``write``: rank 0) write ``best.json``, after the
        export's files."""
        self.best = {"step": step, **scores, **about}
        if write:
            atomic_write_text(self.directory / BEST_FILE, json.dumps(self.best, indent=2) + "\n")
