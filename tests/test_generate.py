"""Text-to-video pipeline: seeding, streaming, the sliding window with and without re-encoding,
frame counts, file output and clear errors. Tiny random models: 32×32 frames, 4×4 latent grid."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import loong.generate as generate_module
from loong.data.video import read_video, tensor_to_frames
from loong.generate import (
    GENERATION_FILE,
    GenerateConfig,
    GenerationMetadata,
    TextToVideo,
    generate_video,
    sample_latent_frames,
    source_frame_index,
)
from loong.lm.model import VideoLM
from loong.lm.presets import lm_preset
from loong.lm.sampling import generate_video_tokens
from loong.text_tokenizer import TextTokenizer

CAPTIONS = ["a red ball bounces", "a blue square slides left", "two circles orbit slowly"] * 4
FPS = 8.0
HW = 16  # 4×4 ids per latent frame
PROMPT = "a red ball bounces"


def tiny_lm(seed: int = 0, cls: type[VideoLM] = VideoLM, **fields: object) -> VideoLM:
    """dim 64, 2 layers; 256 text + 64 video (2^6 LFQ codes) + 10 special ids.

    Weights have std 0.3 rather than 0.02 so the next-token distribution depends clearly on the
    context, and a changed prefix changes the sampled ids.
    """
    config = lm_preset(
        "tiny",
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        vocab__text_vocab_size=256,
        vocab__video_vocab_size=64,
        **fields,
    )
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture
def model_dir(tmp_path, make_small_tokenizer):
    """An LM export with tokenizer.json and a generation.json naming a sibling video tokenizer."""
    make_small_tokenizer().save_pretrained(tmp_path / "video_tokenizer")
    directory = tmp_path / "lm"
    tiny_lm().save_pretrained(directory)
    TextTokenizer.train(CAPTIONS, 256).save(directory)
    GenerationMetadata(
        video_tokenizer="../video_tokenizer",
        latent_grid=(4, 4),
        clip_latents=3,
        fps=FPS,
        frame_size=(32, 32),
    ).write(directory)
    return directory


@pytest.fixture
def pipe(model_dir) -> TextToVideo:
    return TextToVideo.from_pretrained(model_dir)


def config(**fields) -> GenerateConfig:
    return GenerateConfig(progress=False, **fields)


def count_forwards(model: VideoLM) -> list[tuple[int, int]]:
    """(tokens fed, first position) of every forward call, recorded as they happen."""
    calls: list[tuple[int, int]] = []

    def record(module, args, kwargs, out) -> None:
        calls.append((args[0].shape[1], int(kwargs["input_pos"][0])))

    model.register_forward_hook(record, with_kwargs=True)
    return calls


def test_same_seed_same_video_other_seed_other_video(pipe):
    a = pipe(PROMPT, config(seconds=9 / FPS, seed=0))
    b = pipe(PROMPT, config(seconds=9 / FPS, seed=0))
    c = pipe(PROMPT, config(seconds=9 / FPS, seed=1))
    assert a.shape == (9, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_frames_stream_as_soon_as_their_latent_frame_is_sampled(pipe):
    calls = count_forwards(pipe.lm)
    chunks = pipe.stream(PROMPT, config(seconds=25 / FPS))
    first = next(chunks)
    # One frame out after one prefill and the 15 decode steps of the first latent frame.
    assert first.shape == (1, 32, 32, 3)
    assert len(calls) == HW
    sizes = [len(first)] + [len(c) for c in chunks]
    assert sizes == [1] + [4] * 6  # 1 + 4(t − 1) frames from t = 7 latent frames


def test_first_window_is_what_generate_video_tokens_samples(pipe):
    cond = pipe.vocab.layout(pipe.text_tokenizer.encode(PROMPT), None).token_ids
    for scale in (1.0, 3.0):
        generator = torch.Generator().manual_seed(7)
        kwargs = {"vocab": pipe.vocab, "guidance_scale": scale, "top_k": 20, "top_p": 0.95}
        frames = sample_latent_frames(pipe.lm, cond, 3, HW, generator=generator, **kwargs)
        reference = generate_video_tokens(pipe.lm, cond[None], 3 * HW, seed=7, **kwargs)[0]
        assert torch.equal(torch.cat(list(frames)), reference)


def test_the_model_says_whether_windows_reencode_and_the_config_overrides_it(
    model_dir, monkeypatch
):
    path = model_dir / "generation.json"
    meta = json.loads(path.read_text())
    del meta["reencode"]
    path.write_text(json.dumps(meta))
    assert TextToVideo.from_pretrained(model_dir).reencode is True  # absent: Loong's way
    path.write_text(json.dumps(meta | {"reencode": "no"}))
    with pytest.raises(ValueError, match=r"generation\.json: reencode must be true or false"):
        TextToVideo.from_pretrained(model_dir)
    path.write_text(json.dumps(meta | {"reencode": False}))
    pipe = TextToVideo.from_pretrained(model_dir)
    assert pipe.reencode is False
    encoded = []
    original_encode = pipe.video_tokenizer.encode
    monkeypatch.setattr(
        pipe.video_tokenizer, "encode", lambda v: encoded.append(v) or original_encode(v)
    )
    cfg = config(seconds=25 / FPS, window_latents=2, new_latents_per_window=1)
    assert cfg.reencode is None
    by_default = pipe(PROMPT, cfg)
    assert not encoded
    assert np.array_equal(by_default, pipe(PROMPT, dataclasses.replace(cfg, reencode=False)))
    pipe(PROMPT, dataclasses.replace(cfg, reencode=True))
    assert len(encoded) == 4  # one fresh clip per window after the first


class TextLovingLM(VideoLM):
    """Logits that favour text and special ids by a wide margin."""

    def forward(self, token_ids, **kwargs):
        logits = super().forward(token_ids, **kwargs)
        lo, hi = self.config.vocab.text_vocab_size, self.config.vocab_size - 10
        bias = torch.full((logits.shape[-1],), 50.0)
        bias[lo:hi] = 0.0
        return logits + bias


def test_only_video_ids_are_sampled(pipe):
    lm = tiny_lm(cls=TextLovingLM)
    cond = pipe.vocab.layout(pipe.text_tokenizer.encode(PROMPT), None).token_ids
    for scale in (1.0, 4.0):
        generator = torch.Generator().manual_seed(0)
        frames = sample_latent_frames(
            lm, cond, 3, HW, vocab=pipe.vocab, generator=generator, guidance_scale=scale
        )
        assert all(pipe.vocab.is_video(ids).all() for ids in frames)
    text_loving = TextToVideo(
        lm=lm,
        text_tokenizer=pipe.text_tokenizer,
        video_tokenizer=pipe.video_tokenizer,
        grid=pipe.grid,
        trained_latents=3,
        fps=FPS,
    )
    # Decoding checks every index lies in the tokenizer's range, through a window slide too.
    assert text_loving(PROMPT, config(seconds=17 / FPS)).shape == (17, 32, 32, 3)


def spy_on_windows(monkeypatch) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Record each window's prompt ids and the latent frames it sampled."""
    windows = []
    original = generate_module.sample_latent_frames

    def spy(model, prompt_ids, *args, **kwargs):
        sampled: list[torch.Tensor] = []
        windows.append((prompt_ids, sampled))
        for ids in original(model, prompt_ids, *args, **kwargs):
            sampled.append(ids)
            yield ids

    monkeypatch.setattr(generate_module, "sample_latent_frames", spy)
    return windows


