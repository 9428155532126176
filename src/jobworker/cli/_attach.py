"""Joining a job (`run -i/-t`, `attach`) or running a command inside one (`exec`): its
output to ours, our input and window size to it.

The input (jobctl's stdin, or the one a front end handed a connection keeper) is read by a
thread, a few chunks ahead at most, so it is read only as fast as the server takes it. The
thread polls beside a wake pipe and is stopped when the command ends: a keeper outlives the
command and must not read on. With a terminal job and a terminal of ours, ours goes into
raw mode for the attach (Ctrl+C, Ctrl+Z and Ctrl+D become keystrokes for the job, as under
ssh) and is always put back: on the job's end, on errors, on a lost connection and on
SIGTERM; SIGWINCH becomes a resize. The detach keys (default Ctrl-P Ctrl-Q, as docker's)
leave the job running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc

from .._text import escape
from .._units import UsageError
from ..api.client import pb
from ._client import CliError, Session, explain
from ._io import Io
from ._render import CANNOT_EXECUTE, JOBCTL_FAILED, NOT_FOUND, exit_status_of

__all__ = ["DETACHED", "attach", "exec_in", "first_done", "parse_detach_keys", "window_of"]

# Ctrl+C (or stdout closing, or the detach keys) while attached: the job goes on, and jobctl
# exits so.
DETACHED = 130


def parse_detach_keys(text: str) -> bytes:
    """docker's notation: comma-separated keys, each "ctrl-X" or one character.

    Raises:
        UsageError: a key that is neither.
    """
    keys = bytearray()
    for key in text.split(","):
        name = key.strip().lower()
        if name.startswith("ctrl-") and len(name) == 6 and "@" <= name[5].upper() <= "_":
            keys.append(ord(name[5].upper()) & 0x1F)
        elif len(key) == 1:
            keys += key.encode()
        else:
            raise UsageError(f"--detach-keys {text!r}: {key!r} is not ctrl-X or a single character")
    return bytes(keys)


async def first_done(
    *aws: Awaitable[object],
) -> tuple[set[asyncio.Task[object]], list[asyncio.Task[object]]]:
    """Run ``aws`` until one is done; cancel the rest. Returns (done, all, in order)."""
    tasks: list[asyncio.Task[object]] = [asyncio.ensure_future(a) for a in aws]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if not task.cancelled():
            # Marked retrieved: the caller looks at what it shielded, not at this wrapper.
            task.exception()
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return done, tasks


class _Outgoing:
    """What an attach or an exec sends after its start, in order: stdin chunks (read by a
    thread, a few ahead at most), window sizes and signals. ``detached`` is set when the
    detach keys are typed. Any: an AttachRequest or an ExecRequest (``request``), which
    share these fields."""

    AHEAD = 4

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        detach_keys: bytes | None,
        request: Callable[..., Any] = pb.AttachRequest,
        in_fd: int = 0,
    ) -> None:
        self.queue: asyncio.Queue[Any | None] = asyncio.Queue()
        self._request = request
        self.detached = asyncio.Event()
        self._slots = threading.Semaphore(self.AHEAD)
        self._loop = loop
        self._keys = detach_keys
        self._in_fd = in_fd
        # The last bytes typed, to find detach keys split across reads.
        self._tail = b""
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._wake_r, self._wake_w = -1, -1

    def read_stdin(self) -> None:
        """Read the input in a thread of its own until its end or :meth:`stop`. The thread
        reads a copy of the descriptor, which it closes itself: a connection keeper closes
        the original once the command is over, and its number may then be reused."""
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        fd = os.dup(self._in_fd)
        self._reader = threading.Thread(target=self._read, args=(fd,), name="jobctl-stdin")
        self._reader.daemon = True
        self._reader.start()

    def stop(self) -> None:
        """End the reader, if one runs, and wait for it: nothing more is read once the
        command is over (a keeper outlives it, and must not read on)."""
        if self._reader is None:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        for _ in range(self.AHEAD):
            self._slots.release()  # it may wait for a slot
        # Prompt: it waits in poll (woken above) or for a slot, or reads what poll said is
        # there. A read of a file that poll cannot watch (a FUSE or network file) might
        # not be: then it is left to end on its own, a daemon thread.
        self._reader.join(5)
        if not self._reader.is_alive():
            os.close(self._wake_r)
        os.close(self._wake_w)
        self._reader = None

    def _read(self, fd: int) -> None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while True:
                self._slots.acquire()
                if self._stopping:
                    return
                poller.poll()
                if self._stopping:
                    return
                try:
                    data = os.read(fd, 256 * 1024)
                except BlockingIOError:
                    # Its file was left non-blocking by another of its holders: poll again.
                    self._slots.release()
                    continue
                except OSError:
                    data = b""
                try:
                    self._loop.call_soon_threadsafe(self._typed, data)
                except RuntimeError:
                    return  # the loop is closed: jobctl is exiting
                if not data:
                    return
        finally:
            os.close(fd)

    def _typed(self, data: bytes) -> None:
        if not data:
            self.queue.put_nowait(self._request(close_stdin=True))
            self.queue.put_nowait(None)
            return
        keys = self._keys
        if keys:
            seen = self._tail + data
            at = seen.find(keys)
            if at >= 0:
                before = seen[len(self._tail) : at] if at >= len(self._tail) else b""
                if before:
                    self.queue.put_nowait(self._request(stdin=before))
                self.detached.set()
                return
            self._tail = seen[-(len(keys) - 1) :] if len(keys) > 1 else b""
        self.queue.put_nowait(self._request(stdin=data))

    def resize(self, rows: int, cols: int) -> None:
        self.queue.put_nowait(self._request(resize=pb.WindowSize(rows=rows, cols=cols)))

    def signal(self, signum: int) -> None:
        self.queue.put_nowait(self._request(signal=signum))

    async def send(self, call: Any) -> None:
        """Write what comes, until stdin's end."""
        while (request := await self.queue.get()) is not None:
            await call.write(request)
            if request.HasField("stdin"):
                self._slots.release()
        await call.done_writing()


