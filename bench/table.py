"""What every benchmark script shares: a table row, a percentile, a scratch directory."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


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


_SCRATCH: list[Path] = []


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A directory for one part's servers and jobs, deleted when the benchmark process
    exits rather than when the part ends.

    This host's root is ext4 without a journal. There, a file created within a minute of
    many deletions in its block group (six minutes while the inode table is unwritten)
    steps over every inode they freed: 0.8-0.9 ms a create, against 0.02-0.04 ms, measured
    here. A part that deleted the 10,000 job directories of its state made the next
    parts' starts and stops pay for it (docs/benchmarks.md, "The tenth session").
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        _SCRATCH.append(path)


@atexit.register
def _remove_scratch() -> None:
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)