def test_long_video_slides_the_window_with_and_without_reencoding(pipe, monkeypatch):
    cfg = config(seconds=25 / FPS, window_latents=2, new_latents_per_window=1)
    plan = pipe.plan(cfg)
    assert (plan.n_frames, plan.n_latents, plan.first_window, plan.n_windows) == (25, 7, 3, 5)
    windows = spy_on_windows(monkeypatch)
    encoded = []
    original_encode = pipe.video_tokenizer.encode

    def encode(video):
        encoded.append((video, original_encode(video)))
        return encoded[-1][1]

    monkeypatch.setattr(pipe.video_tokenizer, "encode", encode)
    cond = pipe.vocab.layout(pipe.text_tokenizer.encode(PROMPT), None).token_ids

    plain = pipe(PROMPT, dataclasses.replace(cfg, reencode=False))
    assert len(windows) == 5 and not encoded
    generated = torch.cat([ids for _, sampled in windows for ids in sampled])
    assert len(generated) == 7 * HW
    for k, (prompt_ids, _) in enumerate(windows[1:], start=1):
        # The prefix is the ids of the last 2 latent frames sampled before window k.
        end = (3 + k - 1) * HW
        assert torch.equal(prompt_ids, torch.cat([cond, generated[end - 2 * HW : end]]))

    windows.clear()
    reencoded = pipe(PROMPT, cfg)
    assert len(windows) == 5 and len(encoded) == 4
    pairs = zip(windows[1:], encoded, strict=True)
    for k, ((prompt_ids, _), (clip, indices)) in enumerate(pairs, start=1):
        # A fresh clip of the last 1 + 4(2 − 1) = 5 decoded frames, encoded to 2 latent frames.
        end = 1 + 4 * (3 + k - 2)  # frames decoded before window k
        assert clip.shape == (1, 3, 5, 32, 32) and indices.shape == (1, 2, 4, 4)
        assert np.array_equal(tensor_to_frames(clip[0]), reencoded[end - 5 : end])
        assert torch.equal(
            prompt_ids, torch.cat([cond, pipe.vocab.video_to_ids(indices)[0].flatten()])
        )

    assert plain.shape == reencoded.shape == (25, 32, 32, 3)
    # The output is one continuous decode of the generated latent frames (the re-encoded
    # prefixes are LM context only): it matches decoding them all at once.
    generated = torch.cat([ids for _, sampled in windows for ids in sampled])
    at_once = pipe.video_tokenizer.decode(pipe.vocab.ids_to_video(generated, (4, 4))[None])
    diff = np.abs(tensor_to_frames(at_once[0]).astype(int) - reencoded.astype(int))
    assert diff.max() <= 1
    # The first window (3 latent frames → 9 frames) is the same; after the slide they part.
    assert np.array_equal(plain[:9], reencoded[:9])
    assert not np.array_equal(plain[9:], reencoded[9:])


