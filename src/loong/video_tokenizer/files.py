"""File-level tokenizer jobs behind ``loong tokenizer encode | decode | eval``.

A token file is ``.safetensors`` holding ``indices`` int32 ``(t, h, w)`` plus metadata: the frame
rate and the tokenizer's vocabulary size, so decoding can check it was made by a matching model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loong.data.video import (
    frames_to_tensor,
    read_video,
    resize_video,
    tensor_to_frames,
    write_video,
)
from loong.video_tokenizer.model import VideoTokenizer


def encode_file(
    model: VideoTokenizer,
    video_path: str | Path,
    out_path: str | Path,
    *,
    size: int | None = None,
    fps: float | None = None,
    chunk_frames: int = 64,
) -> tuple[int, ...]:
    """Encode a video file into a token file; returns the token grid's shape ``(t, h, w)``.

    The video is resized (centre crop) to ``size`` when given, and cut to the longest 1 + 4k
    prefix; it is encoded ``chunk_frames`` frames at a time, so memory stays bounded.
    """
    frames, rate = read_video(video_path, fps=fps)
    if size is not None:
        frames = resize_video(frames, size)
    s, r = model.config.spatial_compression, model.config.temporal_compression
    h, w = frames.shape[1] // s * s, frames.shape[2] // s * s
    if (h, w) != frames.shape[1:3]:
        frames = resize_video(frames, (h, w))
    frames = frames[: (len(frames) - 1) // r * r + 1]
    video = frames_to_tensor(frames).unsqueeze(0)  # (1, C, T, H, W)
    indices = model.encode(video, chunk_frames=chunk_frames)[0]  # (t, h, w)
    save_file(
        {"indices": indices.to(torch.int32).contiguous()},
        str(out_path),
        metadata={"fps": str(rate), "vocab_size": str(model.config.vocab_size)},
    )
    return tuple(indices.shape)


def decode_file(
    model: VideoTokenizer, tokens_path: str | Path, out_path: str | Path, *, chunk_latents: int = 4
) -> int:
    """Decode a token file of :func:`encode_file` to an mp4 or GIF; returns the frame count."""
    from safetensors import safe_open

    with safe_open(str(tokens_path), "pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(tokens_path))
    if "indices" not in tensors:
        raise ValueError(f"{tokens_path} is not a loong token file: it has no 'indices' tensor")
    vocab = int(metadata.get("vocab_size", model.config.vocab_size))
    if vocab != model.config.vocab_size:
        raise ValueError(
            f"{tokens_path} was made by a tokenizer with {vocab} codes, but this model has "
            f"{model.config.vocab_size}: decode with the model that encoded it"
        )
    indices = tensors["indices"].long().unsqueeze(0)  # (1, t, h, w)
    video = model.decode(indices, chunk_latents=chunk_latents)[0]
    frames = tensor_to_frames(video)
    write_video(out_path, frames, float(metadata.get("fps", 8.0)))
    return len(frames)
