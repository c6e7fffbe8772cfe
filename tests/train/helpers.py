"""Helpers of the parallel and checkpoint tests: a tiny LM, and a function run in several forked
CPU processes joined in one gloo process group."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.vocab import VocabConfig


def tiny_lm(seed: int = 0, *, max_seq_len: int = 12) -> VideoLM:
    """About 7k parameters: dim 16, 2 layers, 62 ids."""
    torch.manual_seed(seed)
    config = VideoLMConfig(
        dim=16,
        n_layers=2,
        n_heads=2,
        ffn_dim=32,
        max_seq_len=max_seq_len,
        vocab=VocabConfig(text_vocab_size=20, video_vocab_size=32, n_special=10),
    )
    return VideoLM(config)


def _rank_main(rank: int, world_size: int, store: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args: object, world_size: int = 2) -> None:
    """``fn(*args)`` in ``world_size`` forked processes joined in one gloo group. The ranks meet
    through a file, not a TCP port: a port found free beforehand can be taken before they bind
    it."""
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(
            _rank_main,
            args=(world_size, str(Path(directory) / "store"), fn, args),
            nprocs=world_size,
            start_method="fork",
        )
