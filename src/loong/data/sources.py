"""What a data ``source`` string names: the shapes world, WebDataset tar shards, or a video folder.

The one rule, shared by tokenizer training (``data.source``) and ``loong lm tokenize``
(``source``):

- ``"shapes"``: the procedural shapes world;
- WebDataset tar shards: a path ending in ``.tar`` (one shard), a brace pattern
  (``data/train-{000000..000009}.tar``, expanded like the shell and webdataset do), or a folder
  with ``.tar`` files directly in it (its ``*.tar`` files, sorted; subfolders are not searched);
- anything else: a folder of videos (and images), searched recursively.

Nothing here needs the ``webdataset`` package, so resolving a source costs no optional import.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

SourceKind = Literal["shapes", "shards", "folder"]

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def source_kind(source: str) -> SourceKind:
    """Which kind of data ``source`` names (see the module docstring); checks no files."""
    if source == "shapes":
        return "shapes"
    folder = Path(source)
    if folder.is_dir():
        return "shards" if any(folder.glob("*.tar")) else "folder"
    if source.endswith(".tar") or _BRACES.search(source):
        return "shards"
    return "folder"


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern spells, in order: ``{a,b}`` lists and ``{007..010}`` numeric
    ranges (zero-padded to the width of the first bound), nested and repeated."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        first, last = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1)) if numbers.group(1).startswith("0") else 0
        step = 1 if last >= first else -1
        choices = [f"{n:0{width}d}" for n in range(first, last + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(
            f"cannot expand {{{body}}} in {pattern!r}: write {{first..last}} or {{a,b,c}}"
        )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def shard_files(source: str | Path) -> list[Path]:
    """The tar files a shards source names (a ``.tar`` path, a brace pattern, or a folder with
    ``.tar`` files in it), all checked to exist."""
    text = str(source)
    folder = Path(text)
    if folder.is_dir():
        paths = sorted(folder.glob("*.tar"))
        if not paths:
            raise ValueError(f"no .tar shards in {folder}: write them with write_shards")
    else:
        paths = [Path(name) for name in expand_braces(text)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"shards not found: {', '.join(missing[:3])}{more}; check the path")
    not_tar = [str(p) for p in paths if p.suffix != ".tar"]
    if not_tar:
        raise ValueError(f"not .tar shards: {', '.join(not_tar[:3])}; pass .tar files")
    return paths
