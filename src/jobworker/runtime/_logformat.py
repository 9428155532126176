"""The on-disk format of a job's output log.

One file per job, a sequence of records, each a 16-byte header followed by ``length`` bytes of
raw output, so the log is binary-safe and keeps the order in which the supervisor read the
stdout and stderr pipes. Separate and merged views, and timestamps, all come from this one file
(the same idea as the CRI log format, without text escaping).

The file starts with an 8-byte magic so a future format can be told apart.
"""

from __future__ import annotations

import enum
import struct

__all__ = ["HEADER", "MAGIC", "Stream"]

MAGIC = b"JWLOG\x00\x01\n"

# little-endian: u32 length, u8 stream, 3 pad bytes, u64 wall-clock time in ns.
HEADER = struct.Struct("<IB3xQ")


class Stream(enum.IntEnum):
    """Where a chunk of output came from. SYSTEM is a note from jobworker (e.g. truncation)."""

    STDOUT = 1
    STDERR = 2
    SYSTEM = 3
