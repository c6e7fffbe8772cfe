"""WebDataset shards: packing a folder, reading every sample exactly once per epoch across ranks
and DataLoader workers, reshuffling by epoch, and skipping bad samples and damaged shards."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

pytest.importorskip("webdataset")

from loong.data.video import write_video
from loong.data.webdataset import WebVideoDataset, plan_reads, write_shards

N_VIDEOS = 12


def _frames(i: int, n: int = 5) -> np.ndarray:
    """A 16 × 16 clip of ``n`` frames whose colour encodes ``i``."""
    frames = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    frames[..., 0] = 20 * i
    frames[..., 1] = np.arange(n, dtype=np.uint8)[:, None, None] * 40
    return frames


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """12 five-frame videos: most with a .txt caption, one with .json, one with none."""
    root = tmp_path_factory.mktemp("videos")
    for i in range(N_VIDEOS):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        write_video(sub / f"clip.{i:02d}.mp4", _frames(i), fps=8)
        if i == 3:
            (sub / f"clip.{i:02d}.json").write_text(json.dumps({"caption": "three"}))
        elif i != 5:
            (sub / f"clip.{i:02d}.txt").write_text(f"caption {i}\nan alternate\n")
    return root


def _keys(dataset: WebVideoDataset, num_workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [sample["key"] for sample in loader]


def test_pack_a_folder_and_read_the_clips_back(video_folder, tmp_path):
    shards = write_shards(video_folder, tmp_path, samples_per_shard=5)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    dataset = WebVideoDataset(tmp_path, n_frames=5, size=16, shuffle=False, rank=0, world_size=1)
    samples = {s["key"]: s for s in dataset}
    assert len(samples) == N_VIDEOS and dataset.skipped == {}
    sample = samples["a/clip_01"]  # the dot in the stem would end a WebDataset key
    assert sample["video"].shape == (3, 5, 16, 16)
    assert sample["caption"] == "caption 1"
    assert samples["a/clip_03"]["caption"] == "three"
    assert samples["a/clip_05"]["caption"] == ""
    red = (samples["b/clip_04"]["video"][0, 0].mean().item() + 1) * 127.5  # colour 20 · 4
    assert red == pytest.approx(80, abs=3)
    assert "read 12 videos, 12 clips" in dataset.summary()


@pytest.mark.parametrize(
    ("samples_per_shard", "split"), [(2, "by shard"), (4, "rank by shard"), (N_VIDEOS, "by sample")]
)
def test_every_sample_once_per_epoch_across_two_ranks_of_two_workers(
    video_folder, tmp_path, samples_per_shard, split
):
    """6 shards (≥ 4 readers), 3 shards (≥ 2 ranks) or 1 shard (< 2 ranks): every regime reads
    each sample exactly once; the next epoch deals the shards out differently."""
    write_shards(video_folder, tmp_path, samples_per_shard=samples_per_shard)
    by_epoch = []
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            dataset = WebVideoDataset(
                tmp_path, n_frames=5, size=16, clips_per_video=1, rank=rank, world_size=2, seed=3
            )
            dataset.set_epoch(epoch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fallbacks' notes; checked below
                per_rank.append(_keys(dataset, num_workers=2))
        counts = Counter(key for keys in per_rank for key in keys)
        assert len(counts) == N_VIDEOS and set(counts.values()) == {1}, counts
        by_epoch.append(per_rank)
    if split != "by sample":  # one shard holds everything: nothing to reshuffle
        assert by_epoch[0] != by_epoch[1]


def test_a_rank_without_shards_is_announced(video_folder, tmp_path):
    write_shards(video_folder, tmp_path, samples_per_shard=N_VIDEOS)
    dataset = WebVideoDataset(tmp_path, n_frames=5, size=16, rank=1, world_size=2)
    with pytest.warns(UserWarning, match="1 shards for 2 ranks: by shards, ranks 1..1 would get"):
        keys = [s["key"] for s in dataset]
    assert len(keys) == N_VIDEOS // 2


@pytest.mark.parametrize("shuffle", [False, True])
def test_read_plans_cover_every_sample_once(shuffle):
    """Simulated readers over shards of uneven sizes, for many shard, rank and worker counts."""
    for n_shards in (1, 2, 3, 5, 8, 13):
        sizes = [(7 * s) % 5 + 1 for s in range(n_shards)]
        for world_size, num_workers in [(1, 1), (1, 3), (2, 2), (3, 2), (4, 1), (2, 4)]:
            seen = Counter()
            for rank in range(world_size):
                for worker in range(num_workers):
                    plan = plan_reads(
                        n_shards,
                        epoch=2,
                        seed=0,
                        shuffle=shuffle,
                        rank=rank,
                        world_size=world_size,
                        worker=worker,
                        num_workers=num_workers,
                    )
                    met = [(s, j) for s in plan.shards for j in range(sizes[s])]
                    seen.update(
                        m for i, m in enumerate(met) if i % plan.keep_every == plan.keep_offset
                    )
                    by_shard = n_shards >= world_size * num_workers
                    assert (plan.note is None) == by_shard
            assert sum(sizes) == len(seen) and set(seen.values()) == {1}


def test_bad_videos_and_a_damaged_shard_are_skipped_and_counted(video_folder, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(4):
        write_video(folder / f"good{i}.mp4", _frames(i), fps=8)
    (folder / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    (folder / "bad_caption.mp4").write_bytes((folder / "good0.mp4").read_bytes())
    (folder / "bad_caption.json").write_text("[1, 2]")
    shards = write_shards(folder, tmp_path / "shards", samples_per_shard=3)
    assert len(shards) == 2
    damaged = shards[1].read_bytes()  # good1, good2, good3
    shards[1].write_bytes(damaged[: len(damaged) // 2])

    dataset = WebVideoDataset(tmp_path / "shards", n_frames=5, size=16, shuffle=False)
    with pytest.warns(UserWarning) as record:
        keys = [s["key"] for s in dataset]
    assert "good0" in keys and "broken" not in keys and "bad_caption" not in keys
    assert set(dataset.skipped) == {f"{shards[0]}:broken", f"{shards[0]}:bad_caption"}
    assert "FFmpeg cannot decode it" in dataset.skipped[f"{shards[0]}:broken"]
    assert str(shards[1]) in dataset.damaged_shards
    assert "skipped 2 bad samples" in dataset.summary()
    assert "1 damaged shards" in dataset.summary()
    messages = " ".join(str(w.message) for w in record)
    assert "2 bad samples so far" in messages and "is damaged" in messages


def test_writer_and_reader_errors_name_the_fix(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.b.mp4", _frames(0), fps=8)
    write_video(folder / "a_b.mp4", _frames(1), fps=8)
    with pytest.raises(ValueError, match="rename one of them"):
        write_shards(folder, tmp_path / "out")
    with pytest.raises(ValueError, match="write them with write_shards"):
        WebVideoDataset(tmp_path, n_frames=5, size=16)
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="n_frames must be 1\\+4k"):
        WebVideoDataset(tmp_path, n_frames=4, size=16)
    with pytest.raises(ValueError, match="pass both rank and world_size"):
        WebVideoDataset(tmp_path, n_frames=5, size=16, rank=1)


def test_tokenizer_evaluation_reads_tar_shards_in_a_fixed_order(video_folder, tmp_path):
    """Tar shards as ``eval_folder`` give their first clips; as the training source without
    one, the first training clips, said to be not held out."""
    from loong.train.tokenizer_config import TokenizerDataConfig
    from loong.train.tokenizer_data import evaluation_source, held_out_clips

    write_shards(video_folder, tmp_path, samples_per_shard=5)
    first = WebVideoDataset(tmp_path, n_frames=5, size=16, shuffle=False, rank=0, world_size=1)
    expected = [sample["video"] for _, sample in zip(range(3), first, strict=False)]
    as_eval = TokenizerDataConfig(eval_folder=str(tmp_path), n_frames=5, size=16)
    as_source = TokenizerDataConfig(source=str(tmp_path), n_frames=5, size=16)
    for cfg in (as_eval, as_source):
        clips = held_out_clips(cfg, 3)
        assert clips.shape == (3, 3, 5, 16, 16)
        assert all((clip == want).all() for clip, want in zip(clips, expected, strict=True))
    assert evaluation_source(as_eval)[1] and not evaluation_source(as_source)[1]
