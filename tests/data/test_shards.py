"""Token shards: exact round trips, grouping by length, resumable writing, bad files skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from loong.data.shapes import ShapesWorld, ShapesWorldConfig, render, sample_scene
from loong.data.shards import (
    TokenizeConfig,
    TokenShards,
    tokenize_dataset,
    tokenize_folder,
    tokenize_shapes_world,
)
from loong.data.video import frames_to_tensor, resize_video, write_video
from loong.text_tokenizer import TextTokenizer
from loong.video_tokenizer.model import VideoTokenizer

SHAPES = {"n_frames": 5, "size": 64, "fps": 8.0, "seed": 3, "still_share": 0.4}


@pytest.fixture(scope="module")
def video_tokenizer(small_tokenizer_config) -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(small_tokenizer_config()).eval()


def test_shapes_world_round_trip_groups_stills_apart(tmp_path, video_tokenizer):
    meta = tokenize_shapes_world(
        video_tokenizer,
        tmp_path,
        n_clips=8,
        n_paraphrases=1,
        batch_size=3,
        shard_size=4,
        progress=False,
        **SHAPES,
    )
    shards = TokenShards(tmp_path)
    assert len(shards) == meta["n_items"] == 8
    assert shards.grid == (8, 8) and shards.video_vocab_size == 64
    assert set(shards.lengths) == {1, 2}  # stills: 1 frame → t = 1; clips: 5 frames → t = 2
    world = ShapesWorld(
        ShapesWorldConfig(height=64, width=64, n_frames=5, still_prob=0.4, seed=SHAPES["seed"])
    )
    seen = 0
    for t in shards.lengths:
        for i in range(shards.count(t)):
            record = shards.record(t, i)
            index = int(record["source"].removeprefix("shapes:"))
            text, video = world[index]
            caption, indices = shards.item(t, i)
            assert caption == text and len(record["alternates"]) == 1
            assert indices.dtype == torch.int64 and indices.shape == (t, 8, 8)
            assert video.shape[1] == 1 + 4 * (t - 1)
            torch.testing.assert_close(
                indices, video_tokenizer.encode(video[None])[0], rtol=0, atol=0
            )
            seen += 1
    assert seen == 8
    assert all(json.loads((tmp_path / "meta.json").read_text())[k] for k in ("complete", "shards"))
    assert np.load(tmp_path / f"{meta['shards'][0]['name']}.npy").dtype == np.uint16


def test_a_rerun_skips_finished_units_and_an_interrupted_run_resumes(
    tmp_path, video_tokenizer, monkeypatch, make_small_tokenizer
):
    kwargs = {"n_clips": 7, "batch_size": 2, "shard_size": 3, "progress": False, **SHAPES}
    straight = tokenize_shapes_world(video_tokenizer, tmp_path / "straight", **kwargs)

    real_encode = VideoTokenizer.encode
    calls = []

    def encode_then_crash(self, video, **kw):
        calls.append(video.shape[0])
        if len(calls) == 3:  # inside the second unit
            raise KeyboardInterrupt("simulated crash")
        return real_encode(self, video, **kw)

    monkeypatch.setattr(VideoTokenizer, "encode", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_shapes_world(video_tokenizer, tmp_path / "resumed", **kwargs)
    with pytest.raises(ValueError, match="incomplete"):
        TokenShards(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "shard_00000.json").is_file()
    assert not (tmp_path / "resumed" / "shard_00001.json").exists()

    def count_encode(self, video, **kw):
        calls.append(video.shape[0])
        return real_encode(self, video, **kw)

    calls.clear()
    monkeypatch.setattr(VideoTokenizer, "encode", count_encode)
    resumed = tokenize_shapes_world(video_tokenizer, tmp_path / "resumed", **kwargs)
    assert 0 < len(calls) < 4  # units 1 and 2 only (unit 0 was done)
    assert resumed["shards"] == straight["shards"]
    a, b = TokenShards(tmp_path / "straight"), TokenShards(tmp_path / "resumed")
    for i in range(len(a)):
        assert a[i][0] == b[i][0] and torch.equal(a[i][1], b[i][1])

    calls.clear()
    tokenize_shapes_world(video_tokenizer, tmp_path / "resumed", **kwargs)
    assert calls == []  # everything done: nothing is encoded again
    with pytest.raises(ValueError, match=r"n_frames.: \(5, 9\)"):
        tokenize_shapes_world(video_tokenizer, tmp_path / "resumed", **{**kwargs, "n_frames": 9})
    with pytest.raises(ValueError, match="video_tokenizer weights"):
        tokenize_shapes_world(
            make_small_tokenizer(seed=1, perturb_adaptive_norms=False),
            tmp_path / "resumed",
            **kwargs,
        )


def write_png(path: Path, image: np.ndarray) -> None:
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture
def video_folder(tmp_path) -> Path:
    """Two captioned videos, a captioned image, and one bad file of each kind."""
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    clips = {}
    for name in ("a.mp4", "sub/b.mp4", "short.mp4", "nocaption.mp4"):
        frames = render(sample_scene(rng), seed=1, n_frames=3 if name == "short.mp4" else 11)
        write_video(folder / name, frames, fps=8)
        clips[name] = frames
    write_png(folder / "still.png", clips["a.mp4"][0])
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    for name in ("a.mp4", "sub/b.mp4", "short.mp4", "still.png", "broken.mp4"):
        (folder / name).with_suffix(".txt").write_text(f"caption of {name}\nanother wording\n")
    return folder


def test_folder_skips_bad_files_and_counts_them(tmp_path, video_tokenizer, video_folder):
    meta = tokenize_folder(
        video_tokenizer,
        video_folder,
        tmp_path / "shards",
        n_frames=5,
        size=64,
        fps=8.0,
        clips_per_video=None,
        shard_size=4,
        progress=False,
    )
    assert {k: v for k, v in meta["skipped"].items() if k != "files"} == {
        "unreadable": 1,
        "no_caption": 1,
        "too_short": 1,
    }
    assert set(meta["skipped"]["files"]) == {"broken.mp4", "nocaption.mp4", "short.mp4"}
    shards = TokenShards(tmp_path / "shards")
    assert meta["counts"] == {"1": 1, "2": 4}  # 11 frames → 2 clips of 5 per video; the image
    sources = sorted(shards.record(2, i)["source"] for i in range(4))
    assert sources == ["a.mp4#0", "a.mp4#1", "sub/b.mp4#0", "sub/b.mp4#1"]
    caption, indices = shards.item(1, 0)
    assert caption == "caption of still.png" and indices.shape == (1, 8, 8)
    assert shards.record(1, 0)["alternates"] == ["another wording"]
    # The image tokenizes like a one-frame clip of itself.
    from loong.data.video import read_image

    image = frames_to_tensor(resize_video(read_image(video_folder / "still.png"), 64))
    torch.testing.assert_close(indices, video_tokenizer.encode(image[None])[0], rtol=0, atol=0)


def test_folder_captions_from_jsonl(tmp_path, video_tokenizer, video_folder):
    lines = [{"file": "sub/b.mp4", "caption": "bee"}, {"file": "still.png", "caption": "img"}]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    meta = tokenize_folder(
        video_tokenizer,
        video_folder,
        tmp_path / "shards",
        captions=captions,
        n_frames=5,
        size=64,
        clips_per_video=1,
        progress=False,
    )
    shards = TokenShards(tmp_path / "shards")
    assert meta["counts"] == {"1": 1, "2": 1}
    assert shards.item(2, 0)[0] == "bee" and shards.item(1, 0)[0] == "img"
    assert meta["skipped"]["no_caption"] == 4  # a, short, nocaption, broken: not in the file
    captions.write_text('{"file": "a.mp4"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1"):
        tokenize_folder(video_tokenizer, video_folder, tmp_path / "x", captions=captions)


def test_tokenize_dataset_records_the_tokenizers(tmp_path, video_tokenizer):
    video_tokenizer.save_pretrained(tmp_path / "vt")
    cfg = TokenizeConfig(
        video_tokenizer=str(tmp_path / "vt"),
        n_clips=6,
        n_frames=5,
        still_share=0.5,
        shard_size=6,
        text_vocab_size=300,
    )
    out = tokenize_dataset(cfg, tmp_path / "shards", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["video_tokenizer"]["path"] == str((tmp_path / "vt").resolve())
    assert meta["text_tokenizer"]["file"] == "tokenizer.json"
    text = TextTokenizer.load(out / "tokenizer.json")
    assert text.vocab_size == meta["text_tokenizer"]["vocab_size"] <= 300
    caption = TokenShards(out)[0][0]
    assert text.decode(text.encode(caption)) == caption
    before = (out / "tokenizer.json").stat().st_mtime_ns
    tokenize_dataset(cfg, out, progress=False)  # resumed: same shards, tokenizer kept
    assert (out / "tokenizer.json").stat().st_mtime_ns == before


def _captioned_videos(folder: Path, n: int) -> Path:
    """``n`` five-frame shapes-world videos ``v{i}.mp4`` in ``folder``, captioned ``video i``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        write_video(folder / f"v{i}.mp4", render(sample_scene(rng), seed=i, n_frames=5), fps=8)
        (folder / f"v{i}.txt").write_text(f"video {i}\n")
    return folder


