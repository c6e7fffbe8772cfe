"""torch.distributed helpers: rank queries and the reductions models may need.

Models never touch torch.distributed directly; the one exception the quantizers need (a batch
statistic averaged over data-parallel ranks) goes through :func:`all_reduce_mean`, which is the
identity when no process group is running.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over data-parallel ranks, differentiable; ``x`` itself on one process."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x) / world_size()
