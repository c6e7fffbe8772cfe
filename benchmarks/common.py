"""Helpers the benchmark scripts share: the machine's CPU name and versions, a JSON writer and
a network guard."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_threads() -> int:
    """The threads a benchmark uses unless told: ``OMP_NUM_THREADS`` when it is set (so that
    ``OMP_NUM_THREADS=1`` runs two benchmarks side by side on two cores without each taking
    both, which slows each several times over), else every core this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


THREADS_HELP = "torch threads (default: OMP_NUM_THREADS if set, else every core)"


def block_network(name: str) -> None:
    """Make every outgoing connection fail loudly: a benchmark must need no download."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{name}: a network connection was attempted: {args!r}")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]


def machine() -> dict[str, object]:
    """When and where a benchmark ran: date, CPU, torch's threads, torch and Python versions."""
    import torch

    return {
        "date": dt.datetime.now().isoformat(timespec="minutes"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_json(path: Path | None, result: dict[str, object]) -> None:
    """Write ``result`` to ``path`` (its folder made), if a path was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
