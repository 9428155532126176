"""A job's usage over time: samples of its cgroup, kept on disk with the job, bounded.

Each sample is a fixed 48-byte record in ``usage.bin``, appended as it is taken. CPU time
and IO bytes are the cgroup's running totals (a rate is the difference between two points);
memory and pids are what they were at that moment. At most :data:`MAX_POINTS` are kept: when
the file is full, its older half is merged pairwise (each pair keeps the later totals and
the larger memory and pids, so a peak, an OOM kill's run-up, is never averaged away), so a
week-long job sampled every second keeps a few thousand points, finest where they are
newest.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["MAX_POINTS", "USAGE", "Sample", "UsageHistory", "merge_pairs", "thin"]

USAGE = "usage.bin"
MAX_POINTS = 4096
_RECORD = struct.Struct("<qdQQQI4x")


class Sample(NamedTuple):
    """One look at a job's cgroup."""

    time_ns: int
    cpu_seconds: float
    memory_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    pids: int

    def encode(self) -> bytes:
        return _RECORD.pack(*self)

    @classmethod
    def decode(cls, data: bytes | memoryview, at: int = 0) -> Sample:
        return cls(*_RECORD.unpack_from(data, at))


def merge_pairs(samples: list[Sample]) -> list[Sample]:
    """Every two samples as one: the later one's time and totals, the larger memory and
    pids of the two (an odd last one stays as it is)."""
    merged = []
    for i in range(0, len(samples) - 1, 2):
        a, b = samples[i], samples[i + 1]
        merged.append(
            b._replace(memory_bytes=max(a.memory_bytes, b.memory_bytes), pids=max(a.pids, b.pids))
        )
    if len(samples) % 2:
        merged.append(samples[-1])
    return merged


def thin(samples: Iterable[Sample], since_ns: int = 0, step_ns: int = 0) -> list[Sample]:
    """The samples after ``since_ns``, at most one per ``step_ns`` (0: all): each kept one
    carries the largest memory and pids of those it stands for."""
    kept: list[Sample] = []
    for sample in samples:
        if sample.time_ns <= since_ns:
            continue
        if kept and step_ns and sample.time_ns - kept[-1].time_ns < step_ns:
            last = kept[-1]
            kept[-1] = sample._replace(
                time_ns=last.time_ns,
                memory_bytes=max(last.memory_bytes, sample.memory_bytes),
                pids=max(last.pids, sample.pids),
            )
            continue
        kept.append(sample)
    return kept


class UsageHistory:
    """One job's ``usage.bin`` in its directory. Appends come from one sampler at a time;
    readers read the file (a torn last record is left out)."""

    def __init__(self, directory: str) -> None:
        self._path = os.path.join(directory, USAGE)

    def samples(self) -> list[Sample]:
        """Every sample kept, oldest first ([] before the first)."""
        return self.read_from(0)[0]

    def read_from(self, offset: int) -> tuple[list[Sample], int]:
        """The samples from byte ``offset`` on, and the offset to read from next time (a
        follower reads only what is new; after a compaction, which shrinks the file, it
        reads it all again: the caller drops what it has seen by time)."""
        try:
            with open(self._path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:
                    offset = 0
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], 0
        whole = len(data) - len(data) % _RECORD.size
        return [Sample.decode(data, at) for at in range(0, whole, _RECORD.size)], offset + whole

    def append(self, sample: Sample) -> None:
        """Keep ``sample``; when the file is full, merge its older half first.

        Raises:
            OSError: the file could not be written (e.g. the disk is full).
        """
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size >= MAX_POINTS * _RECORD.size:
                os.close(fd)
                fd = -1
                self._compact()
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            os.write(fd, sample.encode())
        finally:
            if fd >= 0:
                os.close(fd)

    def _compact(self) -> None:
        samples = self.samples()
        half = len(samples) // 2
        kept = merge_pairs(samples[:half]) + samples[half:]
        tmp = f"{self._path}.tmp"
        try:
            with open(tmp, "wb", opener=_private) as f:
                f.write(b"".join(s.encode() for s in kept))
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)
