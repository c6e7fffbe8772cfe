"""CPU speed of our video tokenizer beside magvit2-pytorch's ``VideoTokenizer``, side by side.

Both models run in one process, on the same torch, threads and input (a random video
``(B, 3, T, H, W)`` in [-1, 1]); the timed calls are interleaved round by round (the order flips
every round) so that both share the machine's noise. Timed under ``torch.inference_mode()``:

- encode: video → token indices (ours ``encode``; theirs ``tokenize``, i.e. encoder + LFQ);
- decode: token indices → video (ours ``decode``; theirs ``decode_from_code_indices``).

The peer is an installed third-party package, not part of this repository. It needs torchvision,
which does not import beside the project's CPU torch, so it runs from its own venv:

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/bench-venv/bin/pip install magvit2-pytorch
    /work/bench-venv/bin/pip install -e .
    /work/bench-venv/bin/python benchmarks/tokenizer_speed.py

The peer mirrors our stage layout: widths (w, 2w, 2w, 4w) with ``init_dim = w``, 2× spatial
compression after each of the first three stages and 2× temporal after the last two (8× space,
4× time: 17×128×128 → 5×16×16 tokens on both sides), the same vocabulary (an LFQ of
log2(vocab) bits), and ``r`` residual units per stage, ``r`` chosen so that its parameter count
is the closest to ours (its discriminator, built but unused, is not counted; no GAN and no
perceptual loss, so no VGG weights are needed). Nothing may reach the network: sockets are
blocked for the whole run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from common import THREADS_HELP, block_network, cpu_model, default_threads

SETUP_HINT = """\
magvit2_pytorch is not importable from this Python ({python}): {error}

