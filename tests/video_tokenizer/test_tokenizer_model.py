"""The tokenizer as a whole: files, presets, configs and the index range the decoder accepts."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loong.config import apply_overrides, config_from_dict, config_to_dict, parse_set
from loong.video_tokenizer.model import (
    StreamCache,
    VideoTokenizer,
    VideoTokenizerConfig,
    levels_to_video,
    video_to_levels,
)
from loong.video_tokenizer.quantize import QuantizerConfig

# --- save_pretrained / from_pretrained -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [{}, {"quantizer.kind": "cvq", "quantizer.codebook_size": 32}]
)
def test_save_then_load_gives_identical_outputs(
    make_small_tokenizer, make_video, tmp_path, overrides
):
    model = make_small_tokenizer(**overrides)
    if overrides:  # give the CVQ usage buffer a non-default value that must survive the trip
        model.quantizer.usage.uniform_()
    video = make_video(frames=9)
    model.save_pretrained(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"config.json", "model.safetensors"}

    loaded = VideoTokenizer.from_pretrained(tmp_path / "tok")
    assert not loaded.training
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    idx = model.encode(video)
    assert torch.equal(loaded.encode(video), idx)
    assert torch.equal(loaded.decode(idx), model.decode(idx))


def test_from_pretrained_on_empty_directory_names_it(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    match = re.escape(str(empty)) + r".*config\.json and model\.safetensors"
    with pytest.raises(FileNotFoundError, match=match):
        VideoTokenizer.from_pretrained(empty)


def test_from_pretrained_rejects_another_kind_of_model(make_small_tokenizer, tmp_path):
    make_small_tokenizer().save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["kind"] = "language_model"
    (tmp_path / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="'language_model' model, not a 'video_tokenizer'"):
        VideoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_decode_rejects_out_of_range_indices(make_small_tokenizer, bad):
    model = make_small_tokenizer()  # LFQ with 6 bits: vocabulary 64
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    idx[0, 1, 1, 1] = bad
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(idx)
    model.decode(idx.clamp(0, 63))  # the same shape in range decodes


def test_cvq_tokenizer_round_trips_through_its_codebook(make_small_tokenizer, make_video):
    model = make_small_tokenizer(
        **{"quantizer.kind": "cvq", "quantizer.codebook_size": 32, "quantizer.latent_dim": 6}
    )
    idx = model.encode(make_video(frames=5))
    assert idx.shape == (1, 2, 4, 4)
    assert int(idx.min()) >= 0 and int(idx.max()) < 32
    # Decoding the indices re-creates the codes the encoder picked: encoding those codes again
    # through the quantizer gives the same indices.
    codes = model.indices_to_latents(idx)  # (B, D, t, h, w)
    _, q = model.quantize(codes)
    assert torch.equal(q.indices, idx)


def test_encode_is_pure_even_in_training_mode(make_small_tokenizer, make_video):
    model = make_small_tokenizer(**{"quantizer.kind": "cvq", "quantizer.codebook_size": 256})
    model.train()
    video = make_video(frames=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = model.encode(video)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
    assert torch.equal(model.encode(video), first)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"quantizer.kind": "cvq", "quantizer.codebook_size": 32, "quantizer.cvq_distance": "l2"},
        {"quantizer.kind": "cvq", "quantizer.codebook_size": 32},
        {"quantizer.kind": "fsq", "quantizer.latent_dim": 3, "quantizer.fsq_levels": [5, 5, 3]},
    ],
    ids=["lfq", "cvq-l2", "cvq-cosine", "fsq"],
)
def test_training_forward_backpropagates_to_encoder_and_decoder(
    make_small_tokenizer, make_video, overrides
):
    # forward in training mode gives a differentiable reconstruction and quantizer loss.
    model = make_small_tokenizer(**overrides).train()
    out = model(make_video(frames=5))
    loss = (out.recon - 0.0).abs().mean() + out.quantizer_loss
    loss.backward()
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    assert model.decoder.last_layer.grad.abs().sum() > 0
    assert {"perplexity", "usage"} <= set(out.stats)
    if model.config.quantizer.kind != "fsq":  # FSQ has no commitment loss
        assert "commitment" in out.stats


@pytest.mark.parametrize(
    "overrides",
    [{}, {"quantizer.kind": "cvq", "quantizer.codebook_size": 32}],
    ids=["lfq", "cvq-cosine"],
)
def test_the_quantizer_computes_in_fp32_under_bf16_autocast(make_small_tokenizer, overrides):
    # Under CPU autocast a matmul of fp32 inputs runs in bf16; the quantizer opts out, so its
    # codes, entropy and losses are the fp32 ones, and its output keeps the latent's dtype.
    torch.manual_seed(0)
    z = torch.randn(2, 6, 2, 4, 4)  # (B, D, t, h, w), small_tokenizer's latent_dim
    plain = make_small_tokenizer(**overrides).train()
    quantized, out = plain.quantize(z)
    mixed = make_small_tokenizer(**overrides).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized_bf16, out_bf16 = mixed.quantize(z)
        _, out_half_latent = mixed.quantize(z.bfloat16())
    assert torch.equal(out_bf16.indices, out.indices)
    torch.testing.assert_close(quantized_bf16, quantized)
    torch.testing.assert_close(out_bf16.loss, out.loss, rtol=1e-6, atol=1e-7)
    for key, value in out.stats.items():
        torch.testing.assert_close(out_bf16.stats[key], value, rtol=1e-6, atol=1e-7)
    assert out_half_latent.quantized.dtype == torch.float32  # the quantizer's own output
    assert mixed.quantize(z.bfloat16())[0].dtype == torch.bfloat16


def test_forward_without_quantizing_decodes_the_continuous_latent(make_small_tokenizer, make_video):
    model = make_small_tokenizer().train()
    video = make_video(frames=5)
    out = model(video, quantize=False)
    assert out.indices is None and out.stats == {} and out.quantizer_loss.item() == 0.0
    z = model.encode_latents(video)  # (B, D, t, h, w), not on the ±1 codes
    assert not torch.equal(z.abs(), torch.ones_like(z))
    torch.testing.assert_close(out.recon, model.decoder(z, StreamCache()))
    assert not torch.allclose(out.recon, model(video).recon)
    out.recon.abs().mean().backward()
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0


# --- presets ---------------------------------------------------------------------------------


def test_tiny_preset_runs():
    torch.manual_seed(0)
    model = VideoTokenizer.from_preset("tiny").eval()
    assert model.config.vocab_size == 2**12
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        out = model(video)
    assert out.indices.shape == (1, 3, 8, 8)
    assert out.recon.shape == video.shape
    assert int(out.indices.max()) < 2**12


def test_preset_overrides_and_unknown_names():
    model_cfg = VideoTokenizer.from_preset(
        "tiny", **{"quantizer.kind": "cvq"}, quantizer__codebook_size=128
    ).config
    assert model_cfg.quantizer.kind == "cvq" and model_cfg.vocab_size == 128
    with pytest.raises(ValueError, match=r"unknown tokenizer preset 'huge'.*loong-246m.*tiny"):
        VideoTokenizer.from_preset("huge")


def test_loong_246m_on_the_meta_device():
    with torch.device("meta"):
        model = VideoTokenizer.from_preset("loong-246m")
        n = model.num_parameters()
        assert abs(n - 246e6) / 246e6 < 0.10, f"{n / 1e6:.1f}M parameters"
        cfg = model.config
        assert (cfg.spatial_compression, cfg.temporal_compression) == (8, 4)
        assert cfg.vocab_size == 8192 and cfg.quantizer.kind == "cvq"
        video = torch.empty(1, 3, 65, 128, 128)
        z = model.encoder(video, StreamCache())
        assert z.shape == (1, cfg.quantizer.latent_dim, 17, 16, 16)
        assert model.decoder(z, StreamCache()).shape == (1, 3, 65, 128, 128)


# --- configs ---------------------------------------------------------------------------------


def test_apply_overrides_rejects_unknown_keys_listing_valid_ones(small_tokenizer_config):
    cfg = small_tokenizer_config()
    with pytest.raises(ValueError, match=r"unknown config key 'quantizer.nope'.*latent_dim"):
        apply_overrides(cfg, {"quantizer.nope": 1})
    with pytest.raises(ValueError, match=r"unknown config key 'nope'.*base_width"):
        apply_overrides(cfg, {"nope": 1})
    with pytest.raises(ValueError, match="'base_width' is not a config section"):
        apply_overrides(cfg, {"base_width.x": 1})
    # Overrides are validated by the dataclasses: widths 8 and 16 are not divisible by 3 groups.
    with pytest.raises(ValueError, match="num_groups=3"):
        apply_overrides(cfg, {"num_groups": 3})
    new = apply_overrides(cfg, {"quantizer.latent_dim": 10, "width_mults": [1, 2, 2, 4]})
    assert new.quantizer.latent_dim == 10 and new.width_mults == (1, 2, 2, 4)
    assert cfg.quantizer.latent_dim == 6  # the original is untouched


def test_parse_set_parses_toml_values():
    parsed = parse_set(["a.b=1e-3", "x=true", "s=hello", "n=3", "l=[1, 2]", 'q="quoted"'])
    assert parsed == {"a.b": 1e-3, "x": True, "s": "hello", "n": 3, "l": [1, 2], "q": "quoted"}
    assert isinstance(parsed["a.b"], float) and isinstance(parsed["n"], int)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set(["no-equals-sign"])


def test_config_dict_round_trip():
    cfg = VideoTokenizerConfig(
        base_width=16,
        width_mults=(1, 2, 4),
        temporal_downsample=(True, False),
        num_groups=8,
        quantizer=QuantizerConfig(kind="cvq", latent_dim=16, codebook_size=512, cvq_distance="l2"),
    )
    data = config_to_dict(cfg)
    assert data["width_mults"] == [1, 2, 4] and isinstance(data["quantizer"], dict)
    back = config_from_dict(VideoTokenizerConfig, json.loads(json.dumps(data)))
    assert back == cfg
    assert isinstance(back.quantizer, QuantizerConfig)
    assert isinstance(back.width_mults, tuple) and isinstance(back.temporal_downsample, tuple)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['quantizer.bogus'\]"):
        config_from_dict(VideoTokenizerConfig, {**data, "quantizer": {"bogus": 1}})


def test_tokenizer_config_validation():
    with pytest.raises(ValueError, match="one entry per downsampling step"):
        VideoTokenizerConfig(width_mults=(1, 2, 2, 4), temporal_downsample=(True,))
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        VideoTokenizerConfig(base_width=12, num_groups=8)


# --- a decoder that outputs levels ----------------------------------------------------------


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """Per-pixel level probabilities → logits ``(1, 1, n, 1, 1, P)`` for P pixels in a row."""
    p = torch.tensor(probs).clamp_min(1e-12)  # (P, n)
    return p.log().T.reshape(1, 1, -1, 1, 1, p.shape[0])


def test_levels_decode_to_the_likeliest_level_refined_by_its_neighbours():
    # 5 levels: -1, -0.5, 0, 0.5, 1
    probs = [
        [0, 0, 1, 0, 0],  # sure: exactly 0
        [0, 0, 0.5, 0.5, 0],  # torn between neighbours: halfway, 0.25
        [0.45, 0, 0, 0, 0.55],  # torn between far levels: the likelier one, not the mean 0.1
        [0.6, 0.4, 0, 0, 0],  # the lowest level and its neighbour (no level below it)
        [0.1, 0, 0, 0.2, 0.7],  # the highest level and its neighbour (no level above it)
    ]
    out = levels_to_video(_logits(probs)).flatten()
    expected = torch.tensor([0.0, 0.25, 1.0, -0.8, (0.2 * 0.5 + 0.7) / 0.9])
    torch.testing.assert_close(out, expected)


def test_video_to_levels_takes_the_nearest_level_and_round_trips():
    n = 32
    values = torch.linspace(-1, 1, n)
    assert torch.equal(video_to_levels(values, n), torch.arange(n))
    noise = torch.rand(n, generator=torch.Generator().manual_seed(0)) - 0.5
    jitter = values + noise * (1.9 / (n - 1))  # under half a step away
    assert torch.equal(video_to_levels(jitter, n), torch.arange(n))
    assert video_to_levels(torch.tensor([-3.0, 3.0]), n).tolist() == [0, n - 1]
    with pytest.raises(ValueError, match="output_levels must be 0"):
        VideoTokenizerConfig(output_levels=1)


def test_a_levels_decoder_gives_logits_in_training_and_video_at_decode(
    make_small_tokenizer, make_video
):
    model = make_small_tokenizer(output_levels=8)
    video = make_video(frames=5)
    out = model(video)
    assert out.logits is not None and out.logits.shape == (1, 3, 8, 5, 32, 32)
    torch.testing.assert_close(out.recon, levels_to_video(out.logits))
    decoded = model.decode(model.encode(video))
    torch.testing.assert_close(decoded, out.recon.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    assert make_small_tokenizer()(video).logits is None
