"""Text → video: prompt → ids → sampled video ids → frames, streamed; long videos by sliding window.

The pipeline (:class:`TextToVideo`) samples one latent frame at a time (h·w video ids with the KV
cache), decodes it at once with a :class:`~loong.video_tokenizer.model.StreamingDecoder` and
yields its frames, so a writer can start before the last token is sampled. Videos longer than the
trained clip slide a window over latent frames (Loong, Wang et al. 2024, sec. "Inference"): the
next window's context is the text prompt plus the last ``window_latents`` latent frames.

**Video-token re-encoding** (Loong). After many steps the generated tokens drift from what the
tokenizer would give for the same frames, and a window prefix taken from the middle of a video
starts with a 4-frame latent where every training clip starts with a 1-frame one. With
``reencode=True`` the prefix is made the way training clips are: the last ``1 + 4(n − 1)`` decoded
frames (``n = window_latents``) are encoded again as a fresh clip, so its first latent is the
single frame just before the last ``n − 1`` latent groups, encoded alone, and the other ``n − 1``
latents cover exactly the frames of the last ``n − 1`` generated latents. The group boundaries of
the fresh clip therefore line up with those of the generated stream, and the next latent frame
sampled after the prefix covers the next 4 frames of the output. The cost: the first latent of
the prefix sees 1 frame, not 4, of the oldest generated latent (3 frames of context dropped). The
decoded frames are re-encoded as floats, before rounding to uint8. The prefix is LM context only:
the streaming decoder keeps decoding the *generated* latent frames, so the output is one
continuous decode. With ``reencode=False`` the generated ids of the last ``n`` latents are the
prefix as they are. Which is better depends on the model: ``GenerateConfig.reencode=None`` (the
default) takes the model's own ``reencode`` from ``generation.json`` (on when absent); the bundled
shapes model keeps its objects better over a minute without it (BENCHMARKS.md).

**generation.json** (written by the training side next to the LM export; see
:class:`GenerationMetadata`, whose :meth:`~GenerationMetadata.write` produces it)::

    model_dir/
      config.json, model.safetensors    VideoLM.save_pretrained
      tokenizer.json                     TextTokenizer.save
      generation.json                    {
        "video_tokenizer": "../tokenizer/export",  required: the paired VideoTokenizer export,
                                                    relative to model_dir or absolute
        "latent_grid": [16, 16],                    required: tokens per latent frame (h, w)
        "clip_latents": 17,                         required: trained clip length, latent frames
        "fps": 6.5,                                 optional: frame rate of the training clips
        "frame_size": [128, 128],                   optional: (H, W) of the training clips;
                                                    checked against latent_grid × compression
        "reencode": true                            optional: the model's default for
      }                                              GenerateConfig.reencode (absent: true)

Unknown keys are errors. Length: a video of ``seconds`` at ``fps`` has exactly
``round(seconds · fps)`` frames; the model samples at its trained rate ``1 + 4(t − 1)`` frames
for the smallest ``t`` latent frames that cover them, and the unused frames of the last latent
(at most 3) are dropped. An output ``fps`` other than the trained one picks, for every output
frame, the generated frame nearest in time (frames repeat or drop; the model has no frame-rate
token yet).

Axes: B batch, C channels, T frames, H W pixels, t h w latent grid, L sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from loong.config import config_from_dict, config_to_dict
from loong.data.video import VideoWriter, tensor_to_frames
from loong.lm.int8 import int8_weights
from loong.lm.model import VideoLM
from loong.lm.sampling import decode_video_ids, left_pad, prefill
from loong.lm.vocab import Vocabulary
from loong.pretrained import atomic_write_text
from loong.text_tokenizer import TextTokenizer
from loong.video_tokenizer.model import StreamingDecoder, VideoTokenizer

GENERATION_FILE = "generation.json"
MAX_SECONDS = 3600.0
BUNDLED_MODEL = "models/shapes/lm"
"""The model ``loong generate`` uses by default, inside the package (``loong recipe shapes``)."""


def resolve_lm_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """ "auto" → float32 on CPU, bfloat16 elsewhere; names like "float16" → the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if dtype == "int8":  # int8 weights; the activations' dtype
        return torch.bfloat16
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"lm_dtype must be auto, float32, float16, bfloat16 or int8, got {dtype!r}"
        )
    return getattr(torch, dtype)


