"""Run a function in several forked CPU processes joined in one gloo process group (tests only)."""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args: object, world_size: int = 2) -> None:
    """``fn(*args)`` in ``world_size`` forked processes joined in one gloo group."""
    mp.start_processes(
        _rank_main,
        args=(world_size, _free_port(), fn, args),
        nprocs=world_size,
        start_method="fork",
    )
