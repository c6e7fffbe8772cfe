"""One id space for text, video and special tokens, and the token sequence of a sample (Loong).

Id layout (Loong: 32,000 text + 8,192 video + 10 special = 40,202)::

    [0, text)                     text ids, as the text tokenizer gives them
    [text, text + video)          video ids: the video tokenizer's index + text
    [text + video, vocab_size)    specials: BOS, EOS, BOV, EOV, PAD, then reserved slots

The reserved slots keep ids for later frame-rate (CogVideo) and task (VideoPoet) tokens, so adding
them changes no existing id and no trained embedding row.

Sequence of one text-to-video sample::

    [BOS] text ... [BOV] frame 0 (h·w ids, raster order) ... frame t−1 [EOV] [EOS]

BOV ends the prompt: the generation prompt is ``layout(text_ids, None)``, which stops right after
BOV, and the model predicts the first video token from it. EOV closes the video part and EOS the
sequence; both are kept so later multi-part sequences (audio after video, VideoPoet) can put more
after EOV. A training window that stops mid-video uses ``eov=False`` (no EOV, no EOS).

Axes: L sequence, t h w latent grid, B batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Offsets of the named specials inside the special block.
BOS, EOS, BOV, EOV, PAD = range(5)
N_NAMED_SPECIALS = 5


@dataclass(kw_only=True)
class VocabConfig:
    text_vocab_size: int = 32000
    """Size of the text id range; the text tokenizer's vocabulary must fit in it."""
    video_vocab_size: int = 8192
    """Size of the video id range: the video tokenizer's codebook size."""
    n_special: int = 10
    """Special ids after the video range: BOS, EOS, BOV, EOV, PAD, then reserved slots."""

    def __post_init__(self) -> None:
        if self.text_vocab_size < 0 or self.video_vocab_size <= 0:
            raise ValueError(
                f"text_vocab_size must be >= 0 and video_vocab_size > 0, got "
                f"{self.text_vocab_size} and {self.video_vocab_size}"
            )
        if self.n_special < N_NAMED_SPECIALS:
            raise ValueError(
                f"n_special must be at least {N_NAMED_SPECIALS} (BOS, EOS, BOV, EOV, PAD), "
                f"got {self.n_special}"
            )

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.video_vocab_size + self.n_special


@dataclass
class Layout:
    """One sample's token sequence."""

    token_ids: torch.Tensor
    """(L,) int64 ids in the joint id space."""
    frame_index: torch.Tensor
    """(L,) int64 latent frame of each token (aligned with ``token_ids``); −1 for text/specials.

    The logits at position i predict token i + 1, so a loss over ``logits[:-1]`` takes its
    per-frame labels (loss re-weighting, per-frame logging) from ``frame_index[1:]``.
    """


@dataclass
class Batch:
    """Right-padded layouts; every tensor is aligned with ``token_ids``."""

    token_ids: torch.Tensor
    """(B, L) int64, PAD after each sample's end."""
    frame_index: torch.Tensor
    """(B, L) int64 latent frame of each token; −1 for text, specials and padding."""
    attention_mask: torch.Tensor
    """(B, L) bool, True for real tokens and False for padding.

    Padding sits at the end, so causal attention never lets a real token see it and the model
    needs no mask in training; the loss at position i (predicting i + 1) is kept where
    ``attention_mask[:, 1:]`` is True.
    """


