"""The language model: a LLaMA-style decoder over text ids followed by video ids (Loong)."""

from loong.lm.kv_cache import KVCache
from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.presets import lm_preset
from loong.lm.sampling import generate_video_tokens, sample
from loong.lm.vocab import Batch, Layout, VocabConfig, Vocabulary

__all__ = [
    "Batch",
    "KVCache",
    "Layout",
    "VideoLM",
    "VideoLMConfig",
    "VocabConfig",
    "Vocabulary",
    "generate_video_tokens",
    "lm_preset",
    "sample",
]
