"""loong: text-to-video with an autoregressive language model over causal 3D video tokens."""

from loong.video_tokenizer.model import VideoTokenizer, VideoTokenizerConfig

__all__ = ["VideoTokenizer", "VideoTokenizerConfig"]
__version__ = "0.1.0"
