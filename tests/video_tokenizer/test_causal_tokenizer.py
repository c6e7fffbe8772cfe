"""Causality, shapes and chunking of the causal 3D CNN tokenizer (MAGVIT-v2 sec. 3.2; DESIGN.md).

Every test uses the tiny config from ``tests/conftest.py``: 8× spatial and 4× temporal compression,
so ``1 + 4k`` frames → ``1 + k`` latent frames, with random (untrained) weights.
"""

from __future__ import annotations

import pytest
import torch

from loong.video_tokenizer.model import StreamCache, StreamingDecoder, StreamingEncoder


def latents(model, video: torch.Tensor) -> torch.Tensor:
    """The encoder's continuous latent ``(B, D, t, h, w)`` before quantization."""
    with torch.no_grad():
        return model.encoder(video, StreamCache())


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    """The decoder's output ``(B, C, T, H, W)`` for a continuous latent (no clamp)."""
    with torch.no_grad():
        return model.decoder(z, StreamCache())


def assert_frames_differ(a: torch.Tensor, b: torch.Tensor, frames, dim: int = 2) -> None:
    for f in frames:
        diff = (a.select(dim, f) - b.select(dim, f)).abs().max().item()
        assert diff > 1e-4, f"frame {f} did not change (max diff {diff})"


# --- causality -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_encoder_is_causal(make_small_tokenizer, make_video, k):
    model = make_small_tokenizer()
    video = make_video(frames=17)
    changed = video.clone()
    changed[:, :, 4 * k + 1 :] = make_video(frames=17, seed=1)[:, :, 4 * k + 1 :]

    z, z2 = latents(model, video), latents(model, changed)
    assert z.shape[2] == 5
    torch.testing.assert_close(z2[:, :, : k + 1], z[:, :, : k + 1], rtol=1e-5, atol=1e-6)
    assert_frames_differ(z, z2, range(k + 1, 5))

    idx, idx2 = model.encode(video), model.encode(changed)
    assert torch.equal(idx2[:, : k + 1], idx[:, : k + 1])
    assert not torch.equal(idx2[:, k + 1 :], idx[:, k + 1 :])


def test_changing_only_the_next_frame_changes_only_later_latents(make_small_tokenizer, make_video):
    model = make_small_tokenizer()
    video = make_video(frames=9)
    changed = video.clone()
    changed[:, :, 5] = -changed[:, :, 5]  # frame 5 belongs to latent frame 2 (frames 5..8)
    z, z2 = latents(model, video), latents(model, changed)
    torch.testing.assert_close(z2[:, :, :2], z[:, :, :2], rtol=1e-5, atol=1e-6)
    assert_frames_differ(z, z2, [2])


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_decoder_is_causal(make_small_tokenizer, j):
    model = make_small_tokenizer()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 6, 5, 4, 4, generator=g)
    z2 = z.clone()
    z2[:, :, j + 1 :] = torch.randn(1, 6, 4 - j, 4, 4, generator=g)

    out, out2 = decode_latents(model, z), decode_latents(model, z2)
    assert out.shape == (1, 3, 17, 32, 32)
    # Latent frame j covers frames 4j−3..4j (frame 0 for j = 0): frames 0..4j only see latents <= j.
    torch.testing.assert_close(
        out2[:, :, : 4 * j + 1], out[:, :, : 4 * j + 1], rtol=1e-5, atol=1e-6
    )
    assert_frames_differ(out, out2, range(4 * j + 1, 17))


@pytest.mark.parametrize("j", [0, 2])
def test_decode_of_indices_is_causal(make_small_tokenizer, j):
    model = make_small_tokenizer()
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 64, (1, 5, 4, 4), generator=g)
    idx2 = idx.clone()
    idx2[:, j + 1 :] = (idx[:, j + 1 :] + 1 + torch.randint(0, 62, idx[:, j + 1 :].shape)) % 64
    out, out2 = model.decode(idx), model.decode(idx2)
    torch.testing.assert_close(
        out2[:, :, : 4 * j + 1], out[:, :, : 4 * j + 1], rtol=1e-5, atol=1e-6
    )
    assert_frames_differ(out, out2, range(4 * j + 1, 17))


def test_image_tokenizes_like_first_frame_of_video(make_small_tokenizer, make_video):
    model = make_small_tokenizer()
    video = make_video(batch=2, frames=9)
    image = video[:, :, :1]
    torch.testing.assert_close(
        latents(model, image), latents(model, video)[:, :, :1], rtol=1e-5, atol=1e-6
    )
    idx_image, idx_video = model.encode(image), model.encode(video)
    assert idx_image.shape == (2, 1, 4, 4)
    assert torch.equal(idx_image, idx_video[:, :1])
    # And back: one latent frame decodes to one frame, the video's first.
    torch.testing.assert_close(
        model.decode(idx_video[:, :1]), model.decode(idx_video)[:, :, :1], rtol=1e-5, atol=1e-6
    )


