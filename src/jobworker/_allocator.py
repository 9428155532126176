"""glibc malloc settings for processes that move output through big buffers.

Output travels in messages of up to a few MiB, each a fresh ``bytes`` object (gRPC takes
ownership of what it sends). glibc serves allocations that big with a fresh ``mmap`` and
returns them with ``munmap``, or trims freed heap back to the kernel, so every message paid
for page faults and page zeroing: that was the biggest single cost in the server's profile
while streaming. Pinning both thresholds keeps such buffers in the heap for reuse. Measured
(docs/benchmarks.md (i)): 700 -> 900 MB/s streamed, server CPU 0.57 -> 0.40 s per 512 MiB.

There is no Python API for this, hence ctypes.
"""

from __future__ import annotations

import ctypes

__all__ = ["keep_large_buffers", "release_free_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Two malloc arenas, not glibc's eight per core: each thread that allocates gets an arena
# of its own, up to that maximum, and what gRPC's threads and the log readers leave in
# theirs stays fragmented there. After 1,000 followers had gone, four thread arenas still
# held 20 MiB each even after malloc_trim; with two, 11 MiB was left over idle in all
# (docs/benchmarks.md (q)).
_ARENAS = 2
# glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD = 32 << 20
# Keep up to this much freed memory at the top of a heap rather than giving it back.
_TRIM_THRESHOLD = 128 << 20


def keep_large_buffers() -> bool:
    """Make glibc reuse freed multi-MiB buffers instead of unmapping them; call it once at
    start-up, before threads exist. Returns False where the C library is not glibc."""
    # The C library the interpreter itself is linked with.
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return (
        bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
        and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        and bool(mallopt(_M_ARENA_MAX, _ARENAS))
    )


def release_free_memory() -> None:
    """Hand the free pages of every malloc arena back to the kernel (glibc's
    ``malloc_trim(0)``), e.g. once the streams that used them have ended: with the
    thresholds above, glibc itself never would, and the server kept 7.2 GB after 1,000
    followers had gone (issue 15). Takes the arenas' locks, so it may take some
    milliseconds: call it from a worker thread. Nothing where the C library is not glibc.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        trim(0)
