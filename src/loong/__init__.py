"""loong: text-to-video with an autoregressive language model over causal 3D video tokens."""

from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.sampling import generate_video_tokens
from loong.lm.vocab import VocabConfig, Vocabulary
from loong.text_tokenizer import TextTokenizer
from loong.video_tokenizer.model import VideoTokenizer, VideoTokenizerConfig

__all__ = [
    "TextTokenizer",
    "VideoLM",
    "VideoLMConfig",
    "VideoTokenizer",
    "VideoTokenizerConfig",
    "VocabConfig",
    "Vocabulary",
    "generate_video_tokens",
]
__version__ = "0.1.0"
