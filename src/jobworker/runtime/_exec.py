"""A process run inside a running job (``jobctl exec``), as the server holds it.

The job's supervisor forks it (so it is in the job's PID namespace, and ends with the job)
and hands the server its descriptors: a pidfd to signal it, its terminal's master or its
stdin, stdout and stderr pipes, and the control connection its exit status comes back on.
Unlike the job's own output, an exec'd process's output is not logged: it streams to the
one caller, who is the only reader, so a slow caller slows the process (its pipes fill)
and never the server's memory. The process's stdio belongs to the caller's session: when
the server lets go (the caller went away, the server stopped), the process gets EOF on its
stdin, EPIPE on its output and, with a terminal, SIGHUP, as under ssh.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
from typing import Any

from .._aio import wait_fd
from ._errors import LaunchError
from ._logformat import Stream
from ._protocol import ExecExit

__all__ = ["ExecProcess"]

_READ_SIZE = 256 * 1024
# How long output is waited for once the process has exited, when no end of it was seen.
_LINGER_S = 0.5


class ExecProcess:
    """One exec'd process: write its stdin, read its output, resize its terminal, signal
    it, and learn how it ended. Owns every descriptor given; :meth:`close` lets go."""

    def __init__(
        self,
        sock: socket.socket,
        pidfd: int,
        stdin: int,
        outputs: dict[int, Stream],
        *,
        terminal: bool,
    ) -> None:
        self._sock = sock
        self._pidfd = pidfd
        # The pipe's write end, or the terminal's master (also in ``_outputs``); -1: none.
        self._stdin = stdin
        self._outputs = dict(outputs)
        self.terminal = terminal
        for fd in {stdin, *outputs} - {-1}:
            os.set_blocking(fd, False)
        self._lock = asyncio.Lock()
        self._exit: asyncio.Future[int] | None = None

    @property
    def reads_input(self) -> bool:
        return self._stdin >= 0

    async def write(self, data: bytes) -> bool:
        """Write all of ``data`` to its stdin, waiting while the pipe is full; False once it
        no longer reads (closed its stdin, or exited): the rest is dropped."""
        async with self._lock:
            view = memoryview(data)
            while view and self._stdin >= 0:
                try:
                    view = view[os.write(self._stdin, view) :]
                except BlockingIOError:
                    await wait_fd(self._stdin, write=True)
                except OSError:  # EPIPE, or EIO from a terminal whose process is gone
                    return False
            return not view

    async def close_stdin(self) -> None:
        """EOF on its stdin (a terminal has none to send: Ctrl+D is a keystroke there)."""
        async with self._lock:
            if not self.terminal and self._stdin >= 0:
                os.close(self._stdin)
                self._stdin = -1

    def resize(self, rows: int, cols: int) -> None:
        """Its terminal's new size (the kernel sends SIGWINCH); nothing without one."""
        if self.terminal and self._stdin >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._stdin, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to it (only it: the job's other processes are not touched)."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)

    async def read(self) -> tuple[Stream, bytes] | None:
        """Its next output, as it comes; None once there is no more: every output closed,
        or the process has exited and no more came for a moment (a child it left behind
        holding its output does not keep the exec going)."""
        while self._outputs:
            for fd, stream in list(self._outputs.items()):
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the terminal's other ends have all closed
                    data = b""
                if data:
                    return stream, data
                self._drop(fd)
            if not self._outputs:
                return None
            if not self.exited:
                await self._readable()
                continue
            # It has exited: what it wrote last may still be on its way (a terminal hands
            # output on from a kernel work queue), so wait for the end of its output, but
            # not for a child it left holding it.
            try:
                async with asyncio.timeout(_LINGER_S):
                    await self._readable()
            except TimeoutError:
                return None
        return None

    @property
    def exited(self) -> bool:
        return self._exit is not None and self._exit.done()

    async def _readable(self) -> None:
        """Until an output is readable, or the process exits (if it has not yet)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        for fd in self._outputs:
            loop.add_reader(fd, wake)
        waits: set[asyncio.Future[Any]] = {ready}  # Any: a None future and an int one
        if not self.exited:
            waits.add(asyncio.ensure_future(self.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fd in self._outputs:
                loop.remove_reader(fd)
            for waiting in waits:
                if not waiting.done():
                    waiting.cancel()
                elif not waiting.cancelled():
                    waiting.exception()  # retrieved; wait() raises it again to its caller

    async def wait(self) -> int:
        """Its status as ``os.waitstatus_to_exitcode`` gives it (negative: that signal).

        Raises:
            LaunchError: the supervisor went away without saying (it was killed).
        """
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._read_exit())
        return await asyncio.shield(self._exit)

    async def _read_exit(self) -> int:
        loop = asyncio.get_running_loop()
        data = b""
        while not data.endswith(b"\n"):
            chunk = await loop.sock_recv(self._sock, 64)
            if not chunk:
                break
            data += chunk
        ended = ExecExit.decode(data)
        if ended is None:
            raise LaunchError("the job's supervisor went away; the process's status is unknown")
        return ended.status

    def _drop(self, fd: int) -> None:
        del self._outputs[fd]
        if fd != self._stdin:
            os.close(fd)

    def close(self) -> None:
        """Let go of everything (it sees EOF, EPIPE or a hang-up, as when ssh goes)."""
        if self._exit is not None and not self._exit.done():
            self._exit.cancel()
        for fd in {self._stdin, *self._outputs} - {-1}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stdin = -1
        self._outputs.clear()
        self._sock.close()
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        self._pidfd = -1
