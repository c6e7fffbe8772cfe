"""Optimiser settings, the optimiser and the learning-rate schedule shared by the training loops."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import increment_version


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps, then cosine decay to lr_min_ratio · lr at the last step (a
    budgeted run scales them with its steps)."""
    lr_min_ratio: float = 0.1
    """Final learning rate as a share of the peak."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: off)."""
    rescaled: tuple[tuple[int, float], ...] = ()
    """(step, ratio) of each time a budgeted run re-fitted the steps after ``step`` to
    ``ratio`` times as many (``loong.train.budget``), in order; set by the budget, not by hand.
    The schedule after each runs at 1/ratio of its pace, so the learning rate goes on from the
    value it had and still reaches its floor at the last step."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.rescaled = tuple((int(step), float(ratio)) for step, ratio in self.rescaled)
        if any(step < 0 or ratio <= 0 for step, ratio in self.rescaled):
            raise ValueError(
                f"optim.rescaled must be (step, ratio) pairs with steps >= 0 and ratios > 0 "
                f"(a budget writes them; leave it empty), got {self.rescaled}"
            )
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"optim.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of (0-based) ``step`` in a run of ``total_steps``: the schedule's
        position of each taken through the re-fits (``rescaled``)."""
        at, total = self.schedule_step(step), self.schedule_step(total_steps)
        if at < self.warmup_steps:
            return self.lr * (at + 1) / self.warmup_steps
        progress = (at - self.warmup_steps) / max(1, total - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.lr_min_ratio + (1 - self.lr_min_ratio) * cosine)

    def schedule_step(self, step: int) -> float:
        """Where ``step`` of the run as re-fitted falls in the schedule of the run before its
        re-fits: the latest undone first, each stretching the steps after its own step back by
        1/ratio."""
        at = float(step)
        for done, ratio in reversed(self.rescaled):
            if at > done:
                at = done + (at - done) / ratio
        return at


def adamw(
    params: Iterable[Any], cfg: OptimConfig, *, weight_decay: float | None = None
) -> torch.optim.AdamW:
    """Fused AdamW with ``cfg``'s learning rate, betas and weight decay (or ``weight_decay``)
    over ``params`` (tensors or param groups).

    Fused: one kernel updates every tensor, where torch's default steps them one by one in
    Python: on two CPU cores 21 → 3 ms a step for the ``shapes`` tokenizer's 110 tensors and
    14 → 6 ms for the ``shapes`` LM's 45 (BENCHMARKS.md). That kernel writes the weights without
    moving their version counters, which torch's default AdamW moves, as every in-place write
    does; a hook moves them after every step, so that whatever watches them (autograd's check
    that a tensor saved for backward is unchanged, a cache of derived weights) sees the update.
    """
    opt = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
        fused=True,
    )
    opt.register_step_post_hook(_mark_updated)
    return opt


def _mark_updated(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Move the version counter of every weight ``opt`` steps, as an in-place update does."""
    increment_version([p for group in opt.param_groups for p in group["params"]])