def test_batch_items_are_independent(make_small_tokenizer, make_video):
    model = make_small_tokenizer()
    video = make_video(batch=2, frames=5)
    both = model.encode(video)
    assert torch.equal(both[:1], model.encode(video[:1]))
    assert torch.equal(both[1:], model.encode(video[1:]))


# --- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_frames_to_latents_to_frames(make_small_tokenizer, make_video, k):
    model = make_small_tokenizer()
    video = make_video(batch=2, frames=1 + 4 * k, height=32, width=24)
    idx = model.encode(video)
    assert idx.shape == (2, 1 + k, 4, 3)
    assert idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 2**6
    out = model.decode(idx)
    assert out.shape == (2, 3, 1 + 4 * k, 32, 24)
    assert out.abs().max() <= 1.0
    with torch.no_grad():
        fwd = model(video)
    assert fwd.recon.shape == video.shape
    assert torch.equal(fwd.indices, idx)
    assert fwd.quantizer_loss.ndim == 0 and torch.isfinite(fwd.quantizer_loss)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 16, 16, 16), r"frames must be 1\+4k, got 16: pass 13 or 17"),
        ((1, 3, 5, 20, 16), r"multiples of 8, got 20×16"),
        ((1, 3, 5, 16, 12), r"multiples of 8, got 16×12"),
        ((1, 1, 5, 16, 16), r"\(B, 3, T, H, W\).*got shape \(1, 1, 5, 16, 16\)"),
        ((3, 5, 16, 16), r"video\.unsqueeze\(0\)"),
    ],
)
def test_bad_video_shapes_raise_helpful_errors(make_small_tokenizer, shape, match):
    model = make_small_tokenizer()
    video = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        model.encode(video)
    with pytest.raises(ValueError, match=match):
        model(video)


def test_decode_rejects_non_4d_indices(make_small_tokenizer):
    model = make_small_tokenizer()
    with pytest.raises(ValueError, match=r"\(B, t, h, w\)"):
        model.decode(torch.zeros(2, 4, 4, dtype=torch.long))


# --- chunked and streaming equal one-shot ----------------------------------------------------


@pytest.mark.parametrize(("frames", "chunk"), [(17, 4), (17, 8), (21, 8), (9, 16)])
def test_chunked_encode_equals_one_shot(make_small_tokenizer, make_video, frames, chunk):
    model = make_small_tokenizer()
    video = make_video(frames=frames)
    one_shot = model.encode(video)
    assert torch.equal(model.encode(video, chunk_frames=chunk), one_shot)

    # The continuous latents, chunk by chunk as encode does it: 1 + chunk frames, then chunk.
    cache, parts, start = StreamCache(), [], 0
    for end in [*range(1 + chunk, frames, chunk), frames]:
        with torch.no_grad():
            parts.append(model.encoder(video[:, :, start:end], cache))
        cache.first = False
        start = end
    torch.testing.assert_close(torch.cat(parts, 2), latents(model, video), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [0, 16])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_decode_equals_one_shot(make_small_tokenizer, chunk, levels):
    model = make_small_tokenizer(output_levels=levels)
    idx = torch.randint(0, 64, (2, 5, 4, 4), generator=torch.Generator().manual_seed(5))
    one_shot = model.decode(idx)
    torch.testing.assert_close(
        model.decode(idx, chunk_latents=chunk), one_shot, rtol=1e-5, atol=1e-5
    )


def test_streaming_encoder_with_uneven_chunks(make_small_tokenizer, make_video):
    model = make_small_tokenizer()
    video = make_video(frames=21)
    encoder = StreamingEncoder(model)
    bounds = [(0, 1), (1, 9), (9, 13), (13, 21)]
    parts = [encoder(video[:, :, a:b]) for a, b in bounds]
    assert [p.shape[1] for p in parts] == [1, 2, 1, 2]
    assert torch.equal(torch.cat(parts, 1), model.encode(video))


def test_streaming_decoder_with_uneven_chunks(make_small_tokenizer):
    model = make_small_tokenizer()
    idx = torch.randint(0, 64, (1, 6, 4, 4), generator=torch.Generator().manual_seed(6))
    decoder = StreamingDecoder(model)
    parts = [decoder(idx[:, a:b]) for a, b in [(0, 2), (2, 3), (3, 6)]]
    # First call: 1 + 4(t − 1) frames; later calls: 4t frames.
    assert [p.shape[2] for p in parts] == [5, 4, 12]
    torch.testing.assert_close(torch.cat(parts, 2), model.decode(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 6, 0, -4])
def test_chunk_frames_must_be_a_positive_multiple_of_4(make_small_tokenizer, make_video, chunk):
    model = make_small_tokenizer()
    with pytest.raises(ValueError, match="chunk_frames must be a positive multiple of 4"):
        model.encode(make_video(frames=9), chunk_frames=chunk)


def test_streaming_chunk_after_the_first_must_be_a_multiple_of_4(make_small_tokenizer, make_video):
    model = make_small_tokenizer()
    video = make_video(frames=9)
    encoder = StreamingEncoder(model)
    encoder(video[:, :, :5])
    with pytest.raises(ValueError, match="multiple of 4 frames, got 3"):
        encoder(video[:, :, 5:8])


