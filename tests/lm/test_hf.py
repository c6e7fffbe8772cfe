"""Our LLaMA against transformers' LlamaForCausalLM with the same weights (both conversions)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loong.lm.hf import from_hf_llama, to_hf_llama
from loong.lm.vocab import VocabConfig

transformers = pytest.importorskip("transformers")
ATOL = 1e-5


def ids_for(config, batch: int = 2, length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize(
    "fields",
    [
        {"n_kv_heads": 2},
        {"n_kv_heads": 4, "tie_embeddings": True, "rope_theta": 500.0},
        {"n_kv_heads": 2, "video_code_bits": 6},  # converts folded
    ],
    ids=["gqa-untied", "mha-tied", "code-bits"],
)
def test_to_hf_llama_gives_the_same_logits(make_lm, fields):
    model = make_lm(**fields)
    hf = to_hf_llama(model)
    assert hf.config.num_key_value_heads == model.config.kv_heads
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    ids = ids_for(model.config)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=ATOL, rtol=0)
    back = from_hf_llama(hf)
    plain = dataclasses.replace(model.config, ffn_dim=model.config.hidden_dim, video_code_bits=0)
    assert back.config == plain
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_from_hf_llama_gives_the_same_logits(tied):
    torch.manual_seed(0)
    vocab = VocabConfig(text_vocab_size=40, video_vocab_size=64, n_special=10)
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab.vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        tie_word_embeddings=tied,
        initializer_range=0.3,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    model = from_hf_llama(hf, vocab=vocab)
    cfg = model.config
    assert (cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == (48, 6, 3, 96)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings) == (1e-6, 1000.0, tied)
    ids = ids_for(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_from_hf_llama_needs_the_vocabulary_split():
    hf_config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config)
    with pytest.raises(ValueError, match="pass vocab="):
        from_hf_llama(hf)
    with pytest.raises(ValueError, match="vocab_size=100"):
        from_hf_llama(hf, vocab=VocabConfig(text_vocab_size=40, video_vocab_size=64))


def test_a_model_with_cell_embeddings_does_not_convert(make_lm):
    with pytest.raises(ValueError, match="video_grid"):
        to_hf_llama(make_lm(video_grid=(2, 2)))