class Vocabulary:
    """Maps text ids and video indices into the joint id space and builds sample sequences."""

    def __init__(self, config: VocabConfig) -> None:
        self.config = config
        self.text_vocab_size = config.text_vocab_size
        self.video_offset = config.text_vocab_size
        self.special_offset = config.text_vocab_size + config.video_vocab_size
        self.vocab_size = config.vocab_size
        self.bos = self.special_offset + BOS
        self.eos = self.special_offset + EOS
        self.bov = self.special_offset + BOV
        self.eov = self.special_offset + EOV
        self.pad = self.special_offset + PAD

    @property
    def video_id_range(self) -> tuple[int, int]:
        """``(lo, hi)``: video ids are ``lo <= id < hi``."""
        return self.video_offset, self.special_offset

    @property
    def reserved_ids(self) -> tuple[int, ...]:
        """Unnamed special ids kept for frame-rate and task tokens."""
        return tuple(range(self.special_offset + N_NAMED_SPECIALS, self.vocab_size))

    def is_video(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask, same shape as ``ids``: True where an id is a video id."""
        lo, hi = self.video_id_range
        return (ids >= lo) & (ids < hi)

    def video_to_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Video tokenizer indices (any shape) → video ids (same shape, int64)."""
        n = self.config.video_vocab_size
        if indices.numel() and (indices.min() < 0 or indices.max() >= n):
            bad = indices[(indices < 0) | (indices >= n)][0]
            raise ValueError(
                f"video index {int(bad)} is outside the video tokenizer's range [0, {n}): "
                f"does the LM's video_vocab_size match the tokenizer's codebook?"
            )
        return indices.long() + self.video_offset

    def ids_to_video(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Video ids ``(..., t·h·w)`` in raster order → indices ``(..., t, h, w)``.

        ``grid`` is ``(h, w)``; the number of ids must be a whole number of frames.
        """
        lo, hi = self.video_id_range
        outside = ~self.is_video(ids)
        if outside.any():
            bad = ids[outside][0]
            raise ValueError(
                f"id {int(bad)} is not a video id: video ids lie in [{lo}, {hi}); "
                f"strip BOV/EOV and text before converting"
            )
        h, w = grid
        n = ids.shape[-1]
        if n % (h * w):
            raise ValueError(f"{n} video ids do not fill whole {h}×{w} frames")
        return (ids - lo).reshape(*ids.shape[:-1], n // (h * w), h, w)

    def layout(
        self,
        text_ids: Sequence[int],
        video_indices: torch.Tensor | None,
        *,
        eov: bool = True,
    ) -> Layout:
        """``[BOS] text [BOV] video [EOV] [EOS]`` for text ids and indices ``(t, h, w)``.

        ``video_indices=None`` gives the generation prompt ``[BOS] text [BOV]``. ``eov=False``
        leaves the video open (no EOV, no EOS), for windows that stop mid-video.
        """
        text = torch.as_tensor(list(text_ids), dtype=torch.long)
        if text.numel() and (text.min() < 0 or text.max() >= self.text_vocab_size):
            bad = text[(text < 0) | (text >= self.text_vocab_size)][0]
            raise ValueError(
                f"text id {int(bad)} is outside the text range [0, {self.text_vocab_size}): "
                f"the text tokenizer's vocabulary is larger than text_vocab_size"
            )
        head = torch.cat([torch.tensor([self.bos]), text, torch.tensor([self.bov])])  # (L_p,)
        parts, frames = [head], [torch.full_like(head, -1)]
        if video_indices is not None:
            if video_indices.ndim != 3:
                raise ValueError(
                    f"video_indices must be (t, h, w) for one sample, got shape "
                    f"{tuple(video_indices.shape)}"
                )
            t, h, w = video_indices.shape
            parts.append(self.video_to_ids(video_indices).flatten())  # (t·h·w,) raster order
            frames.append(torch.arange(t).repeat_interleave(h * w))
            if eov:
                tail = torch.tensor([self.eov, self.eos])
                parts.append(tail)
                frames.append(torch.full_like(tail, -1))
        return Layout(token_ids=torch.cat(parts), frame_index=torch.cat(frames))

    def collate(self, layouts: Sequence[Layout], pad_to: int | None = None) -> Batch:
        """Right-pad layouts with PAD to ``pad_to`` (default: the longest) into a batch."""
        if not layouts:
            raise ValueError("collate needs at least one layout")
        longest = max(len(x.token_ids) for x in layouts)
        length = longest if pad_to is None else pad_to
        if length < longest:
            raise ValueError(
                f"a layout has {longest} tokens, more than pad_to={pad_to}: raise pad_to or "
                f"cut the sample"
            )
        b = len(layouts)
        token_ids = torch.full((b, length), self.pad, dtype=torch.long)  # (B, L)
        frame_index = torch.full((b, length), -1, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.bool)
        for i, x in enumerate(layouts):
            n = len(x.token_ids)
            token_ids[i, :n] = x.token_ids
            frame_index[i, :n] = x.frame_index
            attention_mask[i, :n] = True
        return Batch(token_ids=token_ids, frame_index=frame_index, attention_mask=attention_mask)