def test_chunk_latents_must_be_positive(make_small_tokenizer):
    model = make_small_tokenizer()
    with pytest.raises(ValueError, match="chunk_latents must be positive"):
        model.decode(torch.zeros(1, 3, 2, 2, dtype=torch.long), chunk_latents=-1)


# --- the local encoder -----------------------------------------------------------------------


def test_local_encoder_tokens_see_only_their_own_cell(make_small_tokenizer, make_video):
    model = make_small_tokenizer(local_encoder=True)
    video = make_video(frames=9)  # (B, 3, 9, 32, 32) → latent (B, D, 3, 4, 4), 8×8-pixel cells
    changed = video.clone()
    changed[:, :, 5:, 8:16, 16:24] = -changed[:, :, 5:, 8:16, 16:24]  # cell (1, 2), from frame 5
    z, z2 = latents(model, video), latents(model, changed)
    moved = (z2 - z).abs().amax(dim=(0, 1))  # (t, h, w)
    assert moved[2, 1, 2] > 1e-4
    moved[2, 1, 2] = 0
    assert moved.max() == 0, "a token changed whose cell did not"


def test_local_encoder_gives_a_flat_frame_one_code(make_small_tokenizer):
    model = make_small_tokenizer(local_encoder=True)
    video = torch.full((1, 3, 9, 32, 32), 0.3)
    ids = model.encode(video)  # (1, 3, 4, 4)
    for frame in ids[0]:
        assert frame.unique().numel() == 1


def test_local_encoder_is_causal_and_chunks_exactly(make_small_tokenizer, make_video):
    model = make_small_tokenizer(local_encoder=True)
    video = make_video(frames=17)
    changed = video.clone()
    changed[:, :, 9:] = make_video(frames=17, seed=1)[:, :, 9:]
    idx, idx2 = model.encode(video), model.encode(changed)
    assert torch.equal(idx2[:, :3], idx[:, :3])
    assert torch.equal(model.encode(video, chunk_frames=8), idx)


# --- bounded encoder history -----------------------------------------------------------------


def windowed_latents(model, video: torch.Tensor) -> torch.Tensor:
    """``encoder_history`` by definition: latent t ≥ 1 is the last latent of a fresh clip of
    frames r(t − 1 − k) .. rt (clipped at frame 0), encoded alone; latent 0 is frame 0 alone."""
    k, r = model.config.encoder_history, 4
    parts = [latents(model, video[:, :, :1])]
    for t in range(1, (video.shape[2] - 1) // r + 1):
        parts.append(latents(model, video[:, :, max(0, r * (t - 1 - k)) : r * t + 1])[:, :, -1:])
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize("history", [0, 1, 2])
@pytest.mark.parametrize("local", [False, True])
def test_bounded_history_encoder_sees_only_its_window(
    make_small_tokenizer, make_video, history, local
):
    model = make_small_tokenizer(encoder_history=history, local_encoder=local)
    video = make_video(frames=21)
    with torch.no_grad():
        z = model.encode_latents(video)
    assert z.shape[2] == 6
    torch.testing.assert_close(z, windowed_latents(model, video), rtol=1e-5, atol=1e-5)

    # Frames before latent 5's window (it starts at frame 4(4 − k)) no longer reach it...
    changed = video.clone()
    start = 4 * (4 - history)
    changed[:, :, :start] = make_video(frames=21, seed=1)[:, :, :start]
    with torch.no_grad():
        z2 = model.encode_latents(changed)
    torch.testing.assert_close(z2[:, :, 5], z[:, :, 5], rtol=1e-5, atol=1e-6)
    assert_frames_differ(z, z2, range(5))
    # ...while with the full history they do.
    full = make_small_tokenizer(local_encoder=local)
    assert_frames_differ(latents(full, video), latents(full, changed), [5])


@pytest.mark.parametrize("history", [0, 1, 3])
@pytest.mark.parametrize(("frames", "chunk"), [(21, 4), (21, 8), (17, 12), (9, 16)])
def test_bounded_history_chunked_encode_equals_one_shot(
    make_small_tokenizer, make_video, history, frames, chunk
):
    model = make_small_tokenizer(encoder_history=history)
    video = make_video(frames=frames)
    one_shot = model.encode(video)
    assert one_shot.shape[1] == 1 + (frames - 1) // 4
    assert torch.equal(model.encode(video, chunk_frames=chunk), one_shot)
    encoder = StreamingEncoder(model)
    parts = [encoder(video[:, :, a:b]) for a, b in [(0, 1), (1, 5), (5, frames)]]
    assert torch.equal(torch.cat(parts, 1), one_shot)
    with torch.no_grad():
        assert torch.equal(model(video).indices, one_shot)


def test_encoder_history_must_not_be_negative(make_small_tokenizer):
    with pytest.raises(ValueError, match="encoder_history must be >= 0 or None"):
        make_small_tokenizer(encoder_history=-1)
