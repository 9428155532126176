"""What every benchmark script shares: a table row and a percentile."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Row:
    """One figure: ours, its anchor measured in the same run, the ratio and the target."""

    name: str
    ours: str
    anchor: str
    ratio: str
    target: str
    ok: bool


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    """ "p50 / p99 ms" of samples in seconds."""
    return f"{pct(values, 0.5) * 1e3:.2f} / {pct(values, 0.99) * 1e3:.2f} ms"


def pipe_rate(argv: list[str], size: int, env: dict[str, str] | None = None) -> float:
    """MB/s at which ``argv``'s stdout (``size`` bytes) is read from a pipe in 1 MiB reads."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    buf = bytearray(1 << 20)
    got = 0
    while n := os.readv(proc.stdout.fileno(), [buf]):
        got += n
    proc.wait()
    assert got == size
    return size / (time.perf_counter() - t0) / 1e6
