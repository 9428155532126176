"""Where a jobctl command writes, and how Ctrl+C reaches it.

A command runs either in the jobctl process itself, writing to its own stdout and stderr,
or in the connection keeper (``_control``), writing to the descriptors a jobctl front end
passed it. There, many commands share one event loop, so writes go through a thread of
their own: a terminal or pipe that is slow to drain stalls only its own command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import stat
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import concurrent.futures


__all__ = ["Io"]


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Io:
    """One command's output (``out_fd``, ``err_fd``), its input (``in_fd``, read by
    ``run -i`` and the like), what it knows of the terminal (``out_tty``, ``columns``),
    ``NO_COLOR``, and its interrupt handler."""

    def __init__(  # noqa: PLR0913 - one per field
        self,
        out_fd: int = 1,
        err_fd: int = 2,
        *,
        out_tty: bool = False,
        columns: int | None = None,
        no_color: bool = False,
        writer: concurrent.futures.ThreadPoolExecutor | None = None,
        progress: Callable[[str, int], None] | None = None,
        in_fd: int = 0,
    ) -> None:
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.in_fd = in_fd
        self.out_tty = out_tty
        self.columns = columns
        self.no_color = no_color
        # A thread for writes, in the connection keeper; None writes directly.
        self.writer = writer
        # In a keeper: told how far a follow has got (job id, log offset), after its
        # output was written, so the front end can go on from there without the keeper.
        self.progress = progress or (lambda _job, _offset: None)
        self._on_interrupt: Callable[[], object] = lambda: None

    @classmethod
    def here(cls) -> Io:
        """This process's own stdout and stderr."""
        tty = os.isatty(1)
        columns = None
        if tty:
            with contextlib.suppress(OSError):
                columns = os.get_terminal_size(1).columns
        return cls(1, 2, out_tty=tty, columns=columns, no_color="NO_COLOR" in os.environ)

    async def out(self, data: bytes | memoryview) -> None:
        await self._write(self.out_fd, data)

    async def err(self, data: bytes | memoryview) -> None:
        await self._write(self.err_fd, data)

    async def say(self, text: str) -> None:
        """A line for the user, on stderr."""
        await self.err(text.encode())

    async def _write(self, fd: int, data: bytes | memoryview) -> None:
        if self.writer is None:
            _write_all(fd, data)
        else:
            await asyncio.get_running_loop().run_in_executor(self.writer, _write_all, fd, data)

    async def out_closed(self) -> None:
        """Return once nobody reads our stdout any more (``jobctl run ... | head -2`` after
        head exits); never for a terminal or a file, which cannot close under us.

        The kernel reports a pipe or socket whose reader has gone as POLLERR/POLLHUP on our
        end, with no write needed. The poll blocks in a thread of its own (not the loop's
        shared executor, which a keeper running many commands would run out of), woken by
        a pipe of ours when the caller stops waiting.
        """
        try:
            mode = os.fstat(self.out_fd).st_mode
        except OSError:
            return
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            await asyncio.Event().wait()
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)

        def done() -> None:
            if not closed.done():
                closed.set_result(None)

        def watch() -> None:
            try:
                poller = select.poll()
                poller.register(self.out_fd, 0)  # only errors and hang-ups are wanted
                poller.register(wake_r, select.POLLIN)
                poller.poll()
            finally:
                os.close(wake_r)
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(done)

        threading.Thread(target=watch, name="jobctl-stdout", daemon=True).start()
        try:
            await closed
        finally:
            with contextlib.suppress(OSError):  # the thread is done and wake_r closed
                os.write(wake_w, b"x")
            os.close(wake_w)

    def interrupt(self) -> None:
        """Ctrl+C: whatever the command is doing decides (see :meth:`interrupts_to`)."""
        self._on_interrupt()

    @contextlib.contextmanager
    def interrupts_to(self, handler: Callable[[], object]) -> Iterator[None]:
        """Send Ctrl+C to ``handler`` while inside (``run`` detaches on it)."""
        previous, self._on_interrupt = self._on_interrupt, handler
        try:
            yield
        finally:
            self._on_interrupt = previous
