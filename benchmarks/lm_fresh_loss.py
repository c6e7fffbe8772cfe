"""Has the language model learned the world or its training clips? Loss on both, side by side.

    loong lm tokenize --video-tokenizer runs/recipe3/tokenizer/export --data shapes \
        --out runs/fresh --set n_clips=256 --set n_frames=33 --set seed=12345 \
        --set still_share=0.1 --set text_vocab_size=512
    python benchmarks/lm_fresh_loss.py runs/recipe3/lm/export runs/recipe3/shards runs/fresh

Scores an LM export with teacher forcing (unweighted mean cross-entropy of video and EOV
targets, and per latent frame) on a fixed sample of its training shards and on shards of clips
it never saw (another world seed, tokenized by the same video tokenizer). The shapes world is
unbounded, so a gap between the two is memorisation that more clips would remove.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from loong.lm.model import VideoLM
from loong.train.lm import evaluate_lm, open_data
from loong.train.lm_batches import make_eval_batches
from loong.train.lm_config import lm_train_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="LM export directory")
    parser.add_argument("train_shards", help="the token shards it was trained on")
    parser.add_argument("fresh_shards", help="token shards of clips it never saw")
    parser.add_argument("--items", type=int, default=64, help="items per clip length")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = VideoLM.from_pretrained(args.model)
    cfg = lm_train_preset("shapes")  # its stage lengths (1, 5, 9) pick what is scored
    data = dataclasses.replace(cfg.data, shards=(args.train_shards,))
    cfg = dataclasses.replace(cfg, model=model.config, data=data, eval_items=args.items)
    shards, text, vocab = open_data(cfg)
    print(f"{args.model}: mean loss (nats), then latent frames 0-8")
    for name, source in (("training sample", ""), ("fresh clips", args.fresh_shards)):
        run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_shards=source))
        batches = make_eval_batches(run, shards, text, vocab)
        result = evaluate_lm(model, batches, vocab, torch.device("cpu"))
        frames = " ".join(f"{result[f'loss_frame_{t}']:.3f}" for t in range(9))
        print(f"{name:<16} {result['loss']:.4f}   {frames}")


if __name__ == "__main__":
    main()