def test_a_folder_s_held_out_videos_go_to_eval_shards_that_lm_training_evaluates_on(
    tmp_path, video_tokenizer
):
    from loong.data.shards import EVAL_DIR
    from loong.data.video import HOLD_OUT_MIN_FILES, held_out_files, list_video_files
    from loong.train.lm_batches import evaluation_shards
    from loong.train.lm_config import LMDataConfig, LMTrainConfig

    folder = _captioned_videos(tmp_path / "videos", HOLD_OUT_MIN_FILES)
    held = {p.name for p in held_out_files(list_video_files(folder), folder, 0.05)}
    assert len(held) == 1
    video_tokenizer.save_pretrained(tmp_path / "vt")
    cfg = TokenizeConfig(
        source=str(folder), video_tokenizer=str(tmp_path / "vt"), n_frames=5, text_vocab_size=0
    )
    out = tokenize_dataset(cfg, tmp_path / "shards", progress=False)
    train, evaluation = TokenShards(out), TokenShards(out / EVAL_DIR)
    sources = {train.record(2, i)["source"].split("#")[0] for i in range(train.count(2))}
    assert sources == {f"v{i}.mp4" for i in range(HOLD_OUT_MIN_FILES)} - held
    assert [evaluation.record(2, 0)["source"].split("#")[0]] == sorted(held)
    assert len(evaluation) == 1
    lm = LMTrainConfig(data=LMDataConfig(shards=(str(out),)))
    source, what, held_out = evaluation_shards(lm, [train])
    assert held_out and [s.directory for s in source] == [out / EVAL_DIR] and "(1 item)" in what
    again = tokenize_dataset(cfg, out, progress=False)  # a rerun resumes both directories
    assert TokenShards(again / EVAL_DIR).record(2, 0) == evaluation.record(2, 0)
    without = TokenizeConfig(**{**cfg.__dict__, "eval_share": 0.0})
    out2 = tokenize_dataset(without, tmp_path / "all", progress=False)
    assert len(TokenShards(out2)) == HOLD_OUT_MIN_FILES and not (out2 / EVAL_DIR).exists()
    lm2 = LMTrainConfig(data=LMDataConfig(shards=(str(out2),)))
    source, what, held_out = evaluation_shards(lm2, [TokenShards(out2)])
    assert not held_out and "not held out" in what
    shutil.copytree(out / EVAL_DIR, out2 / EVAL_DIR)  # another run's: its files trained here
    source, what, held_out = evaluation_shards(lm2, [TokenShards(out2)])
    assert not held_out and source[0].directory == out2


