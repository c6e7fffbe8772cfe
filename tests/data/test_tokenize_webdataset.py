"""WebDataset tar shards as a tokenize source, and tokenizing on many processes: what a source
string names, tar shards giving the items of the folder they were packed from, bad samples
skipped and counted, and two torchrun processes writing the shards one process writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")

from loong.data.shards import TokenizeConfig, TokenShards, tokenize_dataset, tokenize_folder
from loong.data.sources import expand_braces, shard_files, source_kind
from loong.data.tokenize_webdataset import tokenize_webdataset
from loong.video_tokenizer.model import VideoTokenizer


@pytest.fixture(scope="module")
def video_tokenizer(small_tokenizer_config) -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(small_tokenizer_config()).eval()


def _items(directory: Path) -> list[tuple[str, list[str], list[list]]]:
    """Every item of a shards directory as (caption, alternates, indices), in reading order."""
    shards = TokenShards(directory)
    out = []
    for t in shards.lengths:
        for i in range(shards.count(t)):
            record = shards.record(t, i)
            out.append((record["caption"], record["alternates"], shards.indices(t, i).tolist()))
    return out


def test_a_source_names_tar_shards_by_one_rule(tmp_path, make_tar_shards):
    tars = make_tar_shards(tmp_path, 5, samples_per_shard=2)  # shard-000000.tar .. 000002.tar
    folder = tmp_path / "shards"
    assert source_kind("shapes") == "shapes"
    assert source_kind(str(folder)) == "shards"  # .tar files directly inside
    assert source_kind(str(tmp_path / "videos")) == "folder"
    assert source_kind(str(tmp_path)) == "folder"  # .tar files only in a subfolder
    assert source_kind(str(tars[0])) == "shards"
    pattern = f"{folder}/shard-{{000000..000002}}.tar"
    assert source_kind(pattern) == "shards"
    assert shard_files(pattern) == shard_files(folder) == tars
    assert shard_files(tars[1]) == [tars[1]]
    assert expand_braces("a{1..3}{x,y}") == ["a1x", "a1y", "a2x", "a2y", "a3x", "a3y"]
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    with pytest.raises(ValueError, match=r"shards not found: .*shard-000003.tar"):
        shard_files(f"{folder}/shard-{{000000..000003}}.tar")
    with pytest.raises(ValueError, match=re.escape("write {first..last} or {a,b,c}")):
        expand_braces("shard-{x}.tar")


def test_tar_shards_tokenize_like_their_folder_and_skip_a_corrupt_sample(
    tmp_path, video_tokenizer, make_tar_shards
):
    """The same captions, alternates and indices as the folder the shards were packed from; the
    corrupt sample is skipped, counted and named, and a rerun keeps every finished unit."""
    make_tar_shards(tmp_path, 4, samples_per_shard=2, n_bad=1)  # bad_0 sorts first
    settings = {"n_frames": 9, "size": 64, "fps": 8.0, "clips_per_video": None, "progress": False}
    meta = tokenize_webdataset(video_tokenizer, tmp_path / "shards", tmp_path / "a", **settings)
    folder = tokenize_folder(video_tokenizer, tmp_path / "videos", tmp_path / "b", **settings)
    assert _items(tmp_path / "a") == _items(tmp_path / "b")
    assert meta["counts"] == folder["counts"] == {"3": 4}
    assert meta["skipped"]["unreadable"] == folder["skipped"]["unreadable"] == 1
    assert list(meta["skipped"]["files"]) == ["shard-000000.tar:bad_0"]
    assert "FFmpeg cannot decode it" in meta["skipped"]["files"]["shard-000000.tar:bad_0"]
    sources = [TokenShards(tmp_path / "a").record(3, i)["source"] for i in range(4)]
    assert sources[0] == "shard-000000.tar:clip_000#0"

    shutil.copytree(tmp_path / "shards", tmp_path / "cut")
    cut = tmp_path / "cut" / "shard-000002.tar"  # clip_003 alone
    cut.write_bytes(cut.read_bytes()[:1500])
    damaged = tokenize_webdataset(video_tokenizer, tmp_path / "cut", tmp_path / "c", **settings)
    assert damaged["counts"] == {"3": 3}  # the cut shard's one sample is lost
    assert "damaged shard" in damaged["skipped"]["files"]["shard-000002.tar"]
    assert damaged["skipped"]["unreadable"] == 2

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("shard_*")}
    again = tokenize_webdataset(video_tokenizer, tmp_path / "shards", tmp_path / "a", **settings)
    assert again["shards"] == meta["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("shard_*")} == before


def test_torchrun_tokenizes_on_two_processes_like_one(tmp_path, video_tokenizer, make_tar_shards):
    """``torchrun --nproc-per-node 2 -m loong.cli lm tokenize`` on 3 tar shards (a corrupt sample
    in the first): each item once, the same shards, skips and text tokenizer as one process, and
    the language model trains on them."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    make_tar_shards(tmp_path, 5, samples_per_shard=2, n_bad=1)
    video_tokenizer.save_pretrained(tmp_path / "vt")
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    cfg = TokenizeConfig(
        source=pattern,
        video_tokenizer=str(tmp_path / "vt"),
        n_frames=9,
        size=64,
        text_vocab_size=300,
    )
    one = tokenize_dataset(cfg, tmp_path / "one", progress=False)

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    launcher = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "loong.cli"]
    args = ["lm", "tokenize", "--video-tokenizer", str(tmp_path / "vt"), "--data", pattern]
    args += ["--set", "n_frames=9", "--set", "size=64", "--set", "text_vocab_size=300"]
    two = subprocess.run(
        [*launcher, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("token shards in") == 1

    a, b = (json.loads((d / "meta.json").read_text()) for d in (one, tmp_path / "two"))
    for key in ("shards", "counts", "skipped", "text_tokenizer", "params"):
        assert a[key] == b[key], key
    assert _items(one) == _items(tmp_path / "two")
    shards = TokenShards(tmp_path / "two")
    sources = Counter(shards.record(3, i)["source"] for i in range(shards.count(3)))
    assert len(sources) == 5 and set(sources.values()) == {1}
    text_tokenizers = [(d / "tokenizer.json").read_bytes() for d in (one, tmp_path / "two")]
    assert text_tokenizers[0] == text_tokenizers[1]

    from loong.lm.model import VideoLMConfig
    from loong.lm.vocab import VocabConfig
    from loong.train.lm import train_lm
    from loong.train.lm_config import LMDataConfig, LMTrainConfig, StageConfig

    lm = LMTrainConfig(
        model=VideoLMConfig(
            dim=16,
            n_layers=1,
            n_heads=2,
            max_seq_len=256,
            vocab=VocabConfig(text_vocab_size=300, video_vocab_size=64, n_special=10),
        ),
        data=LMDataConfig(shards=(str(tmp_path / "two"),), max_text_tokens=32),
        stages=(StageConfig(name="clips", steps=2, lengths=(3,)),),
        batch_size=2,
        device="cpu",
        eval_items=2,
        tensorboard=False,
    )
    export = train_lm(lm, tmp_path / "lm", progress=False)
    assert (export / "model.safetensors").is_file()


def test_each_rank_tokenizes_its_own_units_and_rank_0_merges(
    tmp_path, video_tokenizer, monkeypatch
):
    """Rank r of 2 takes units r, r + 2, ...: run one after the other (barriers need no partner
    then), rank 1 writes only its units, rank 0 the rest and a meta.json equal to one process's."""
    import loong.data.shards as shards_module

    kwargs = {"n_clips": 7, "n_frames": 5, "size": 64, "shard_size": 2, "progress": False}
    one = shards_module.tokenize_shapes_world(video_tokenizer, tmp_path / "one", **kwargs)
    monkeypatch.setattr(shards_module, "current_world_size", lambda: 2)
    monkeypatch.setattr(shards_module, "current_rank", lambda: 1)
    shards_module.tokenize_shapes_world(video_tokenizer, tmp_path / "two", **kwargs)
    manifests = sorted(p.name for p in (tmp_path / "two").glob("shard_?????.json"))
    assert manifests == ["shard_00001.json", "shard_00003.json"]
    assert not (tmp_path / "two" / "meta.json").exists()  # rank 0 writes it
    monkeypatch.setattr(shards_module, "current_rank", lambda: 0)
    two = shards_module.tokenize_shapes_world(video_tokenizer, tmp_path / "two", **kwargs)
    assert two["shards"] == one["shards"] and two["counts"] == one["counts"]
    assert _items(tmp_path / "two") == _items(tmp_path / "one")