@pytest.mark.parametrize("context", [0, 4], ids=["cell-embeddings", "video-context"])
def test_cell_embeddings_count_cells_from_each_windows_prefix(pipe, monkeypatch, context):
    """A model with video_grid samples, in every window, what full forwards of that window's
    prompt give greedily: the cached cell count (and the video context's start) restarts with
    each window's prefill."""
    pipe.lm = tiny_lm(video_grid=(4, 4), video_context_dim=context)
    windows = spy_on_windows(monkeypatch)
    pipe(
        PROMPT,
        config(seconds=25 / FPS, window_latents=2, new_latents_per_window=1, temperature=0.0),
    )
    lo, hi = pipe.vocab.video_id_range
    assert len(windows) == 5
    for prompt_ids, sampled in windows:
        ids = prompt_ids
        with torch.no_grad():
            for _ in range(len(sampled) * HW):
                logits = pipe.lm(ids[None])[0, -1, lo:hi]
                ids = torch.cat([ids, lo + logits.argmax()[None]])
        assert torch.equal(ids[len(prompt_ids) :], torch.cat(sampled))


def test_guidance_through_a_window_slide_is_seeded_and_changes_the_video(pipe):
    cfg = config(seconds=17 / FPS, guidance_scale=3.0, top_k=16)
    guided = pipe(PROMPT, cfg)
    assert np.array_equal(guided, pipe(PROMPT, cfg))
    assert not np.array_equal(guided, pipe(PROMPT, dataclasses.replace(cfg, guidance_scale=1.0)))


def test_default_windows_fill_the_trained_length(pipe):
    calls = count_forwards(pipe.lm)
    video = pipe(PROMPT, config(seconds=25 / FPS))
    plan = pipe.plan(config(seconds=25 / FPS))
    assert (plan.window_latents, plan.new_latents) == (2, 1)  # 3 // 2 new, the rest context
    assert len(video) == 25
    prefills = [n for n, start in calls if start == 0]
    assert len(prefills) == plan.n_windows == 5
    n_text = len(pipe.text_tokenizer.encode(PROMPT))
    assert prefills == [n_text + 2] + [n_text + 2 + 2 * HW] * 4


