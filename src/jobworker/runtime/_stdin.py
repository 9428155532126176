"""A job's standard input as the server holds it (stdin "pipe", or a terminal's master).

The pipe's write end belongs to the job's supervisor, so the job's stdin stays open while no
server runs; the server asks for a descriptor of it on the first write (after a restart too)
and writes to it without blocking the event loop. Writes from every attached client go in
one at a time, whole, in the order they arrive. A job that never reads fills the pipe: the
writer then waits, and so does the client behind it (gRPC flow control), while output and
stop carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios

from .._aio import wait_fd
from ._errors import JobEndedError
from ._launch import SupervisorHandle
from ._protocol import Control, Verb

__all__ = ["StdinPipe"]


class StdinPipe:
    """The server's side of one job's stdin pipe."""

    def __init__(self) -> None:
        self._fd = -1
        self._lock = asyncio.Lock()
        self.closed = False

    async def write(self, supervisor: SupervisorHandle, data: bytes) -> bool:
        """Write all of ``data``, waiting while the pipe is full; False if nobody reads the
        pipe any more (the job closed its stdin, or ended): the rest is dropped, as ssh
        drops input to a command that stopped reading.

        Raises:
            JobEndedError: the job's stdin was closed (EOF sent), or the job has ended.
            LaunchError: the supervisor did not answer.
        """
        async with self._lock:
            fd = await self._open(supervisor)
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await wait_fd(fd, write=True)
                except OSError as e:
                    # EPIPE: nobody reads the pipe; EIO: a terminal whose processes are
                    # all gone (the job is ending). Anything else is not ours to hide.
                    if e.errno not in (errno.EPIPE, errno.EIO):
                        raise
                    return False
            return True

    async def _open(self, supervisor: SupervisorHandle) -> int:
        """Our descriptor, asked of the supervisor the first time.

        Raises:
            JobEndedError: the job's stdin was closed (EOF sent), or it has ended.
        """
        if self.closed:
            raise JobEndedError("the job's stdin was closed (EOF was sent)")
        if self._fd < 0:
            fd = await supervisor.stdin_fd()
            os.set_blocking(fd, False)
            self._fd = fd
        return self._fd

    async def resize(
        self, supervisor: SupervisorHandle, rows: int, cols: int, *, redraw: bool = False
    ) -> None:
        """Give a terminal job's terminal this size (the kernel sends SIGWINCH to its
        foreground processes on a change). ``redraw``: change it twice, so a program that
        redraws on SIGWINCH shows its screen even if the size is the same (as docker's
        attach does).

        Raises:
            JobEndedError: the job has ended.
        """
        async with self._lock:
            fd = await self._open(supervisor)
            sizes = [(rows, cols)] if not redraw else [(rows + 1, cols + 1), (rows, cols)]
            for r, c in sizes:
                fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", r, c, 0, 0))

    async def close(self, supervisor: SupervisorHandle) -> None:
        """Send EOF: let go of our descriptor and have the supervisor let go of its own
        (after any write under way).

        Raises:
            LaunchError: the supervisor did not answer.
        """
        async with self._lock:
            self.closed = True
            self.release()
            await supervisor.command(Control(Verb.CLOSE_STDIN, 0))

    def release(self) -> None:
        """Close our descriptor (the job has ended, or the runtime closes)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
