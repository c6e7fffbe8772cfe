"""Conversion to and from transformers' ``LlamaForCausalLM`` (reference model and export).

Both models rotate the two halves of each head (``rotate_half``), so the query and key weights
need no permutation: conversion renames state-dict keys and maps config fields. transformers is
a dev/optional dependency, imported inside the functions.

The joint vocabulary's split (text / video / special) has no place in a LLaMA config; it travels
as the extra config attribute ``loong_vocab``, and :func:`from_hf_llama` takes ``vocab`` for a
model exported elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from loong.lm.int8 import has_int8_weights
from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.vocab import VocabConfig, Vocabulary

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# Ours → transformers', per block (``{}`` is the layer number).
_BLOCK_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _key_map(n_layers: int, tied: bool) -> dict[str, str]:
    """Our state-dict key → transformers' key."""
    keys = {k: v for k, v in _TOP_KEYS.items() if not (tied and k == "output.weight")}
    for i in range(n_layers):
        for ours, theirs in _BLOCK_KEYS.items():
            keys[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return keys


def to_hf_llama(model: VideoLM) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` (float32, eval mode) with ``model``'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if has_int8_weights(model):
        raise ValueError(
            "this model holds int8 weights (loong.lm.int8.int8_weights), which are for sampling: "
            "convert the float model"
        )
    model = model.folded()  # video_code_bits' terms, if any, into the plain tables
    cfg = model.config
    if cfg.video_grid is not None:
        raise ValueError(
            f"this model has video_grid={cfg.video_grid}: its cell embeddings (and video "
            f"context, if any) have no place in LlamaForCausalLM; only models trained with "
            f"video_grid=None convert"
        )
    vocab = Vocabulary(cfg.vocab)
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        pad_token_id=vocab.pad,
        loong_vocab=dataclasses.asdict(cfg.vocab),
    )
    hf_model = LlamaForCausalLM(hf_config)
    ours = model.state_dict()
    state = {
        theirs: ours[k].detach().float()
        for k, theirs in _key_map(cfg.n_layers, cfg.tie_embeddings).items()
    }
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # A tied LlamaForCausalLM may list lm_head.weight as missing: it is the embedding.
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def from_hf_llama(hf_model: LlamaForCausalLM, *, vocab: VocabConfig | None = None) -> VideoLM:
    """A :class:`VideoLM` (float32, eval mode) with a ``LlamaForCausalLM``'s weights.

    ``vocab`` splits the id space; by default it is read from the config's ``loong_vocab``
    (written by :func:`to_hf_llama`). Its size must equal the config's ``vocab_size``.
    """
    hf = hf_model.config
    if vocab is None:
        stored = getattr(hf, "loong_vocab", None)
        if stored is None:
            raise ValueError(
                "the LLaMA config has no loong_vocab: pass vocab=VocabConfig(text_vocab_size=..., "
                "video_vocab_size=..., n_special=...) to say how its ids split"
            )
        vocab = VocabConfig(**stored)
    if vocab.vocab_size != hf.vocab_size:
        raise ValueError(
            f"vocab describes {vocab.vocab_size} ids but the LLaMA model has "
            f"vocab_size={hf.vocab_size}"
        )
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("VideoLM has no biases: attention_bias and mlp_bias must be False")
    if hf.hidden_act != "silu":
        raise ValueError(f"VideoLM uses SwiGLU (silu), got hidden_act={hf.hidden_act!r}")
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE converts, got rope_type={rope['rope_type']!r}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ValueError(
            f"head_dim={head_dim} × {hf.num_attention_heads} heads != hidden_size="
            f"{hf.hidden_size}: VideoLM derives head width as dim / n_heads"
        )
    config = VideoLMConfig(
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        ffn_dim=hf.intermediate_size,
        norm_eps=hf.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=hf.initializer_range,
        vocab=vocab,
    )
    theirs = hf_model.state_dict()
    state = {
        ours: theirs[k].detach().float().clone()  # a copy: the two models stay independent
        for ours, k in _key_map(config.n_layers, config.tie_embeddings).items()
    }
    with torch.device("meta"):
        model = VideoLM(config)
    model.load_state_dict(state, assign=True)
    return model.eval()
