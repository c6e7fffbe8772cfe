"""Shared fixtures: very small seeded video tokenizers and inputs, milliseconds on a CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def _small_tokenizer_config(**overrides: object):
    """A tokenizer config with the paper's 8× spatial / 4× temporal compression and ~0.2M params.

    ``overrides`` are dotted keys (``"quantizer.kind": "cvq"``) applied with ``apply_overrides``.
    """
    from loong.config import apply_overrides
    from loong.video_tokenizer.model import VideoTokenizerConfig
    from loong.video_tokenizer.quantize import QuantizerConfig

    config = VideoTokenizerConfig(
        base_width=8,
        width_mults=(1, 1, 2, 2),
        temporal_downsample=(False, True, True),
        encoder_blocks=1,
        decoder_blocks=1,
        num_groups=4,
        quantizer=QuantizerConfig(kind="lfq", latent_dim=6, entropy_group_bits=6),
    )
    return apply_overrides(config, dict(overrides)) if overrides else config


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite runs on two shared cores; tiny models run fastest on one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_tokenizer_config() -> Callable[..., object]:
    """Factory: ``small_tokenizer_config(**dotted_overrides)`` → a tiny ``VideoTokenizerConfig``."""
    return _small_tokenizer_config


@pytest.fixture
def make_small_tokenizer() -> Callable[..., object]:
    """Factory: a seeded tiny ``VideoTokenizer`` in eval mode.

    The decoder's adaptive norms start as plain norms (zero-initialised scale and shift convs); the
    factory gives them small random weights so that tests also exercise the latent's path into
    every decoder norm (``stretch_latent``), which a freshly built model would hide.
    """
    from loong.video_tokenizer.model import Norm, VideoTokenizer

    def make(seed: int = 0, *, perturb_adaptive_norms: bool = True, **overrides: object):
        torch.manual_seed(seed)
        model = VideoTokenizer(_small_tokenizer_config(**overrides))
        if perturb_adaptive_norms:
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, Norm) and module.adaptive:
                        for conv in (module.scale, module.shift):
                            conv.weight.normal_(0.0, 0.2)
                            conv.bias.normal_(0.0, 0.1)
        return model.eval()

    return make


@pytest.fixture
def make_video() -> Callable[..., torch.Tensor]:
    """Factory: a seeded video ``(B, 3, T, H, W)`` in [−1, 1] (defaults: 1 × 17 × 32 × 32)."""

    def make(
        batch: int = 1, frames: int = 17, height: int = 32, width: int = 32, seed: int = 0
    ) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1

    return make


@pytest.fixture
def crash_after_checkpoint(monkeypatch) -> Callable[..., object]:
    """Factory: ``with crash_after_checkpoint(module, step): loop(...)`` runs a training loop
    that raises KeyboardInterrupt right after writing its step-``step`` checkpoint, as a killed
    run would (``module`` is the one whose ``save_checkpoint`` the loop calls:
    ``loong.train.runtime``); the real ``save_checkpoint`` is restored when the block ends."""
    import contextlib

    @contextlib.contextmanager
    def crash(module: object, step: int):
        real_save = module.save_checkpoint

        def save_then_crash(directory, state, *, step: int, keep: int):
            real_save(directory, state, step=step, keep=keep)
            if step == crash_step:
                raise KeyboardInterrupt(f"simulated crash after the step-{step} checkpoint")

        crash_step = step
        monkeypatch.setattr(module, "save_checkpoint", save_then_crash)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(module, "save_checkpoint", real_save)

    return crash


@pytest.fixture
def make_tar_shards() -> Callable[..., list]:
    """Factory: ``make_tar_shards(root, n_videos, samples_per_shard=2, n_frames=9, n_bad=0)``
    writes shapes-world clips of ``n_frames`` 64 × 64 frames as ``root/videos/clip_000.mp4``, ...
    with their caption and a paraphrase in ``.txt``, plus ``n_bad`` captioned files that are no
    video (``bad_0.mp4``, ...), and packs them with ``write_shards`` into ``root/shards``; returns
    the tar paths."""
    import numpy as np

    from loong.data.shapes import ShapesWorld, ShapesWorldConfig, paraphrase
    from loong.data.video import write_video
    from loong.data.webdataset import write_shards

    def make(root, n_videos: int, *, samples_per_shard: int = 2, n_frames: int = 9, n_bad=0):
        world = ShapesWorld(ShapesWorldConfig(n_frames=n_frames, seed=5))
        videos = root / "videos"
        videos.mkdir(parents=True)
        for i in range(n_videos):
            scene, _, text, frames = world.sample(i)
            write_video(videos / f"clip_{i:03d}.mp4", frames, fps=8)
            wording = paraphrase(scene, np.random.default_rng(i))
            (videos / f"clip_{i:03d}.txt").write_text(f"{text}\n{wording}\n")
        for i in range(n_bad):
            (videos / f"bad_{i}.mp4").write_bytes(b"\x00\x01 not a video" * 50)
            (videos / f"bad_{i}.txt").write_text("a caption of nothing\n")
        return write_shards(videos, root / "shards", samples_per_shard=samples_per_shard)

    return make
