"""torch.distributed helpers: rank queries and the reductions models may need.

Models never touch torch.distributed directly; the one exception the quantizers need (a batch
statistic averaged over data-parallel ranks) goes through :func:`all_reduce_mean`, which is the
identity when no process group is running. Training loops join the group torchrun describes with
:func:`init_distributed` and use the small collectives below to keep ranks in step.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

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

    with warnings.catch_warnings():  # deprecated for a private module; still differentiable
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x) / world_size()


# --- process-group set-up and small collectives (for torchrun launches) ------------------------


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str = "auto", *, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes in the environment; return this rank's device.

    ``device`` is "auto" (cuda if available, else cpu), "cpu" or "cuda". Under torchrun
    (``WORLD_SIZE`` set) the group uses NCCL on cuda and gloo on cpu, and each rank takes GPU
    ``LOCAL_RANK``; a plain ``python`` launch initialises nothing and gets ``cuda:0`` or cpu.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f'device must be "auto", "cpu" or "cuda", got {device!r}')
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError('device="cuda" but no CUDA device is visible: pass device="cpu"')
    chosen = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if "WORLD_SIZE" in os.environ and not is_distributed():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=chosen if use_cuda else None,
        )
    return chosen


def destroy_distributed() -> None:
    """Leave the process group (a no-op when none is running)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op on one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (picklable Python values; ``obj`` on one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank, so that all ranks take one branch."""
    if not is_distributed():
        return flag
    return all(bool(f) for f in all_gather_object(bool(flag)))


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not is_distributed():
        return [obj]
    objects: list[object] = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects
