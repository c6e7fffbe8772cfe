"""CPU speed of our ``VideoLM`` beside transformers' ``LlamaForCausalLM`` with the same weights.

Both models run in one process on the same torch, threads and inputs; the HF model is
``loong.lm.hf.to_hf_llama(ours)`` (identical weights, float32, its default attention
implementation, SDPA). The timed calls are interleaved round by round (the order flips every
round) so that both share the machine's noise; medians are reported with the ratio ours/HF
(> 1: ours is faster).

- train: one step of forward + backward + AdamW on a batch ``(B, L)`` of random ids. Both
  losses are the same function, next-token cross-entropy on the logits
  (``F.cross_entropy(logits[:, :-1], ids[:, 1:])``); HF is called as ``hf(ids).logits`` rather
  than with ``labels=`` so that the loss code is shared. Each model has its own AdamW with the
  same settings. Reported as trained tokens/s (B·L per step).
- sample: batch 1, a prompt ``[BOS] text [BOV]`` of ``--prompt`` tokens (random text ids), then
  exactly ``--new-tokens`` video ids. Ours: ``generate_video_tokens`` (static KV cache, video-id
  mask, top-k). HF: ``generate(do_sample=True, top_k=...)`` with the default dynamic cache and a
  logits processor that masks every non-video id (applied before top-k, as ours), EOS stopping
  off. Timed end to end (prefill included) under ``torch.inference_mode``; reported as new
  tokens/s. A greedy row uses top_k=1 (ours) and ``do_sample=False`` (HF).

- speculative (with ``--model``): the same sampling with free drafts on both sides. Ours:
  frame-copy speculative decoding (``speculate=--speculate``, drafts one latent frame back).
  HF: prompt lookup decoding (``prompt_lookup_num_tokens=--speculate``), its nearest built-in
  (drafts from the first earlier match of the last 2 ids, a fixed number of them). Both keep
  the model's distribution; the speed depends on the weights and on the sample, so each call
  of either side samples with the next seed.

``--model DIR`` times a trained export (``bundled``: the package's shapes-world model, which
since it reads a local video context no longer converts; BENCHMARKS.md says which bundle each
figure used) on the
workload of one sliding window of ``loong generate``: the prompt is ``[BOS] caption [BOV]`` and
``--context-latents`` latent frames of the world's own rendering of the caption, encoded by the
paired video tokenizer; ``--new-tokens`` video ids follow. Random weights (the default) sample
ids that never repeat, which is no workload for drafts.

Before timing, the logits of both models on the training batch are compared (max abs diff), and
the greedy token sequences of both are compared, so the two sides do the same work.

``--dtype bfloat16`` times both models in bfloat16 (weights and activations). ``--int8`` times
ours with int8 weights and bfloat16 activations (``loong.lm.int8``, sampling only) against HF in
``--dtype``: not the same arithmetic, so the report adds how far the timed logits are from ours in
float32, and the greedy agreement is that of the timed models. ``--hf-int8`` gives HF's block
projections int8 weights too, with torchao's ``Int8WeightOnlyConfig`` (``pip install torchao``;
a benchmark-only peer, not a dependency): int8 against int8.

    .venv/bin/python benchmarks/lm_speed.py --json runs/lm_speed.json
    .venv/bin/python benchmarks/lm_speed.py --model bundled --skip train \
        --json runs/lm_speed_model.json
    .venv/bin/python benchmarks/lm_speed.py --skip train --int8 --json runs/lm_speed_int8.json
    .venv/bin/python benchmarks/lm_speed.py --skip train --int8 --hf-int8 --dtype bfloat16
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--preset", default="tiny", help="our preset (vocabulary) to resize")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=None, help="default: LLaMA's 8/3·dim")
    parser.add_argument("--batch", type=int, default=4, help="training batch B")
    parser.add_argument("--seq", type=int, default=512, help="training sequence length L")
    parser.add_argument("--prompt", type=int, default=32, help="sampling prompt length")
    parser.add_argument("--new-tokens", type=int, default=256, help="sampled tokens")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--model", default=None, help="trained LM export, or 'bundled'")
    parser.add_argument("--caption", default="a red circle moves right", help="with --model")
    parser.add_argument("--context-latents", type=int, default=5, help="with --model")
    parser.add_argument("--speculate", type=int, default=16, help="drafts per step (--model)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--hf-cache",
        choices=("dynamic", "static"),
        default="dynamic",
        help="HF generate's cache_implementation (dynamic is its default)",
    )
    parser.add_argument(
        "--skip", choices=("train", "sample"), action="append", default=[], help="leave out"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and activations of both models",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="ours with int8 weights and bfloat16 activations (loong.lm.int8); HF stays in --dtype",
    )
    parser.add_argument(
        "--hf-int8",
        action="store_true",
        help="HF's block projections in int8 too, by torchao's Int8WeightOnlyConfig (pip install "
        "torchao; not a project dependency), activations in --dtype",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if (args.int8 or args.hf_int8) and "train" not in args.skip:
        parser.error("int8 weights are for sampling: pass --skip train with --int8 or --hf-int8")
    if args.prompt < 2 or args.new_tokens < 1 or args.seq < 2 or args.batch < 1:
        parser.error("--prompt and --seq must be >= 2, --new-tokens and --batch >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    block_network("lm_speed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    try:
        import loong
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        import loong
    from loong.lm.hf import to_hf_llama
    from loong.lm.model import VideoLM
    from loong.lm.presets import lm_preset
    from loong.lm.sampling import generate_video_tokens
    from loong.lm.vocab import Vocabulary

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # --- the pair: ours, and a LlamaForCausalLM with the same weights
    pipe = None
    if args.model is None:
        config = lm_preset(
            args.preset,
            dim=args.dim,
            n_layers=args.layers,
            n_heads=args.heads,
            n_kv_heads=args.kv_heads,
            ffn_dim=args.ffn_dim,
            max_seq_len=max(args.seq, args.prompt + args.new_tokens),
        )
        ours = VideoLM(config)
    else:
        from loong.generate import TextToVideo

        pipe = TextToVideo.from_pretrained(None if args.model == "bundled" else args.model)
        ours, config = pipe.lm.float(), pipe.lm.config
        if config.video_grid is not None:
            raise SystemExit(
                f"--model {args.model}: this model reads cell embeddings or a local video "
                f"context, which LlamaForCausalLM has no place for, so the two cannot be timed "
                f"on the same weights. Pass an export trained with model.video_grid = None, "
                f"e.g. the bundle before the video context: `git worktree add /tmp/previous "
                f"71bf772` and --model /tmp/previous/src/loong/models/shapes/lm"
            )
    hf = to_hf_llama(ours)
    vocab = Vocabulary(config.vocab)
    lo, hi = vocab.video_id_range
    n_ours = ours.num_parameters()
    n_hf = sum(p.numel() for p in hf.parameters())
    attn_impl = getattr(hf.config, "_attn_implementation", None)

    # --- inputs
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)  # (B, L)
    draft_lag = None
    if pipe is None:
        text = torch.randint(0, vocab.text_vocab_size, (args.prompt - 2,), generator=gen).tolist()
        prompt = vocab.layout(text, None).token_ids[None]  # (1, L_p): [BOS] text [BOV]
    else:
        from loong.data.shapes import parse_caption, render
        from loong.data.video import frames_to_tensor

        (h, w), r = pipe.grid, pipe.video_tokenizer.config.temporal_compression
        draft_lag = h * w
        size = h * pipe.video_tokenizer.config.spatial_compression
        n_frames = 1 + r * (args.context_latents - 1)
        frames = render(
            parse_caption(args.caption), seed=args.seed, n_frames=n_frames, height=size, width=size
        )
        with torch.inference_mode():
            indices = pipe.video_tokenizer.encode(frames_to_tensor(frames)[None])  # (1, t, h, w)
        text = pipe.text_tokenizer.encode(args.caption)
        prompt = torch.cat(
            [vocab.layout(text, None).token_ids, vocab.video_to_ids(indices)[0].flatten()]
        )[None]
        args.prompt = prompt.shape[1]
        if prompt.shape[1] + args.new_tokens > config.max_seq_len:
            sys.exit(
                f"lm_speed: prompt {prompt.shape[1]} + {args.new_tokens} new ids exceed "
                f"max_seq_len {config.max_seq_len}: pass fewer --new-tokens or --context-latents"
            )

    # --- like for like: logits on the training batch, greedy tokens from the prompt
    ours.eval()
    with torch.inference_mode():
        logits_ours = ours(batch)
        logits_hf = hf(batch).logits
        max_abs_diff = float((logits_ours - logits_hf).abs().max())
        logit_scale = float(logits_ours.abs().max())
    del logits_hf

    # --- the timed precision: both models in --dtype, or ours with int8 weights
    dtype = getattr(torch, args.dtype)
    hf.to(dtype)
    if args.hf_int8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # the decoder layers' projections, as ours (both keep the head in float)
        quantize_(
            hf,
            Int8WeightOnlyConfig(),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn,
        )
    if args.int8:
        from loong.lm.int8 import int8_weights

        int8_weights(ours)
    else:
        ours.to(dtype)
    precision_diff = None
    if args.int8 or dtype != torch.float32:
        with torch.inference_mode():  # against float32 ours: the rounding of the timed weights
            precision_diff = float((ours(batch).float() - logits_ours).abs().max())
    del logits_ours

    class VideoIdsOnly(LogitsProcessor):
        """Every id outside the video range to −inf, as ``generate_video_tokens`` does."""

        def __init__(self) -> None:
            ids = torch.arange(config.vocab_size)
            self.outside = (ids < lo) | (ids >= hi)  # (V,)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores.masked_fill(self.outside, float("-inf"))

    processors = LogitsProcessorList([VideoIdsOnly()])

    def hf_generation_config(greedy: bool, lookup: int | None = None) -> GenerationConfig:
        return GenerationConfig(
            prompt_lookup_num_tokens=lookup,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=not greedy,
            top_k=None if greedy else args.top_k,
            top_p=None,
            temperature=None,
            eos_token_id=None,  # never stop early: exactly new_tokens, as ours
            pad_token_id=vocab.pad,
            bos_token_id=vocab.bos,
            use_cache=True,
            cache_implementation=None if args.hf_cache == "dynamic" else "static",
        )

    gen_configs = {False: hf_generation_config(False), True: hf_generation_config(True)}
    lookup_config = hf_generation_config(False, lookup=args.speculate)

    # Each call of either side draws with the next seed, so both time the same number of
    # different samples (with drafts, the speed depends on the sample).
    calls = {"ours": 0, "HF": 0}

    def sample_ours(greedy: bool, speculate: int = 0) -> torch.Tensor:
        calls["ours"] += 1
        with torch.inference_mode():
            top_k = 1 if greedy else args.top_k
            out = generate_video_tokens(
                ours,
                prompt,
                args.new_tokens,
                vocab=vocab,
                top_k=top_k,
                seed=args.seed + calls["ours"],
                speculate=speculate,
                draft_lag=draft_lag,
            )
        return out  # (1, N)

    def sample_hf(greedy: bool, lookup: bool = False) -> torch.Tensor:
        calls["HF"] += 1
        torch.manual_seed(args.seed + calls["HF"])
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                generation_config=lookup_config if lookup else gen_configs[greedy],
                logits_processor=processors,
            )
        return out[:, prompt.shape[1] :]  # (1, N)

    greedy_match = None
    if "sample" not in args.skip:
        checks: list[tuple[str, Callable[[], torch.Tensor]]] = [
            ("ours", lambda: sample_ours(False)),
            ("ours", lambda: sample_ours(True)),
            ("HF", lambda: sample_hf(False)),
            ("HF", lambda: sample_hf(True)),
        ]
        if pipe is not None:
            checks += [("ours", lambda: sample_ours(False, args.speculate))]
            checks += [("HF", lambda: sample_hf(False, lookup=True))]
        for name, fn in checks:
            out = fn()
            if out.shape != (1, args.new_tokens) or not bool(vocab.is_video(out).all()):
                sys.exit(
                    f"lm_speed: {name} sampled shape {tuple(out.shape)} (want "
                    f"(1, {args.new_tokens})) or ids outside the video range"
                )
        if pipe is not None:  # drafts change the speed, never the greedy ids
            spec = generate_video_tokens(
                ours,
                prompt,
                args.new_tokens,
                vocab=vocab,
                top_k=1,
                speculate=args.speculate,
                draft_lag=draft_lag,
            )
            if not torch.equal(spec, sample_ours(True)):  # only a near tie could do this
                print("lm_speed: warning: greedy ids with drafts differ from those without")
        a, b = sample_ours(True)[0], sample_hf(True)[0]
        differ = (a != b).nonzero()
        greedy_match = args.new_tokens if differ.numel() == 0 else int(differ[0, 0])

    # --- the timed operations
    def make_train_step(model: torch.nn.Module, logits_of: Callable) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

        def step() -> None:
            logits = logits_of(batch)  # (B, L, V)
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()
            )  # next-token
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    ops: dict[str, dict[str, Callable[[], object]]] = {"ours": {}, "HF": {}}
    tokens_per_call: dict[str, int] = {}
    if "train" not in args.skip:
        ops["ours"]["train"] = make_train_step(ours, ours)
        ops["HF"]["train"] = make_train_step(hf, lambda ids: hf(ids).logits)
        tokens_per_call["train"] = args.batch * args.seq
    if "sample" not in args.skip:
        ops["ours"]["sample"] = lambda: sample_ours(False)
        ops["HF"]["sample"] = lambda: sample_hf(False)
        ops["ours"]["greedy"] = lambda: sample_ours(True)
        ops["HF"]["greedy"] = lambda: sample_hf(True)
        tokens_per_call["sample"] = tokens_per_call["greedy"] = args.new_tokens
        if pipe is not None:
            ops["ours"]["speculative"] = lambda: sample_ours(False, args.speculate)
            ops["HF"]["speculative"] = lambda: sample_hf(False, lookup=True)
            tokens_per_call["speculative"] = args.new_tokens
    metrics = list(tokens_per_call)
    if not metrics:
        sys.exit("lm_speed: nothing to time (both train and sample skipped)")

    # --- interleaved timing: ours/HF alternate, and which goes first flips every round
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in metrics} for n in ops}
    order = ["ours", "HF"]
    loadavg = Path("/proc/loadavg")
    load_at_start = loadavg.read_text().split()[:3] if loadavg.exists() else None
    print(
        f"timing {args.warmup} warm-up + {args.repeats} rounds of {', '.join(metrics)}; "
        f"{args.threads} threads",
        file=sys.stderr,
        flush=True,
    )
    for round_ in range(args.warmup + args.repeats):
        for metric in metrics:
            for name in order:
                model = ours if name == "ours" else hf
                model.train(metric == "train")
                start = time.perf_counter()
                ops[name][metric]()
                elapsed = time.perf_counter() - start
                if round_ >= args.warmup:
                    times[name][metric].append(elapsed)
        order.reverse()
        print(
            f"  round {round_ + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True
        )
    ours.eval()
    hf.eval()

    median = {n: {m: statistics.median(t) for m, t in d.items()} for n, d in times.items()}
    tok_s = {n: {m: tokens_per_call[m] / s for m, s in d.items()} for n, d in median.items()}
    ratio = {m: tok_s["ours"][m] / tok_s["HF"][m] for m in metrics}

    # --- report
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "loadavg_at_start": load_at_start,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loong": getattr(loong, "__version__", None),
    }
    model_desc = (
        f"dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads / "
        f"{config.kv_heads} kv heads, ffn {config.hidden_dim}, vocab {config.vocab_size} "
        f"(video ids [{lo}, {hi})), tied {config.tie_embeddings}"
    )
    labels = {
        "train": f"train tok/s (B={args.batch}, L={args.seq}, fwd+bwd+AdamW)",
        "sample": f"sample tok/s (top_k={args.top_k}, {args.prompt}+{args.new_tokens})",
        "greedy": f"greedy tok/s (top_k=1, {args.prompt}+{args.new_tokens})",
        "speculative": f"sample tok/s with {args.speculate} drafts (ours: frame copy, HF: lookup)",
    }
    print()
    print(f"model:  {model_desc}")
    print(f"params: ours {n_ours / 1e6:.2f}M, HF {n_hf / 1e6:.2f}M; HF attention {attn_impl}")
    print(
        f"torch {env['torch']}, transformers {env['transformers']}; {env['cpu']}; "
        f"{env['threads']} threads; load {load_at_start}; {env['date']}; "
        f"median of {args.repeats} (after {args.warmup} warm-up)"
    )
    print(
        f"logits max |ours − HF| = {max_abs_diff:.2e} (max |logit| {logit_scale:.2f})"
        + (
            ""
            if greedy_match is None
            else f"; greedy tokens agree on {greedy_match}/{args.new_tokens}"
        )
    )
    print()
    width = max(len(v) for v in labels.values())
    header = f"{'metric':{width}}{'ours':>11}{'HF':>11}{'ours/HF':>9}"
    print(header)
    print("-" * len(header))
    for m in metrics:
        print(
            f"{labels[m]:{width}}{tok_s['ours'][m]:>11.1f}{tok_s['HF'][m]:>11.1f}{ratio[m]:>9.2f}"
        )
    print("\nratio = ours / HF tokens per second: > 1 means ours is faster.")
    if "speculative" in metrics:
        plain = tok_s["ours"]["speculative"] / tok_s["HF"]["sample"]
        print(f"ours with drafts / HF generate without: {plain:.2f}")
        ratio["speculative_over_hf_plain"] = plain
    if n_ours != n_hf:
        print(f"warning: parameter counts differ ({n_ours} vs {n_hf})")
    precision = "int8 weights, bfloat16 activations" if args.int8 else args.dtype
    hf_precision = (
        f"int8 weights (torchao), {args.dtype} activations" if args.hf_int8 else args.dtype
    )
    print(f"timed precision: ours {precision}; HF {hf_precision}")
    if precision_diff is not None:
        print(
            f"logits max |ours timed − ours float32| = {precision_diff:.2e} (the rounding of "
            f"the timed precision; greedy agreement above is of the timed models)"
        )
    if max_abs_diff > 1e-3 * max(1.0, logit_scale):
        print(f"warning: the logits differ by {max_abs_diff:.2e}: the models are not the same")

    if args.json is not None:
        result = {
            "env": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": model_desc,
            "weights": args.model or "random",
            "params": {"ours": n_ours, "HF": n_hf},
            "hf_attn_implementation": attn_impl,
            "precision": {"ours": precision, "HF": hf_precision},
            "logits_max_abs_diff": max_abs_diff,
            "logits_max_abs_diff_timed_vs_float32": precision_diff,
            "greedy_tokens_agree": greedy_match,
            "metrics": {m: labels[m] for m in metrics},
            "tokens_per_call": tokens_per_call,
            "times_s": times,
            "median_s": median,
            "tokens_per_s": tok_s,
            "ratio_ours_over_hf": ratio,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