def test_length_is_exact_and_other_rates_repeat_or_drop_frames(pipe):
    nine = pipe(PROMPT, config(seconds=9 / FPS))
    eight = pipe(PROMPT, config(seconds=1.0))  # 3 latent frames decode to 9; the last drops
    assert np.array_equal(eight, nine[:8])
    double = pipe(PROMPT, config(seconds=9 / FPS, fps=2 * FPS))
    assert np.array_equal(double, np.repeat(nine, 2, axis=0))
    assert source_frame_index(5, 8.0, 4.0).tolist() == [0, 2, 4, 6, 8]
    assert source_frame_index(4, 8.0, 8.0).tolist() == [0, 1, 2, 3]


def test_generate_video_writes_mp4_and_gif(model_dir, tmp_path):
    out = generate_video(
        PROMPT,
        model_dir=model_dir,
        out=tmp_path / "video.mp4",
        seconds=17 / FPS,
        seed=3,
        gif=True,
        config=config(),
    )
    frames, fps = read_video(out)
    assert frames.shape == (17, 32, 32, 3) and fps == pytest.approx(FPS)
    gif_frames, gif_fps = read_video(out.with_suffix(".gif"))
    assert len(gif_frames) == 17 and gif_fps == pytest.approx(FPS, rel=0.1)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_rejected(pipe, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        next(pipe.stream(prompt, config()))


def test_over_long_prompt_names_the_limit(pipe):
    fits = 128 - 2 - 3 * HW
    with pytest.raises(ValueError, match=f"limit of {fits}: shorten it"):
        pipe("x" * (fits + 1), config())
    with pytest.raises(ValueError, match="limit of 3"):
        pipe(PROMPT, config(max_prompt_tokens=3))
    with pytest.raises(ValueError, match="does not fit"):
        pipe(PROMPT, config(max_prompt_tokens=fits + 1))


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan"), 1e9])
def test_bad_seconds_are_rejected(seconds):
    with pytest.raises(ValueError, match="seconds must lie in"):
        GenerateConfig(seconds=seconds)


def test_seconds_shorter_than_a_frame_and_windows_longer_than_training_are_rejected(pipe):
    with pytest.raises(ValueError, match="is no frame"):
        pipe(PROMPT, config(seconds=0.01))
    with pytest.raises(ValueError, match="at most the trained length of 3"):
        pipe(PROMPT, config(seconds=25 / FPS, window_latents=2, new_latents_per_window=2))


def test_missing_or_incomplete_model_directories_are_reported(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextToVideo.from_pretrained(tmp_path / "nowhere")
    meta_path = model_dir / GENERATION_FILE
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "clip_length": 3}))
    with pytest.raises(ValueError, match="unknown config key"):
        TextToVideo.from_pretrained(model_dir)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "clip_latents"}))
    with pytest.raises(ValueError, match="lacks \\['clip_latents'\\]"):
        TextToVideo.from_pretrained(model_dir)
    meta_path.write_text(json.dumps({**meta, "video_tokenizer": "../elsewhere"}))
    with pytest.raises(FileNotFoundError, match="pass video_tokenizer_dir"):
        TextToVideo.from_pretrained(model_dir)
    meta_path.write_text(json.dumps({**meta, "frame_size": [64, 64]}))
    with pytest.raises(ValueError, match="does not match"):
        TextToVideo.from_pretrained(model_dir)
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match=GENERATION_FILE):
        TextToVideo.from_pretrained(model_dir)


def test_speculative_decoding_gives_the_greedy_video_and_needs_fewer_forwards(pipe):
    cfg = config(seconds=25 / FPS, window_latents=2, new_latents_per_window=1, temperature=0.0)
    calls = count_forwards(pipe.lm)
    plain = pipe(PROMPT, dataclasses.replace(cfg, speculate=0))
    n_plain = len(calls)
    calls.clear()
    fast = pipe(PROMPT, dataclasses.replace(cfg, speculate=8))
    assert np.array_equal(plain, fast)
    assert len(calls) < n_plain
    assert any(n > 1 for n, start in calls if start > 0)  # drafts were fed
    with pytest.raises(ValueError, match="speculate"):
        config(speculate=-1)