This benchmark runs in its own venv (torchvision, which magvit2-pytorch needs, does not import
beside the project's torch 2.13 CPU build). Set it up once, from the repository root:

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/bench-venv/bin/pip install magvit2-pytorch
    /work/bench-venv/bin/pip install -e .

then run:  /work/bench-venv/bin/python benchmarks/tokenizer_speed.py
"""


def import_models():
    """Our ``VideoTokenizer`` and magvit2-pytorch's, or exit with the setup instructions."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import magvit2_pytorch
        from magvit2_pytorch import VideoTokenizer as TheirTokenizer
    except Exception as error:  # ImportError, or torchvision's "operator ... does not exist"
        sys.exit(SETUP_HINT.format(python=sys.executable, error=f"{type(error).__name__}: {error}"))
    try:
        from loong.video_tokenizer.model import VideoTokenizer as OurTokenizer
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from loong.video_tokenizer.model import VideoTokenizer as OurTokenizer
    return OurTokenizer, TheirTokenizer, magvit2_pytorch


def magvit2_layers(width: int, residuals: int) -> tuple:
    """magvit2-pytorch's layer DSL for our layout: widths (w, 2w, 2w, 4w), 8× space, 4× time."""
    r = ("consecutive_residual", residuals)
    return (
        r,
        ("compress_space", 2 * width),
        r,
        ("compress_space", 2 * width),
        ("compress_time", 2 * width),
        r,
        ("compress_space", 4 * width),
        ("compress_time", 4 * width),
        r,
    )


def count_params(model) -> int:
    # magvit2's VideoTokenizer.parameters() leaves out its discriminator and VGG.
    return sum(p.numel() for p in model.parameters())


def build_theirs(their_cls, *, width: int, residuals: int, vocab: int, size: int):
    return their_cls(
        image_size=size,
        init_dim=width,
        codebook_size=vocab,
        layers=magvit2_layers(width, residuals),
        use_gan=False,
        perceptual_loss_weight=0.0,  # no VGG16: nothing to download
    ).eval()


def gflops(fn: Callable[[], object]) -> float:
    """Conv and matmul GFLOPs of one call (FlopCounterMode: norms and pointwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128, help="height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--preset", default="loong-246m", help="our preset to shrink")
    parser.add_argument(
        "--base-width", type=int, default=64, help="ours: base_width; theirs: init_dim"
    )
    parser.add_argument(
        "--blocks", type=int, default=1, help="ours: encoder/decoder blocks per stage"
    )
    parser.add_argument("--num-groups", type=int, default=8, help="ours: GroupNorm groups")
    parser.add_argument(
        "--magvit-residuals",
        type=int,
        default=None,
        help="theirs: residual units per stage (default: the count closest to ours in parameters)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")

    block_network("tokenizer_speed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    OurTokenizer, TheirTokenizer, magvit2_pytorch = import_models()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # --- the pair
    ours = OurTokenizer.from_preset(
        args.preset,
        base_width=args.base_width,
        encoder_blocks=args.blocks,
        decoder_blocks=args.blocks,
        num_groups=args.num_groups,
    ).eval()  # eval: no CVQ codebook update
    cfg = ours.config
    if (cfg.spatial_compression, cfg.temporal_compression, len(cfg.width_mults)) != (8, 4, 4):
        sys.exit("tokenizer_speed: the magvit2 mirror needs our 4-stage, 8× space, 4× time layout")
    vocab = cfg.vocab_size
    if vocab & (vocab - 1):
        sys.exit(f"tokenizer_speed: magvit2's LFQ needs a power-of-two vocabulary, ours is {vocab}")
    n_ours = count_params(ours)

    def make_theirs(r: int):
        return build_theirs(
            TheirTokenizer, width=args.base_width, residuals=r, vocab=vocab, size=args.size
        )

    if args.magvit_residuals is not None:
        residuals = args.magvit_residuals
        theirs = make_theirs(residuals)
    else:  # the parameter count grows linearly with r: the closest one, searched upward
        best = None
        for r in range(1, 17):
            model = make_theirs(r)
            gap = abs(count_params(model) - n_ours)
            if best is not None and gap >= best[0]:
                break
            best = (gap, r, model)
        _, residuals, theirs = best
    n_theirs = count_params(theirs)
    param_ratio = n_theirs / n_ours

    # --- input and a first, untimed pass (shapes, FLOPs, indices to decode)
    video = torch.rand(args.batch, cfg.channels, args.frames, args.size, args.size) * 2 - 1
    ops: dict[str, dict[str, Callable[[], torch.Tensor]]] = {}
    with torch.inference_mode():
        our_idx = ours.encode(video)
        their_idx = theirs.tokenize(video)
        if our_idx.shape != their_idx.shape:
            sys.exit(
                f"token grids differ: ours {tuple(our_idx.shape)}, theirs {tuple(their_idx.shape)}"
            )
        ops["ours"] = {"encode": lambda: ours.encode(video), "decode": lambda: ours.decode(our_idx)}
        ops["theirs"] = {
            "encode": lambda: theirs.tokenize(video),
            "decode": lambda: theirs.decode_from_code_indices(their_idx),
        }
        for name in ops:
            out = ops[name]["decode"]()
            if out.shape != video.shape or not torch.isfinite(out).all():
                sys.exit(f"{name}: decode gave shape {tuple(out.shape)} or non-finite values")
        flops = {name: {op: gflops(fn) for op, fn in ops[name].items()} for name in ops}

    # --- interleaved timing: ours/theirs alternate, and which goes first flips every round
    times: dict[str, dict[str, list[float]]] = {n: {"encode": [], "decode": []} for n in ops}
    order = ["ours", "theirs"]
    print(
        f"timing {args.warmup} warm-up + {args.repeats} rounds, {args.threads} threads, "
        f"video {tuple(video.shape)}",
        file=sys.stderr,
        flush=True,
    )
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            for op in ("encode", "decode"):
                for name in order:
                    start = time.perf_counter()
                    ops[name][op]()
                    elapsed = time.perf_counter() - start
                    if round_ >= args.warmup:
                        times[name][op].append(elapsed)
            order.reverse()
            print(
                f"  round {round_ + 1}/{args.warmup + args.repeats} done",
                file=sys.stderr,
                flush=True,
            )

    median = {n: {op: statistics.median(t) for op, t in d.items()} for n, d in times.items()}
    ratio = {op: median["theirs"][op] / median["ours"][op] for op in ("encode", "decode")}

    # --- report
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    ours_desc = (
        f"loong VideoTokenizer.from_preset({args.preset!r}, base_width={args.base_width}, "
        f"encoder_blocks={args.blocks}, decoder_blocks={args.blocks}, num_groups={args.num_groups})"
        f" [{cfg.quantizer.kind}, vocab {vocab}]"
    )
    theirs_desc = (
        f"magvit2_pytorch VideoTokenizer(image_size={args.size}, init_dim={args.base_width}, "
        f"codebook_size={vocab}, layers={magvit2_layers(args.base_width, residuals)}, "
        "use_gan=False, perceptual_loss_weight=0) [lfq]"
    )
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]
        if Path("/proc/loadavg").exists()
        else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "magvit2_pytorch": getattr(magvit2_pytorch, "__version__", version("magvit2-pytorch")),
        "vector_quantize_pytorch": version("vector-quantize-pytorch"),
    }
    print()
    print(f"ours:   {ours_desc}")
    print(f"theirs: {theirs_desc}")
    print(
        f"input {tuple(video.shape)} → tokens {tuple(our_idx.shape)}; {env['threads']} threads; "
        f"torch {env['torch']}; {env['cpu']}; {env['date']}; "
        f"median of {args.repeats} (after {args.warmup} warm-up)"
    )
    print()
    columns = ("params", "encode s", "decode s", "enc GFLOP", "dec GFLOP")
    header = f"{'':8}{columns[0]:>10}" + "".join(f"{c:>11}" for c in columns[1:])
    print(header)
    print("-" * len(header))
    for name, n in (("ours", n_ours), ("theirs", n_theirs)):
        m, f = median[name], flops[name]
        print(
            f"{name:8}{n / 1e6:>9.2f}M{m['encode']:>11.3f}{m['decode']:>11.3f}"
            f"{f['encode']:>11.1f}{f['decode']:>11.1f}"
        )
    print("-" * len(header))
    print(
        f"{'th/ours':8}{param_ratio:>10.2f}{ratio['encode']:>11.2f}{ratio['decode']:>11.2f}"
        f"{flops['theirs']['encode'] / flops['ours']['encode']:>11.2f}"
        f"{flops['theirs']['decode'] / flops['ours']['decode']:>11.2f}"
    )
    print("\nspeed ratio = theirs / ours median time: > 1 means ours is faster.")
    if not 0.75 <= param_ratio <= 1.25:
        print(f"warning: parameter counts differ by more than 25% ({param_ratio:.2f}×)")

    if args.json is not None:
        result = {
            "env": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "input_shape": list(video.shape),
            "token_shape": list(our_idx.shape),
            "ours": {"config": ours_desc, "params": n_ours},
            "theirs": {"config": theirs_desc, "params": n_theirs, "residuals_per_stage": residuals},
            "times_s": times,
            "median_s": median,
            "gflops": flops,
            "ratio_theirs_over_ours": {"params": param_ratio, **ratio},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
