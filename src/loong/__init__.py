"""loong: text-to-video with an autoregressive language model over causal 3D video tokens."""
