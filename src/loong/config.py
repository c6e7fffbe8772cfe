"""Typed configs: dataclasses ↔ dicts, TOML files and ``--set a.b=1`` overrides.

A run's config is resolved as preset → optional TOML file → ``--set`` overrides. Every step
rebuilds the dataclasses, so each ``__post_init__`` validates the final values, unknown keys
are errors that list the keys that exist, and a value of the wrong plain type (``reencode=maybe``
for a bool, ``steps=1.5`` for an int) is an error that names the key and the type it needs.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A nested dataclass → plain dict of JSON/TOML-friendly values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = [config_to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


_PLAIN = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _plain_type_error(hint: Any, value: Any) -> str | None:
    """What a value of a plain field (bool, int, float, str, or one of them or None) must be,
    when ``value`` is not that; None when it fits or the field is not plain."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    plain = [t for t in options if t is not type(None)]
    if len(plain) != 1 or plain[0] not in _PLAIN:
        return None
    kind, optional = plain[0], len(options) == 2
    if value is None and optional:
        return None
    fits = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    return None if fits else _PLAIN[kind]


def config_from_dict(cls: type[C], data: dict[str, Any], *, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``, recursing into nested configs; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(
            f"unknown config key(s) {sorted(where + k for k in unknown)}; "
            f"valid keys here: {sorted(where + k for k in names)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value, where=f"{where}{name}.")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        elif (need := _plain_type_error(hint, value)) is not None:
            raise ValueError(f"{where}{name} must be {need}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(config: C, overrides: dict[str, Any]) -> C:
    """A copy of ``config`` with dotted-key overrides applied, e.g. ``{"optim.lr": 3e-4}``."""
    data = config_to_dict(config)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown config key {key!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
        node[parts[-1]] = value
    return config_from_dict(type(config), data)


def merge_toml(config: C, path: str | Path) -> C:
    """``config`` updated by the (possibly partial, nested) tables of a TOML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with path.open("rb") as f:
        try:
            table = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    return apply_overrides(config, dict(_flatten(table)))


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "data.source=shapes"]`` → ``{"optim.lr": 0.0003, ...}``.

    Values are parsed as TOML values (numbers, booleans, arrays, quoted strings); anything that
    does not parse is taken as a bare string.
    """
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. optim.lr=3e-4), got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def resolve_config(config: C, toml_path: str | Path | None, sets: list[str] | None) -> C:
    """Preset → optional TOML file → ``--set`` overrides."""
    if toml_path is not None:
        config = merge_toml(config, toml_path)
    return apply_overrides(config, parse_set(sets or []))


def config_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), indent=2) + "\n"


def config_differences(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs of one type → (value in a, in b)."""
    left, right = dict(_flatten(config_to_dict(a))), dict(_flatten(config_to_dict(b)))
    return {key: (left[key], right[key]) for key in left if left[key] != right[key]}


def _flatten(table: dict[str, Any], prefix: str = ""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