def window_of(fd: int) -> pb.WindowSize | None:
    """The size of the terminal on ``fd``; None if it is not one, or says none (0x0, as a
    fresh pseudo-terminal does)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if not (size.lines and size.columns):
        return None
    return pb.WindowSize(rows=size.lines, cols=size.columns)


@contextlib.contextmanager
def _raw(fd: int, loop: asyncio.AbstractEventLoop, outgoing: _Outgoing) -> Iterator[None]:
    """Our terminal in raw mode, its size changes sent on, and everything put back after
    (however the block ends: cancellation by SIGTERM included)."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)

    def winch() -> None:
        size = window_of(fd)
        if size is not None:
            outgoing.resize(size.rows, size.cols)

    loop.add_signal_handler(signal.SIGWINCH, winch)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _receive(call: Any, io: Io) -> pb.Job:
    """An attach's output to ours; the job's final status, its last response."""
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise CliError("the server ended the attach without the job's status")
        if response.HasField("ended"):
            final: pb.Job = response.ended
            return final
        for chunk in response.output.chunks:
            await (io.out(chunk.data) if chunk.stream == pb.STREAM_STDOUT else io.err(chunk.data))


async def attach(  # noqa: PLR0913 - each keyword is one choice of the command line
    s: Session,
    job_id: str,
    io: Io,
    *,
    stdin: bool,
    from_start: bool,
    remove: bool = False,
    detach_keys: bytes | None = None,
) -> int:
    """Join the job: its output to ours and, with ``stdin``, our input to it; exit with its
    status once it ends. Ctrl+C, our stdout closing or the detach keys detach (130); with
    ``remove`` the job is stopped instead and its output drained to the end.

    Raises:
        CliError: the attach failed, or the connection was lost (the job keeps running).
    """
    loop = asyncio.get_running_loop()
    outgoing = _Outgoing(loop, detach_keys, in_fd=io.in_fd)
    terminal = stdin and os.isatty(io.in_fd)
    window = window_of(io.in_fd) if terminal else None
    call = s.stub.Attach()
    try:
        start = pb.AttachStart(id=job_id, stdin=stdin, from_start=from_start, window=window)
        try:
            await _accepted(call, start)
        except grpc.aio.AioRpcError as e:
            if not (from_start and stdin and e.code() is grpc.StatusCode.FAILED_PRECONDITION):
                raise
            # `run` of a command that ended before we joined it: its output and status.
            call.cancel()
            call = s.stub.Attach()
            start.stdin = stdin = False
            await _accepted(call, start)
        raw: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if terminal and (await s.call("GetJob", pb.Job, pb.JobRequest(id=job_id))).stdin == (
            pb.STDIN_MODE_TTY
        ):
            raw = _raw(io.in_fd, loop, outgoing)
        with raw:
            status = await _attached(s, call, job_id, io, outgoing, stdin=stdin, remove=remove)
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.UNAVAILABLE:
            raise CliError(
                f"lost the connection to {s.target.server}; job {job_id} keeps running "
                f"(jobctl attach {job_id[:12]})"
            ) from None
        raise await explain(e, s.target) from None
    finally:
        outgoing.stop()
        call.cancel()
    if status is None:
        await io.say(f"detached; job {job_id} keeps running (jobctl attach {job_id[:12]})\n")
        return DETACHED
    return status