def load_lm(model_dir: Path, device: str | torch.device, lm_dtype: str | torch.dtype) -> VideoLM:
    """The LM export in ``model_dir`` for sampling in ``lm_dtype`` (see :func:`resolve_lm_dtype`;
    "int8": the blocks' weights and an untied head in int8, activations in bfloat16; see
    :mod:`loong.lm.int8`)."""
    lm = VideoLM.from_pretrained(model_dir, device)
    if lm_dtype == "int8":
        if torch.device(device).type != "cpu":
            warnings.warn(
                f"lm_dtype='int8' on {device}: torch has its int8 matmul kernel for CPUs only, "
                f"so each product dequantizes the weights first (slower than bfloat16 there); "
                f"pass lm_dtype='bfloat16' on an accelerator",
                stacklevel=2,
            )
        return int8_weights(lm, resolve_lm_dtype(lm_dtype, device))
    return lm.to(resolve_lm_dtype(lm_dtype, device))


def default_model_dir() -> Path:
    """The bundled shapes-world model's LM directory; a clear error when it is not installed."""
    path = Path(str(importlib.resources.files("loong").joinpath(BUNDLED_MODEL)))
    if not (path / GENERATION_FILE).is_file():
        raise FileNotFoundError(
            f"this install of loong has no bundled model ({path} is missing): pass "
            f"--model DIR (an LM export), or make one with `loong recipe shapes --install`"
        )
    return path


