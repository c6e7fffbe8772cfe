"""The GPU figures of the LM and tokenizer issues, in one short run.

    python benchmarks/gpu_throughput.py --json runs/gpu_throughput.json
    python benchmarks/gpu_throughput.py --device cpu --lm-preset tiny --tokenizer-preset tiny \
        --seq 256 --prompt 64 --new-tokens 32 --steps 2 --warmup 1 --size 64   # the code on a CPU

1. **train**: ``--lm-preset`` (``loong-700m``) on the device with fp32 weights and bf16
   autocast (``loong.train.parallel``'s single-GPU default), fused AdamW, ``--batch``
   sequences of ``--seq`` (4,352) random ids a step; ``--compile`` and
   ``--activation-checkpointing`` go through ``loong.train.parallel.parallelize``. Model FLOPs
   utilization = ``loong.plan.training_flops`` (matmuls only, causal attention counted
   once) × sequences / step time / the GPU's peak dense bf16 FLOP/s.
2. **decode**: the same preset with bf16 weights, batch 1, a ``--prompt``-id prompt, then
   ``--new-tokens`` video ids by ``generate_video_tokens`` (KV cache, no drafts: random weights
   never repeat a frame). The roofline is the HBM bandwidth over the bytes one token must read:
   every weight once (bf16) plus the KV cache at the mean context length.
3. **tokenizer**: ``--tokenizer-preset`` (``loong-246m``) under bf16 autocast: encode and decode
   of ``(--clips, 3, 17, --size, --size)`` random clips, in frames per second.

Peak FLOP/s and bandwidth come from a table of known GPUs matched by name (the datasheet's dense
bf16 tensor-core figure, without sparsity), or from ``--peak-tflops`` / ``--hbm-gbs``. Every
timing is the median of ``--steps`` after ``--warmup`` untimed ones, with the device synchronized
around each. Prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import block_network
from loong.lm.model import VideoLM
from loong.lm.presets import lm_preset
from loong.lm.sampling import generate_video_tokens
from loong.lm.vocab import Vocabulary
from loong.plan import training_flops
from loong.train.parallel import ParallelConfig, autocast, parallelize
from loong.video_tokenizer.model import VideoTokenizer
from loong.video_tokenizer.presets import tokenizer_preset

# name fragment → (dense bf16 TFLOP/s, HBM GB/s), from the vendors' datasheets
KNOWN_GPUS = {
    "H200": (989.0, 4800.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100 NVL": (835.0, 3900.0),
    "H100": (989.0, 3350.0),  # SXM5, 80 GB HBM3
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100-SXM4-40GB": (312.0, 1555.0),
    "A100-PCIE-80GB": (312.0, 1935.0),
    "A100-PCIE-40GB": (312.0, 1555.0),
    "L40S": (362.0, 864.0),
}


def device_peaks(
    device: torch.device, args: argparse.Namespace
) -> tuple[str, float | None, float | None]:
    """(device name, peak bf16 FLOP/s, HBM bytes/s); None where no table row or flag says."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops, bandwidth = next(
        ((f, b) for key, (f, b) in KNOWN_GPUS.items() if key in name), (None, None)
    )
    flops = args.peak_tflops if args.peak_tflops is not None else flops
    bandwidth = args.hbm_gbs if args.hbm_gbs is not None else bandwidth
    return (
        name,
        None if flops is None else flops * 1e12,
        None if bandwidth is None else bandwidth * 1e9,
    )


