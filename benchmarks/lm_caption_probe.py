"""Does the language model read its caption? Object-token loss under true and altered captions.

    python benchmarks/lm_caption_probe.py                        # the bundled model
    python benchmarks/lm_caption_probe.py --model runs/recipe/lm/export --clips 64

Renders held-out single-object shapes-world clips (world seed 1, which training never uses) of
the model's clip length, tokenizes them with the model's video tokenizer, and scores each clip's
tokens with teacher forcing under four captions: the true one, the same with the direction
reversed (right ↔ left, up ↔ down, up-left ↔ down-right, …), with another colour, and the empty
caption. Prints the mean cross-entropy of *object* tokens (ids other than the latent frame's most
common id, i.e. not plain background) for latent frame 0, latent frame 1 and the later frames.

A model that uses the caption loses more under a wrong one: colour should matter most in frame
0 (later frames can copy it), direction in frame 1 (frame 0 is a still, and from frame 2 on the
motion can be read off the frames before). Equal losses mean the model ignores that part of the
caption.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from loong.data.shapes import PALETTE, ShapesWorld, ShapesWorldConfig, caption
from loong.generate import TextToVideo

OPPOSITE = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "up-left": "down-right",
    "down-right": "up-left",
    "up-right": "down-left",
    "down-left": "up-right",
}


def altered(scene, kind: str):
    """The scene with its one object's direction reversed or colour changed."""
    obj = scene.objects[0]
    if kind == "direction":
        obj = dataclasses.replace(obj, direction=OPPOSITE[obj.direction])
    else:
        colours = list(PALETTE)
        obj = dataclasses.replace(obj, colour=colours[(colours.index(obj.colour) + 3) % 8])
    return dataclasses.replace(scene, objects=(obj,))


@torch.no_grad()
def object_losses(lm, vocab, text_ids, indices) -> tuple[float, float, float]:
    """Mean CE of object tokens in latent frame 0, in frame 1 and in frames 2.. for one clip."""
    layout = vocab.layout(text_ids, indices)
    ids = layout.token_ids[None]  # (1, L)
    logits = lm(ids)[0, :-1].float()  # (L−1, V)
    ce = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    frame = layout.frame_index[1:]
    ce, frame = ce[frame >= 0], frame[frame >= 0]  # video tokens only, (t·h·w,)
    flat = indices.flatten(1)  # (t, h·w)
    is_object = (flat != flat.mode(dim=1).values[:, None]).flatten()
    parts = (frame == 0, frame == 1, frame > 1)
    return tuple(ce[is_object & part].mean().item() for part in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="LM export (default: the bundled model)")
    parser.add_argument("--clips", type=int, default=32)
    args = parser.parse_args()
    pipe = TextToVideo.from_pretrained(args.model, lm_dtype=torch.float32)
    lm, text, vocab, tokenizer = (
        pipe.lm.eval(),
        pipe.text_tokenizer,
        pipe.vocab,
        pipe.video_tokenizer,
    )
    n_frames = 1 + tokenizer.config.temporal_compression * (pipe.trained_latents - 1)
    world = ShapesWorld(ShapesWorldConfig(n_frames=n_frames, max_objects=1, seed=1))

    results: dict[str, list[tuple[float, float, float]]] = {}
    for i in range(args.clips):
        scene, _, true_caption, frames = world.sample(i)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            indices = tokenizer.encode(video)[0]  # (t, h, w)
        captions = {
            "true caption": true_caption,
            "direction reversed": caption(altered(scene, "direction")),
            "other colour": caption(altered(scene, "colour")),
            "empty caption": "",
        }
        for name, cap in captions.items():
            ids = text.encode(cap) if cap else []
            results.setdefault(name, []).append(object_losses(lm, vocab, ids, indices))

    name = args.model or "bundled model"
    print(f"{name}: {args.clips} clips of {n_frames} frames, object tokens only")
    print(f"{'caption (nats)':22s} {'frame 0':>9s} {'frame 1':>9s} {'frames 2+':>10s}")
    for name, rows in results.items():
        first, second, later = np.nanmean(np.array(rows), axis=0)
        print(f"{name:22s} {first:9.3f} {second:9.3f} {later:10.3f}")


if __name__ == "__main__":
    main()
