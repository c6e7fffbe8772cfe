"""Sharded (DCP) checkpoints: exact resume on one and two processes, resharding on load, the
history and pruning, and falling back past a damaged newest checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks, tiny_lm

from loong.train.dcp import TrainState, load_sharded, save_sharded
from loong.train.dist import all_reduce_mean, rank, world_size
from loong.train.parallel import ParallelConfig, clip_grad_norm_, parallelize

CPU = torch.device("cpu")
ROWS, SEQ, POOL = 4, 12, 16


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay}], lr=1e-2
    )


def train_steps(state: TrainState, steps: int) -> list[float]:
    """Train ``steps`` steps from ``state.extra["step"]``; return the global losses.

    Rows are drawn from a fixed pool with the global torch RNG (the same on every rank), so an
    exact resume needs the RNG state as well as the weights and the optimizer's moments.
    """
    pool = torch.randint(62, (POOL, SEQ), generator=torch.Generator().manual_seed(7))
    per_rank = ROWS // world_size()
    losses = []
    for _ in range(steps):
        ids = pool[torch.randperm(POOL)[:ROWS]][rank() * per_rank : (rank() + 1) * per_rank]
        logits = state.model(ids)  # (B, L, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        clip_grad_norm_(state.model.parameters(), 1.0)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.extra["step"] += 1
        losses.append(all_reduce_mean(loss.detach()).item())
    return losses


def new_state(cfg: ParallelConfig, seed: int) -> TrainState:
    model = parallelize(tiny_lm(seed), cfg, CPU)
    return TrainState(model=model, optimizer=make_optimizer(model), extra={"step": 0})


# --- one process ----------------------------------------------------------------------------


def test_resume_after_a_kill_gives_the_same_next_losses(tmp_path):
    cfg = ParallelConfig(activation_checkpointing=True)
    state = new_state(cfg, seed=0)
    train_steps(state, 2)
    save_sharded(tmp_path, state, step=2)
    expected = train_steps(state, 3)
    del state  # the run is killed; a new one starts from other weights and another RNG state

    resumed = new_state(cfg, seed=1)
    torch.manual_seed(123)
    assert load_sharded(tmp_path, resumed) == 2
    assert resumed.extra == {"step": 2}
    assert train_steps(resumed, 3) == expected  # exactly


def test_history_keeps_the_newest_and_a_rerun_step_replaces_its_checkpoint(tmp_path):
    state = new_state(ParallelConfig(), seed=0)
    for step in (1, 2, 3):
        state.extra["step"] = step
        save_sharded(tmp_path, state, step=step, keep=2)
    assert json.loads((tmp_path / "latest.json").read_text())["history"] == [
        "step_000000002",
        "step_000000003",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.json",
        "step_000000002",
        "step_000000003",
    ]
    manifest = json.loads((tmp_path / "step_000000003" / "checkpoint.json").read_text())
    assert manifest["step"] == 3 and "extra.pt" in manifest["files"]
    (tmp_path / "step_000000004.tmp").mkdir()  # a save killed half-way: never in the history
    state.extra["step"] = 33
    save_sharded(tmp_path, state, step=3, keep=2)  # step 3 again, after a resume
    assert not (tmp_path / "step_000000004.tmp").exists()
    assert load_sharded(tmp_path, new_state(ParallelConfig(), seed=1)) == 3
    fresh = new_state(ParallelConfig(), seed=1)
    load_sharded(tmp_path, fresh)
    assert fresh.extra["step"] == 33


def _truncate_shard(path: Path) -> None:
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


def _delete_shard(path: Path) -> None:
    next(path.glob("*.distcp")).unlink()


def _scramble_index(path: Path) -> None:
    index = path / ".metadata"  # same size, so only DCP's own read can tell
    index.write_bytes(bytes(255 - b for b in index.read_bytes()))


@pytest.mark.parametrize("damage", [_truncate_shard, _delete_shard, _scramble_index])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, tmp_path, caplog):
    state = new_state(ParallelConfig(), seed=0)
    train_steps(state, 1)
    save_sharded(tmp_path, state, step=1)
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    train_steps(state, 1)
    save_sharded(tmp_path, state, step=2)
    damage(tmp_path / "step_000000002")

    resumed = new_state(ParallelConfig(), seed=1)
    with caplog.at_level(logging.WARNING, logger="loong.train.dcp"):
        assert load_sharded(tmp_path, resumed) == 1
    assert "step_000000002 is damaged" in caplog.text
    assert "resumed from the older checkpoint" in caplog.text
    assert resumed.extra == {"step": 1}
    for key, value in weights.items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


def test_no_checkpoint_is_none_and_only_damaged_ones_is_an_error(tmp_path):
    state = new_state(ParallelConfig(), seed=0)
    assert load_sharded(tmp_path, state) is None
    save_sharded(tmp_path, state, step=1)
    _delete_shard(tmp_path / "step_000000001")
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        load_sharded(tmp_path, state)


def test_extra_state_must_load_without_unpickling_code(tmp_path):
    state = new_state(ParallelConfig(), seed=0)
    state.extra["position"] = np.arange(3)
    with pytest.raises(ValueError, match="plain values"):
        save_sharded(tmp_path, state, step=1)


# --- two processes (FSDP2), then one ----------------------------------------------------------


def _fsdp_resume_worker(directory: Path, out: Path) -> None:
    cfg = ParallelConfig(mode="fsdp", mixed_precision="fp32")
    state = new_state(cfg, seed=0)
    torch.manual_seed(5)
    train_steps(state, 2)
    save_sharded(directory, state, step=2)
    expected = train_steps(state, 2)

    resumed = new_state(cfg, seed=1)
    torch.manual_seed(99)
    assert load_sharded(directory, resumed) == 2
    got = train_steps(resumed, 2)
    if rank() == 0:
        torch.save({"expected": expected, "got": got}, out)


def test_fsdp_two_process_resume_and_a_one_process_load_of_the_same_checkpoint(tmp_path):
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not in this torch")
    run_ranks(_fsdp_resume_worker, tmp_path / "ckpt", tmp_path / "result.pt")
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["got"] == result["expected"]  # exactly, on two ranks

    # the same sharded checkpoint, resharded onto one process and a plain model
    alone = new_state(ParallelConfig(), seed=1)
    assert load_sharded(tmp_path / "ckpt", alone) == 2
    assert train_steps(alone, 2) == pytest.approx(result["expected"], rel=1e-5)