def median_seconds(
    fn: Callable[[], object], device: torch.device, warmup: int, steps: int
) -> float:
    """Median wall time of ``fn`` over ``steps`` calls after ``warmup``, device synchronized."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_train(args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    config = lm_preset(args.lm_preset, max_seq_len=max(args.seq, args.prompt + args.new_tokens))
    torch.manual_seed(0)
    model = VideoLM(config).to(device)
    parallel = ParallelConfig(
        activation_checkpointing=args.activation_checkpointing, compile=args.compile
    )
    model = parallelize(model, parallel, device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda"
    )
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)  # (B, L)

    def step() -> None:
        with autocast(parallel, device):
            logits = model(ids[:, :-1])  # (B, L − 1, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, device, args.warmup, args.steps)
    flops = training_flops(config, args.seq - 1)[0] * args.batch
    result = {
        "preset": args.lm_preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "seq": args.seq,
        "step_s": seconds,
        "tokens_per_s": args.batch * (args.seq - 1) / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }
    return result


def bench_decode(args: argparse.Namespace, device: torch.device, bandwidth: float | None) -> dict:
    config = lm_preset(args.lm_preset, max_seq_len=args.prompt + args.new_tokens)
    torch.manual_seed(0)
    model = VideoLM(config).to(device=device, dtype=torch.bfloat16).eval()
    vocab = Vocabulary(config.vocab)
    text = torch.randint(0, vocab.text_vocab_size, (args.prompt - 2,)).tolist()
    prompt = vocab.layout(text, None).token_ids[None].to(device)  # (1, L)

    def decode() -> None:
        generate_video_tokens(model, prompt, args.new_tokens, vocab=vocab, seed=0)

    seconds = median_seconds(decode, device, min(args.warmup, 1), max(1, args.steps // 2))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mean_context = args.prompt + args.new_tokens / 2
    kv_bytes = 2 * config.n_layers * config.kv_heads * config.head_dim * mean_context * 2
    bytes_per_token = weight_bytes + kv_bytes
    tokens_per_s = args.new_tokens / seconds  # prefill included, as a user sees it
    roofline = None if bandwidth is None else bandwidth / bytes_per_token
    return {
        "preset": args.lm_preset,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "bytes_per_token": bytes_per_token,
        "roofline_tokens_per_s": roofline,
        "roofline_share": None if roofline is None else tokens_per_s / roofline,
    }


@torch.no_grad()
def bench_tokenizer(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(tokenizer_preset(args.tokenizer_preset)).to(device).eval()
    video = torch.rand(args.clips, 3, 17, args.size, args.size, device=device) * 2 - 1
    bf16 = ParallelConfig()  # bf16 autocast on CUDA, a no-op on a CPU
    with autocast(bf16, device):
        indices = tokenizer.encode(video)
        encode_s = median_seconds(lambda: tokenizer.encode(video), device, args.warmup, args.steps)
        decode_s = median_seconds(
            lambda: tokenizer.decode(indices), device, args.warmup, args.steps
        )
    frames = args.clips * 17
    return {
        "preset": args.tokenizer_preset,
        "clip": [args.clips, 3, 17, args.size, args.size],
        "latent": list(indices.shape),
        "encode_frames_per_s": frames / encode_s,
        "decode_frames_per_s": frames / decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lm-preset", default="loong-700m")
    parser.add_argument("--tokenizer-preset", default="loong-246m")
    parser.add_argument("--seq", type=int, default=4352, help="training sequence length")
    parser.add_argument("--batch", type=int, default=1, help="training sequences a step")
    parser.add_argument("--prompt", type=int, default=512, help="decode prompt length")
    parser.add_argument("--new-tokens", type=int, default=512, help="decoded ids")
    parser.add_argument("--clips", type=int, default=4, help="tokenizer batch")
    parser.add_argument("--size", type=int, default=128, help="tokenizer frame size")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s")
    parser.add_argument("--hbm-gbs", type=float, default=None, help="memory bandwidth, GB/s")
    parser.add_argument(
        "--skip", choices=("train", "decode", "tokenizer"), action="append", default=[]
    )
    parser.add_argument("--json", default="runs/gpu_throughput.json")
    args = parser.parse_args()
    block_network("gpu_throughput")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_throughput: no CUDA device; pass --device cpu to try the code on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name, peak, bandwidth = device_peaks(device, args)
    report: dict = {"device": name, "peak_bf16_flops": peak, "hbm_bytes_per_s": bandwidth}
    report["torch"] = torch.__version__
    if "train" not in args.skip:
        report["train"] = bench_train(args, device, peak)
        print(json.dumps({"train": report["train"]}), flush=True)
    if "decode" not in args.skip:
        report["decode"] = bench_decode(args, device, bandwidth)
        print(json.dumps({"decode": report["decode"]}), flush=True)
    if "tokenizer" not in args.skip:
        report["tokenizer"] = bench_tokenizer(args, device)
        print(json.dumps({"tokenizer": report["tokenizer"]}), flush=True)
    if peak is None or bandwidth is None:
        print(f"{name}: peak FLOP/s or bandwidth unknown; pass --peak-tflops and --hbm-gbs")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
