"""A job's standard input as the server holds it (stdin "pipe").

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
import os

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
            if self.closed:
                raise JobEndedError("the job's stdin was closed (EOF was sent)")
            if self._fd < 0:
                fd = await supervisor.stdin_fd()
                os.set_blocking(fd, False)
                self._fd = fd
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except BlockingIOError:
                    await wait_fd(self._fd, write=True)
                except BrokenPipeError:
                    return False
            return True

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
