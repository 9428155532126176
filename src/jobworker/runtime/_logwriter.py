"""The supervisor's side of the output log: append framed records, up to the output cap.

A write that fails (ENOSPC, EIO) cuts the torn record off, so readers never see half a frame,
notes the truncation in a SYSTEM record where it still fits, and drops further output while
the job runs on. Past the per-job output cap the same happens with a note saying so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

from ._jobdir import LOG
from ._logformat import HEADER, MAGIC, Stream

__all__ = ["LogWriter"]


class LogWriter:
    """The job's ``output.log``, opened for appending in the job directory ``dir_fd``."""

    def __init__(self, dir_fd: int, output_limit: int) -> None:
        self._fd = os.open(
            LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
        self._size = os.fstat(self._fd).st_size
        if self._size == 0:
            os.write(self._fd, MAGIC)
            self._size = len(MAGIC)
        self._limit = output_limit
        self._written = 0
        self.truncated = False

    def _append(self, stream: Stream, data: memoryview | bytes) -> bool:
        header = HEADER.pack(len(data), stream, time.time_ns())
        want = len(header) + len(data)
        try:
            done = os.writev(self._fd, [header, data])
        except OSError as e:
            done, err = 0, e
        else:
            if done == want:
                self._size += done
                return True
            err = OSError(errno.ENOSPC, "short write")
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)
        self.truncated = True
        self._note(f"writing the log failed: {err.strerror}")
        return False

    def _note(self, why: str) -> None:
        """A SYSTEM record saying the output was truncated, if it still fits on disk."""
        data = f"[jobworker] output truncated: {why}\n".encode()
        header = HEADER.pack(len(data), Stream.SYSTEM, time.time_ns())
        with contextlib.suppress(OSError):
            if os.writev(self._fd, [header, data]) == len(header) + len(data):
                self._size += len(header) + len(data)

    def write(self, stream: Stream, data: memoryview) -> None:
        """Log ``data`` as one record of ``stream`` (or drop it once truncated)."""
        if self.truncated:
            return  # the caller keeps draining the pipe so the job never blocks
        room = self._limit - self._written
        if len(data) > room:
            if room > 0:
                self._append(stream, data[:room])
            self._written = self._limit
            self.truncated = True
            self._note(
                f"the job wrote more than the {self._limit} byte output limit; "
                "the rest is discarded"
            )
            return
        if self._append(stream, data):
            self._written += len(data)

    def close(self) -> None:
        # No fsync: it would flush everything the job wrote (up to the cap) before the job
        # could be reported as ended. Records are length-framed, so a tail lost to a power
        # failure reads as a torn record and is ignored; the exit record is durable.
        os.close(self._fd)