@dataclass(kw_only=True)
class GenerationMetadata:
    """What an LM export needs besides its weights to generate video: ``generation.json``."""

    video_tokenizer: str
    """The paired VideoTokenizer export directory, relative to the model directory or absolute."""
    latent_grid: tuple[int, int]
    """Tokens per latent frame ``(h, w)``, raster order."""
    clip_latents: int
    """Trained clip length in latent frames (17 for Loong's 65 frames)."""
    fps: float | None = None
    """Frame rate of the training clips; None leaves it to ``GenerateConfig.fps``."""
    frame_size: tuple[int, int] | None = None
    """``(H, W)`` of the training clips; None derives it from the grid and the tokenizer."""
    reencode: bool = True
    """Whether a sliding window re-encodes its context by default with this model
    (``GenerateConfig.reencode=None``): Loong's way is on; a model whose minutes measure better
    without it says so here."""

    def __post_init__(self) -> None:
        self.latent_grid = tuple(self.latent_grid)
        if len(self.latent_grid) != 2 or min(self.latent_grid) <= 0:
            raise ValueError(f"latent_grid must be [h, w] > 0, got {list(self.latent_grid)}")
        if self.clip_latents <= 0:
            raise ValueError(f"clip_latents must be positive, got {self.clip_latents}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be positive or absent, got {self.fps}")
        if self.frame_size is not None:
            self.frame_size = tuple(self.frame_size)
            if len(self.frame_size) != 2 or min(self.frame_size) <= 0:
                raise ValueError(f"frame_size must be [H, W] > 0, got {list(self.frame_size)}")

    @classmethod
    def read(cls, model_dir: str | Path) -> GenerationMetadata:
        path = Path(model_dir) / GENERATION_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no {GENERATION_FILE}: the LM export must say which video "
                f"tokenizer it pairs with, its latent grid and clip length (see loong.generate)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data] if isinstance(data, dict) else required
        if missing:
            raise ValueError(f"{path} lacks {missing}: it needs {required} (see loong.generate)")
        return config_from_dict(cls, data, where=f"{GENERATION_FILE}: ")

    def write(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / GENERATION_FILE
        atomic_write_text(path, json.dumps(config_to_dict(self), indent=2) + "\n")
        return path


@dataclass(kw_only=True)
class GenerateConfig:
    seconds: float = 4.0
    """Length of the video in seconds; it gets exactly round(seconds · fps) frames."""
    fps: float | None = None
    """Output frame rate; None: the trained rate. Other rates retime by nearest frame."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = None
    """Sample among the k most likely video ids; None: all."""
    top_p: float | None = None
    """Nucleus sampling mass in (0, 1]; None: off."""
    guidance_scale: float = 1.0
    """Classifier-free guidance; 1 is off. Needs a model trained with caption dropout."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same video."""
    new_latents_per_window: int | None = None
    """Latent frames sampled per window after the first; None: trained length − window_latents,
    or half the trained length when window_latents is None too."""
    window_latents: int | None = None
    """Latent frames of context a sliding window keeps; None: trained length − new latents."""
    reencode: bool | None = None
    """Re-encode the window's context frames as a fresh clip (Loong); False reuses the ids;
    None: the model's default (``generation.json`` ``reencode``, on when absent)."""
    speculate: int = 64
    """Most draft ids per decode step, copied from the latent frame before (speculative
    decoding: the same distribution as plain sampling, faster where frames repeat); 0 is off."""
    max_prompt_tokens: int | None = None
    """Most text tokens a prompt may have; None: what fits beside a trained clip."""
    progress: bool = True
    """Show a tqdm bar of frames (its rate is frames per second)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and 0 < self.seconds <= MAX_SECONDS):
            raise ValueError(
                f"seconds must lie in (0, {MAX_SECONDS:g}], got {self.seconds}: pass e.g. 4"
            )
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be positive, got {self.fps}: pass e.g. 8, or None")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}: pass e.g. 1.0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be >= 0 (1 is off), got {self.guidance_scale}")
        for name in ("new_latents_per_window", "window_latents", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.speculate < 0:
            raise ValueError(
                f"speculate must be >= 0 (0 is off), got {self.speculate}: pass e.g. 64"
            )


@dataclass(frozen=True)
class GenerationPlan:
    """How one request is produced: frames out, latent frames sampled, window sizes."""

    n_frames: int
    """Output frames, round(seconds · fps)."""
    fps: float
    """Output frame rate."""
    source_fps: float
    """The rate the model samples at (the trained rate)."""
    source_index: np.ndarray
    """(n_frames,) the generated frame shown at each output frame."""
    n_latents: int
    """Latent frames to sample."""
    first_window: int
    """Latent frames sampled in the first window (up to the trained length)."""
    window_latents: int
    """Latent frames of context each later window starts from."""
    new_latents: int
    """Latent frames sampled per later window."""

    @property
    def n_windows(self) -> int:
        extra = max(0, self.n_latents - self.first_window)
        return 1 + math.ceil(extra / self.new_latents)


# --- sampling steps (gpt-fast style) ---------------------------------------------------------


def source_frame_index(n_frames: int, source_fps: float, fps: float) -> np.ndarray:
    """For ``n_frames`` output frames at ``fps``, the frame at ``source_fps`` nearest in time.

    Ties go to the earlier frame; equal rates give ``0, 1, ..., n_frames − 1``. → ``(n_frames,)``.
    """
    times = np.arange(n_frames) * (source_fps / fps)
    return np.maximum(np.ceil(times - 0.5 - 1e-6), 0).astype(np.int64)


def latents_for_frames(n_frames: int, temporal_compression: int) -> int:
    """Fewest latent frames whose decode, ``1 + r(t − 1)`` frames, holds ``n_frames``."""
    return 1 + math.ceil((n_frames - 1) / temporal_compression)


@torch.no_grad()
def sample_latent_frames(
    model: VideoLM,
    prompt_ids: torch.Tensor,
    n_latents: int,
    tokens_per_latent: int,
    *,
    vocab: Vocabulary,
    generator: torch.Generator,
    uncond_ids: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    speculate: int = 0,
) -> Iterator[torch.Tensor]:
    """Prefill ``prompt_ids`` ``(L,)`` and yield ``n_latents`` latent frames of video ids, each
    ``(tokens_per_latent,)`` as soon as its last token is sampled.

    The same steps as :func:`~loong.lm.sampling.generate_video_tokens` (and, for one prompt and
    one seed, the same ids), as a generator: frames can be decoded while sampling goes on, and one
    ``generator`` carries across the windows of a long video. With ``guidance_scale != 1`` the
    unconditional row (``uncond_ids``, default ``[BOS] [BOV]``) is left-padded beside the prompt.
    ``speculate`` drafts per step come from the latent frame before (frame-copy speculative
    decoding, :func:`~loong.lm.sampling.decode_video_ids`): the same distribution, faster.
    """
    guided = guidance_scale != 1.0
    device = prompt_ids.device
    # 1. rows: the prompt, and the unconditional prompt when guided
    rows = [prompt_ids.long()]
    if guided:
        if uncond_ids is None:
            uncond_ids = vocab.layout([], None).token_ids
        rows.append(uncond_ids.long().to(device))
    ids = left_pad(rows, vocab.pad)  # (R, L)
    length = ids.shape[1]
    n_tokens = n_latents * tokens_per_latent
    cfg = model.config
    if length + n_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({length}) + {n_latents} latent frames ({n_tokens} ids) exceed "
            f"max_seq_len={cfg.max_seq_len}: use fewer latent frames per window"
        )
    # 2. prefill
    cache, logits = prefill(model, ids, n_tokens, vocab=vocab)  # logits (R, V_video)
    # 3. decode, regrouped into latent frames
    chunks = decode_video_ids(
        model,
        cache,
        logits,
        ids[:1],
        n_tokens,
        id_range=vocab.video_id_range,
        guidance_scale=guidance_scale,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        speculate=speculate,
        draft_lag=tokens_per_latent,
    )
    pending = prompt_ids.new_empty(0)
    for chunk in chunks:  # (1, n)
        pending = torch.cat([pending, chunk[0]])
        while len(pending) >= tokens_per_latent:
            yield pending[:tokens_per_latent]
            pending = pending[tokens_per_latent:]


# --- the pipeline ----------------------------------------------------------------------------


class TextToVideo:
    """Prompt → uint8 frames ``(T, H, W, 3)``, streamed latent frame by latent frame.

    ``stream(prompt, config)`` yields chunks as their tokens are sampled (1 frame, then 4 per
    latent frame at the trained rate); ``pipe(prompt, config)`` returns the whole video.
    """

    def __init__(
        self,
        *,
        lm: VideoLM,
        text_tokenizer: TextTokenizer,
        video_tokenizer: VideoTokenizer,
        grid: tuple[int, int],
        trained_latents: int,
        fps: float | None = None,
        reencode: bool = True,
    ) -> None:
        vocab_cfg = lm.config.vocab
        if vocab_cfg.video_vocab_size != video_tokenizer.config.vocab_size:
            raise ValueError(
                f"the LM has {vocab_cfg.video_vocab_size} video ids but the video tokenizer "
                f"{video_tokenizer.config.vocab_size} codes: pair the LM with the tokenizer it "
                f"was trained on (generation.json 'video_tokenizer')"
            )
        if text_tokenizer.vocab_size > vocab_cfg.text_vocab_size:
            raise ValueError(
                f"the text tokenizer has {text_tokenizer.vocab_size} ids, more than the LM's "
                f"text_vocab_size={vocab_cfg.text_vocab_size}: use the LM's own tokenizer.json"
            )
        h, w = grid
        if h <= 0 or w <= 0 or trained_latents <= 0:
            raise ValueError(
                f"grid and trained_latents must be positive, got {grid}, {trained_latents}"
            )
        if 3 + trained_latents * h * w > lm.config.max_seq_len:
            raise ValueError(
                f"a trained clip of {trained_latents} latent frames of {h}×{w} ids does not fit "
                f"max_seq_len={lm.config.max_seq_len} with a prompt: check generation.json"
            )
        self.lm = lm.eval()
        self.text_tokenizer = text_tokenizer
        self.video_tokenizer = video_tokenizer.eval()
        self.vocab = Vocabulary(vocab_cfg)
        self.grid = (h, w)
        self.trained_latents = trained_latents
        self.fps = fps
        self.reencode = reencode
        """What ``GenerateConfig.reencode=None`` means for this model."""

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None = None,
        video_tokenizer_dir: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        lm_dtype: str | torch.dtype = "auto",
    ) -> TextToVideo:
        """Load an LM export with its ``generation.json`` and the video tokenizer it names
        (``video_tokenizer_dir`` overrides that path); None loads the bundled model.

        ``lm_dtype`` is the language model's weight and activation dtype while sampling; "auto"
        is float32 on CPU and bfloat16 on accelerators. float16 halves the bytes each decoded
        token reads (a 5.5M-parameter model's matmuls alone ran ~4× faster), but end to end a
        one-minute video took as long as in float32 on a 2-core CPU (see BENCHMARKS.md), so it
        is an option, not the CPU default. "int8" keeps the blocks' weights and an untied head in
        int8 (one scale a row) with bfloat16 activations: a quarter of the bytes of float32 a
        token, for CPUs that compute in bfloat16 natively (:mod:`loong.lm.int8`). Norms, RoPE
        tables and the sampling softmax run in float32 either way; the video tokenizer stays
        float32."""
        model_dir = default_model_dir() if model_dir is None else Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"model directory {model_dir} does not exist: pass the language model export "
                f"(config.json, model.safetensors, tokenizer.json, {GENERATION_FILE})"
            )
        meta = GenerationMetadata.read(model_dir)
        if video_tokenizer_dir is None:
            video_tokenizer_dir = model_dir / meta.video_tokenizer  # absolute paths stay
            if not video_tokenizer_dir.is_dir():
                raise FileNotFoundError(
                    f"{GENERATION_FILE} in {model_dir} names the video tokenizer "
                    f"{meta.video_tokenizer!r}, but {video_tokenizer_dir} is not a directory: "
                    f"fix the path or pass video_tokenizer_dir"
                )
        video_tokenizer = VideoTokenizer.from_pretrained(video_tokenizer_dir, device)
        s = video_tokenizer.config.spatial_compression
        expected = (meta.latent_grid[0] * s, meta.latent_grid[1] * s)
        if meta.frame_size is not None and meta.frame_size != expected:
            raise ValueError(
                f"{GENERATION_FILE}: frame_size {list(meta.frame_size)} does not match "
                f"latent_grid {list(meta.latent_grid)} × the tokenizer's {s}× compression "
                f"= {list(expected)}: is {video_tokenizer_dir} the paired tokenizer?"
            )
        return cls(
            lm=load_lm(model_dir, device, lm_dtype),
            text_tokenizer=TextTokenizer.load(model_dir),
            video_tokenizer=video_tokenizer,
            grid=meta.latent_grid,
            trained_latents=meta.clip_latents,
            fps=meta.fps,
            reencode=meta.reencode,
        )

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    # -- checks and planning

    def max_prompt_tokens(self) -> int:
        """Most text ids that fit in max_seq_len beside BOS, BOV and a whole trained clip."""
        h, w = self.grid
        return self.lm.config.max_seq_len - 2 - self.trained_latents * h * w

    def encode_prompt(self, prompt: str, config: GenerateConfig) -> list[int]:
        """The prompt's text ids (leading and trailing whitespace stripped), checked."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"prompt is empty ({prompt!r}): describe the video, e.g. 'a red ball bounces'"
            )
        fits = self.max_prompt_tokens()
        limit = fits if config.max_prompt_tokens is None else config.max_prompt_tokens
        if limit > fits:
            raise ValueError(
                f"max_prompt_tokens={limit} does not fit this model: at most {fits} text tokens "
                f"fit beside a {self.trained_latents}-latent clip in max_seq_len"
            )
        text_ids = self.text_tokenizer.encode(prompt.strip())
        if len(text_ids) > limit:
            raise ValueError(
                f"prompt is {len(text_ids)} tokens, more than the limit of {limit}: shorten it"
            )
        return text_ids

    def plan(self, config: GenerateConfig) -> GenerationPlan:
        """Frames, latent frames and window sizes for ``config``; errors name the fix."""
        source_fps = self.fps if self.fps is not None else config.fps
        if source_fps is None:
            raise ValueError(
                f"no frame rate: the model's {GENERATION_FILE} has no 'fps', so pass "
                f"GenerateConfig(fps=...) (the rate the model was trained at)"
            )
        fps = config.fps if config.fps is not None else source_fps
        n_frames = round(config.seconds * fps)
        if n_frames < 1:
            raise ValueError(
                f"seconds={config.seconds} at {fps:g} fps is no frame: pass at least {1 / fps:.3g}"
            )
        source_index = source_frame_index(n_frames, source_fps, fps)
        r = self.video_tokenizer.config.temporal_compression
        n_latents = latents_for_frames(int(source_index[-1]) + 1, r)

        trained = self.trained_latents
        new, window = config.new_latents_per_window, config.window_latents
        if new is None and window is None:
            new = max(1, trained // 2)
        if new is None:
            new = trained - window
        if window is None:
            window = trained - new
        if n_latents > trained and (window < 1 or new < 1 or window + new > trained):
            raise ValueError(
                f"window_latents ({window}) + new_latents_per_window ({new}) must be at most "
                f"the trained length of {trained} latent frames, each at least 1: lower them"
                + (" (a model trained on 1 latent frame makes only images)" if trained < 2 else "")
            )
        return GenerationPlan(
            n_frames=n_frames,
            fps=fps,
            source_fps=source_fps,
            source_index=source_index,
            n_latents=n_latents,
            first_window=min(trained, n_latents),
            window_latents=window,
            new_latents=new,
        )

    # -- generation

    def window_prefix(
        self, recent_ids: list[torch.Tensor], recent_video: torch.Tensor | None, n: int
    ) -> torch.Tensor:
        """The next window's video prefix ``(n·h·w,)`` from the last ``n`` latent frames.

        With ``recent_video`` (the last ``1 + 4(n − 1)`` decoded frames ``(1, C, T, H, W)``)
        those frames are encoded again as a fresh clip (re-encoding); else the ids are reused.
        """
        if recent_video is None:
            return torch.cat(recent_ids[-n:])
        indices = self.video_tokenizer.encode(recent_video)  # (1, n, h, w)
        assert indices.shape[1:] == (n, *self.grid), indices.shape
        return self.vocab.video_to_ids(indices).flatten()

    @torch.no_grad()
    def stream(self, prompt: str, config: GenerateConfig | None = None) -> Iterator[np.ndarray]:
        """Yield uint8 frame chunks ``(T, H, W, 3)`` as their tokens are sampled; in all
        exactly ``plan(config).n_frames`` frames."""
        config = GenerateConfig() if config is None else config
        device, (h, w) = self.device, self.grid
        r = self.video_tokenizer.config.temporal_compression

        # 1. check the prompt and the length; plan the windows
        text_ids = self.encode_prompt(prompt, config)
        plan = self.plan(config)
        reencode = self.reencode if config.reencode is None else config.reencode

        # 2. prompts: [BOS] text [BOV], and the empty caption [BOS] [BOV] for guidance
        cond = self.vocab.layout(text_ids, None).token_ids.to(device)  # (L,)
        uncond = self.vocab.layout([], None).token_ids.to(device)  # (2,)
        prefix = cond.new_empty(0)  # video ids of the window's context
        generator = torch.Generator(device=device).manual_seed(config.seed)
        decoder = StreamingDecoder(self.video_tokenizer)
        tail_frames = 1 + r * (plan.window_latents - 1)  # a fresh clip of window_latents
        recent_ids: list[torch.Tensor] = []
        recent_video: torch.Tensor | None = None
        n_sampled = n_decoded = n_out = 0

        bar = tqdm(total=plan.n_frames, unit="frame", disable=not config.progress)
        with contextlib.closing(bar):
            while n_sampled < plan.n_latents:
                # 3. sample the window latent frame by latent frame; decode and yield each
                size = plan.first_window if n_sampled == 0 else plan.new_latents
                latents = sample_latent_frames(
                    self.lm,
                    torch.cat([cond, prefix]),
                    min(size, plan.n_latents - n_sampled),
                    h * w,
                    vocab=self.vocab,
                    generator=generator,
                    uncond_ids=torch.cat([uncond, prefix]),
                    guidance_scale=config.guidance_scale,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=config.top_p,
                    speculate=config.speculate,
                )
                for ids in latents:
                    n_sampled += 1
                    recent_ids.append(ids)
                    del recent_ids[: -plan.window_latents]
                    indices = self.vocab.ids_to_video(ids, (h, w))[None]  # (1, 1, h, w)
                    video = decoder(indices)  # (1, C, 1 or 4, H, W)
                    if reencode and plan.n_latents > plan.first_window:
                        recent_video = (
                            video
                            if recent_video is None
                            else torch.cat([recent_video, video], dim=2)[:, :, -tail_frames:]
                        )
                    # 4. frames at the output rate; the last latent's spare frames are dropped
                    stop = int(np.searchsorted(plan.source_index, n_decoded + video.shape[2]))
                    frames = tensor_to_frames(video[0])[plan.source_index[n_out:stop] - n_decoded]
                    n_decoded, n_out = n_decoded + video.shape[2], stop
                    if len(frames):
                        bar.update(len(frames))
                        yield frames
                # 5. slide: the next window's context is the text and the last latent frames
                if n_sampled < plan.n_latents:
                    prefix = self.window_prefix(recent_ids, recent_video, plan.window_latents)
        assert n_out == plan.n_frames, (n_out, plan.n_frames)

    def __call__(self, prompt: str, config: GenerateConfig | None = None) -> np.ndarray:
        """The whole video, uint8 ``(T, H, W, 3)``."""
        return np.concatenate(list(self.stream(prompt, config)))


def generate_video(
    prompt: str,
    *,
    model_dir: str | Path | None = None,
    out: str | Path,
    seconds: float | None = None,
    seed: int | None = None,
    gif: bool = False,
    config: GenerateConfig | None = None,
    video_tokenizer_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    lm_dtype: str | torch.dtype = "auto",
) -> Path:
    """Generate a video for ``prompt`` into ``out`` (``.mp4`` or ``.gif``); returns ``out``.

    Frames are written as they are sampled; ``gif=True`` also writes ``out`` with suffix
    ``.gif``. ``seconds`` and ``seed`` override those of ``config``; ``model_dir`` None is the
    bundled shapes-world model. Files appear atomically: a failure leaves neither a
    half-written video nor an old one replaced.
    """
    config = GenerateConfig() if config is None else config
    if seconds is not None:
        config = dataclasses.replace(config, seconds=seconds)
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    out = Path(out)
    pipe = TextToVideo.from_pretrained(
        model_dir, video_tokenizer_dir, device=device, lm_dtype=lm_dtype
    )
    fps = pipe.plan(config).fps
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(VideoWriter(out, fps))]
        if gif and out.suffix.lower() != ".gif":
            writers.append(stack.enter_context(VideoWriter(out.with_suffix(".gif"), fps)))
        for frames in pipe.stream(prompt, config):
            for writer in writers:
                writer.write(frames)
    return out