async def _accepted(call: Any, start: pb.AttachStart) -> None:
    """Send the start; return once the server has accepted it (input flows only then, so
    a refusal is the one error the user sees).

    Raises:
        grpc.aio.AioRpcError: the server refused it.
        CliError: the server answered something else.
    """
    await call.write(pb.AttachRequest(start=start))
    first = await call.read()
    if first is grpc.aio.EOF or not first.attached:
        raise CliError("the server did not accept the attach")


async def _attached(  # noqa: PLR0913 - the call and what to do with it
    s: Session, call: Any, job_id: str, io: Io, outgoing: _Outgoing, *, stdin: bool, remove: bool
) -> int | None:
    """The job's exit status once it ends, or None when we detached."""
    if stdin:
        outgoing.read_stdin()
    feeding = asyncio.ensure_future(outgoing.send(call) if stdin else call.done_writing())
    # Its failure (the call ended under a write) shows in the receiving side.
    feeding.add_done_callback(lambda task: task.cancelled() or task.exception())
    receiving = asyncio.ensure_future(_receive(call, io))
    interrupted = asyncio.Event()
    with io.interrupts_to(interrupted.set):
        done, (_, _, _, closed) = await first_done(
            asyncio.shield(receiving),
            interrupted.wait(),
            outgoing.detached.wait(),
            io.out_closed(),
        )
    if receiving.done() and closed not in done:
        feeding.cancel()
        return exit_status_of(receiving.result())
    if not remove:
        call.cancel()
        return None
    feeding.cancel()
    await io.say(f"stopping job {job_id}\n")
    await s.call("StopJob", pb.Job, pb.StopJobRequest(id=job_id), waits=True)
    await receiving
    return DETACHED


async def exec_in(s: Session, start: pb.ExecStart, io: Io) -> int:
    """Run ``start``'s command inside its job: its output to ours and, with
    ``start.stdin``, our input to it; return its exit status (128+N for signal N; 127,
    126 or 125 when it could not start, as `run`). Without a terminal, Ctrl+C sends it
    SIGINT (with one, Ctrl+C is a keystroke for it).

    Raises:
        CliError: the exec was refused, or the connection was lost (which ends it: its
            stdio was this session's).
    """
    loop = asyncio.get_running_loop()
    outgoing = _Outgoing(loop, None, pb.ExecRequest, in_fd=io.in_fd)
    call = s.stub.Exec()
    try:
        await call.write(pb.ExecRequest(start=start))
        first = await call.read()
        if first is grpc.aio.EOF:
            raise CliError("the server ended the exec without a word")
        if first.HasField("ended"):
            return await _ended(first.ended, io)
        terminal = start.tty and start.stdin and os.isatty(io.in_fd)
        raw = _raw(io.in_fd, loop, outgoing) if terminal else contextlib.nullcontext()
        with raw:
            if start.stdin:
                outgoing.read_stdin()
            # Without -i it still sends: Ctrl+C's signal.
            feeding = asyncio.ensure_future(outgoing.send(call))
            feeding.add_done_callback(lambda task: task.cancelled() or task.exception())
            receiving = asyncio.ensure_future(_receive_exec(call, io))
            with io.interrupts_to(lambda: outgoing.signal(signal.SIGINT)):
                await first_done(asyncio.shield(receiving), io.out_closed())
            if not receiving.done():
                # Our stdout has gone: so does the session (the command sees EPIPE).
                receiving.cancel()
                return DETACHED
            return await _ended(receiving.result(), io)
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.UNAVAILABLE:
            raise CliError(
                f"lost the connection to {s.target.server}; the command ran in this session "
                "and has lost its input and output"
            ) from None
        raise await explain(e, s.target) from None
    finally:
        outgoing.stop()
        call.cancel()


async def _receive_exec(call: Any, io: Io) -> Any:
    """An exec's output to ours; how it ended (an ExecEnd), its last response."""
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise CliError("the server ended the exec without its exit status")
        if response.HasField("ended"):
            return response.ended
        for chunk in response.output.chunks:
            await (io.out(chunk.data) if chunk.stream == pb.STREAM_STDOUT else io.err(chunk.data))


async def _ended(end: Any, io: Io) -> int:
    """The exit status for an ExecEnd (saying why it could not start, if it could not)."""
    if end.HasField("exit_code"):
        return int(end.exit_code)
    if end.HasField("signal"):
        return 128 + int(end.signal)
    await io.say(f"jobctl: cannot run it inside the job: {escape(end.error)}\n")
    return {"not_found": NOT_FOUND, "not_executable": CANNOT_EXECUTE}.get(end.reason, JOBCTL_FAILED)
