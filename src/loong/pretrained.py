"""Model directories: ``config.json`` + ``model.safetensors``; loading never unpickles code."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from loong.config import config_from_dict, config_to_dict

C = TypeVar("C")


def save_pretrained(
    model: torch.nn.Module, config: Any, directory: str | Path, *, kind: str
) -> None:
    """Write ``config.json`` (with a ``kind`` tag) and ``model.safetensors``, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"kind": kind, "config": config_to_dict(config)}
    atomic_write_text(directory / "config.json", json.dumps(payload, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
        tmp = f.name
    try:
        save_file(state, tmp, metadata={"kind": kind})
        os.replace(tmp, directory / "model.safetensors")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_pretrained(
    directory: str | Path, config_cls: type[C], *, kind: str
) -> tuple[C, dict[str, torch.Tensor]]:
    """Read a directory written by :func:`save_pretrained`; errors name it and the fix."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a loong model directory: it needs config.json and "
            f"model.safetensors (write one with save_pretrained or `loong ... export`)"
        )
    payload = json.loads(config_path.read_text())
    if payload.get("kind") != kind:
        raise ValueError(f"{directory} holds a {payload.get('kind')!r} model, not a {kind!r} model")
    return config_from_dict(config_cls, payload["config"]), load_file(weights_path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so no half file remains."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
        tmp = f.name
    os.replace(tmp, path)