def test_held_out_shards_with_no_items_give_way_to_the_training_shards(tmp_path, video_tokenizer):
    """The one held-out file of ten has no caption, so ``eval/`` holds nothing: LM training
    evaluates on a sample of its training items instead, and says so."""
    from loong.data.shards import EVAL_DIR
    from loong.data.video import HOLD_OUT_MIN_FILES, held_out_files, list_video_files
    from loong.lm.model import VideoLMConfig
    from loong.lm.vocab import VocabConfig, Vocabulary
    from loong.train.lm_batches import evaluation_set
    from loong.train.lm_config import LMDataConfig, LMTrainConfig, StageConfig

    folder = _captioned_videos(tmp_path / "videos", HOLD_OUT_MIN_FILES)
    [held] = held_out_files(list_video_files(folder), folder, 0.05)
    held.with_suffix(".txt").unlink()
    video_tokenizer.save_pretrained(tmp_path / "vt")
    cfg = TokenizeConfig(
        source=str(folder), video_tokenizer=str(tmp_path / "vt"), n_frames=5, text_vocab_size=300
    )
    out = tokenize_dataset(cfg, tmp_path / "shards", progress=False)
    assert len(TokenShards(out / EVAL_DIR)) == 0
    text = TextTokenizer.load(out / "tokenizer.json")
    vocab_cfg = VocabConfig(text_vocab_size=300, video_vocab_size=64, n_special=10)
    lm = LMTrainConfig(
        model=VideoLMConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab=vocab_cfg),
        data=LMDataConfig(shards=(str(out),)),
        stages=(StageConfig(name="clips", steps=1, lengths=(1, 2)),),
    )
    evaluation = evaluation_set(lm, [TokenShards(out)], text, Vocabulary(vocab_cfg))
    assert not evaluation.held_out and "not held out" in evaluation.what
    assert len(evaluation.batches) > 0
