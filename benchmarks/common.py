"""Helpers the benchmark scripts share: the machine's CPU name, and a network guard."""

from __future__ import annotations

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


def block_network(name: str) -> None:
    """Make every outgoing connection fail loudly: a benchmark must need no download."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{name}: a network connection was attempted: {args!r}")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
