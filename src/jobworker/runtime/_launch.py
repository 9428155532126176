"""The server's side of the launch path: the launcher process and each job's supervisor.

This is the only place the server talks to job processes: it asks the launcher to start a
job, then steers the job's supervisor through its control socket and watches it through a
pidfd, never through a bare pid that could be reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from .._aio import wait_fd
from ._errors import ExecFailedError, JobEndedError, LaunchError
from ._exec import ExecProcess
from ._jobdir import CONTROL, CorruptRecordError, ExitRecord, RunRecord
from ._logformat import Stream
from ._protocol import (
    MAX_ORDER_BYTES,
    Control,
    ExecOrder,
    LaunchOrder,
    NextJob,
    Outcome,
    Reply,
    Report,
    Verb,
)

__all__ = ["LaunchFailed", "Launched", "Launcher", "SupervisorHandle"]


@dataclass(frozen=True, slots=True)
class Launched:
    run: RunRecord
    supervisor: SupervisorHandle


@dataclass(frozen=True, slots=True)
class LaunchFailed:
    """The command could not be started; ``error`` is the reason, for the user."""

    error: str
    exit: ExitRecord | None


class SupervisorHandle:
    """A running job's supervisor: a pidfd to watch it end, and its control socket.

    ``kept`` is a connection to the supervisor made with the launch (None for a job
    restored after a restart): requests without descriptors go over it, one at a time,
    instead of a connection each (a connect under a 1,000-stop storm cost 0.3 ms of the
    event loop's time). Requests that pass descriptors, or keep their connection (exec),
    connect to the control socket.
    """

    def __init__(self, job_dir: str, pidfd: int, kept: socket.socket | None = None) -> None:
        self._job_dir = job_dir
        self._pidfd = pidfd
        self._kept = kept
        self._kept_lock = asyncio.Lock()
        self._released = False

    async def wait(self) -> None:
        """Return once the supervisor process has exited."""
        await wait_fd(self._pidfd)

    def kill(self) -> None:
        """SIGKILL the supervisor; the kernel then kills every process of its PID namespace."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        for fd in self.release():
            os.close(fd)

    def release(self) -> list[int]:
        """The descriptors this handle holds, now the caller's to close (in a worker
        thread, say: closing a dead process's pidfd can take the event loop a while).

        A kept connection with a request under way is not among them: that request owns
        it until it ends (at once once the supervisor is gone: its end of the connection
        closed with it), and closes it then. Taking its descriptor from under it would
        leave the event loop watching a number the next socket may get.
        """
        self._released = True
        fds = [self._pidfd] if self._pidfd >= 0 else []
        self._pidfd = -1
        if self._kept is not None and not self._kept_lock.locked():
            fds.append(self._kept.detach())
            self._kept = None
        return fds

    async def command(self, request: Control, timeout: float = 5.0) -> Reply:
        """Send one control request; return the reply (ENDED if the job has ended).

        Raises:
            LaunchError: the supervisor did not answer within ``timeout`` seconds.
        """
        if self._kept is None:
            reply, fds = await self.exchange(request, timeout)
            for fd in fds:
                os.close(fd)
            return reply
        async with self._kept_lock:
            kept = self._kept
            if kept is None:  # closed while this request waited for the lock
                return Reply(Outcome.ENDED)
            try:
                async with asyncio.timeout(timeout):
                    return await _kept_exchange(kept, request)
            except TimeoutError:
                # A late reply would answer the next request: this connection is done.
                self._drop_kept()
                raise LaunchError(
                    f"the job's supervisor did not answer {request.verb.value} in time"
                ) from None
            except OSError:
                self._drop_kept()
                return Reply(Outcome.ENDED)  # the supervisor closed it on the way out
            finally:
                if self._released:
                    self._drop_kept()

    def _drop_kept(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None

    async def stdin_fd(self, timeout: float = 5.0) -> int:
        """A descriptor of the write end of the job's stdin pipe (the caller owns it).

        Raises:
            JobEndedError: the job has ended, or its stdin was closed.
            LaunchError: the supervisor did not answer within ``timeout`` seconds.
        """
        reply, fds = await self.exchange(Control(Verb.STDIN, 0), timeout)
        if reply.outcome is Outcome.OK and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        if reply.outcome is Outcome.ENDED:
            raise JobEndedError("the job has ended: its stdin is closed")
        raise JobEndedError(reply.detail or "the job's stdin is closed")

    async def exchange(self, request: Control, timeout: float) -> tuple[Reply, list[int]]:
        """One control request; its reply and the descriptors passed with it.

        Raises:
            LaunchError: the supervisor did not answer within ``timeout`` seconds.
        """
        sock, reply, fds = await self._ask(request, timeout)
        sock.close()
        return reply, fds

    async def exec(self, order: ExecOrder, timeout: float = 10.0) -> ExecProcess:
        """Start ``order`` inside the running job.

        Raises:
            JobEndedError: the job has ended (or is ending).
            ExecFailedError: the process could not be started (the reason is the user's).
            LaunchError: the supervisor did not answer within ``timeout`` seconds.
        """
        sock, reply, fds = await self._ask(Control(Verb.EXEC, order=order), timeout)
        want = 2 if order.tty else (4 if order.stdin else 3)
        if reply.outcome is not Outcome.OK or len(fds) != want:
            sock.close()
            for fd in fds:
                os.close(fd)
            if reply.outcome is Outcome.ENDED:
                raise JobEndedError("the job has ended: nothing can be run inside it")
            reason, _, message = reply.detail.partition(" ")
            raise ExecFailedError(message or reply.detail, reason)
        if order.tty:
            pidfd, master = fds
            return ExecProcess(sock, pidfd, master, {master: Stream.STDOUT}, terminal=True)
        pidfd, *pipes = fds
        stdin = pipes.pop(0) if order.stdin else -1
        out, err = pipes
        return ExecProcess(
            sock, pidfd, stdin, {out: Stream.STDOUT, err: Stream.STDERR}, terminal=False
        )

    async def _ask(
        self, request: Control, timeout: float
    ) -> tuple[socket.socket, Reply, list[int]]:
        """Send ``request``; the connection (still open), the reply and its descriptors."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        # Reach the socket through an fd of its directory: an AF_UNIX path is limited to 108
        # bytes, a state dir path is not.
        dir_fd = os.open(self._job_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, f"/proc/self/fd/{dir_fd}/{CONTROL}")
                await loop.sock_sendall(sock, request.encode())
                while True:
                    try:
                        reply, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
                        break
                    except BlockingIOError:
                        await wait_fd(sock.fileno())
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            sock.close()
            return sock, Reply(Outcome.ENDED), []  # the supervisor closed it on the way out
        except TimeoutError:
            sock.close()
            raise LaunchError(
                f"the job's supervisor did not answer {request.verb.value} in time"
            ) from None
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(dir_fd)
        return sock, Reply.decode(reply), fds


async def _kept_exchange(sock: socket.socket, request: Control) -> Reply:
    """One request and its reply (a line) over a kept connection.

    Raises:
        OSError: the connection closed (the supervisor ended) or failed.
    """
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request.encode())
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionResetError("the supervisor closed its connection")
        reply += chunk
    return Reply.decode(reply)


class Launcher:
    """The launcher process (see ``_launcher``), started once per runtime."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._send_lock = asyncio.Lock()

    @classmethod
    def spawn(
        cls, seccomp_bpf: bytes = b"", spare: tuple[str, tuple[str, ...]] | None = None
    ) -> Launcher:
        """Start the launcher process, handing it the jobs' seccomp program (if any), and
        where to build sandboxed roots ahead and what they hide (``_spare``; None: no spares).

        Raises:
            LaunchError: it could not be started.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # subprocess forks and execs in C with nothing in between, which is safe even in
            # a threaded process: no Python runs in the child before exec, and no shell.
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jobworker.runtime._launcher",
                    str(theirs.fileno()),
                    seccomp_bpf.hex(),
                    *([json.dumps({"at": spare[0], "hide": spare[1]})] if spare else []),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError as e:
            ours.close()
            raise LaunchError(f"cannot start the launcher process: {e}") from e
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(proc, ours)

    async def launch(self, order: LaunchOrder, timeout: float) -> Launched | LaunchFailed:
        """Start the job in ``order.job_dir`` (its spec.json written); return once exec is
        done.

        Raises:
            LaunchError: the launcher is gone, or the supervisor did not report in time.
        """
        msg = order.encode()
        if len(msg) > MAX_ORDER_BYTES:
            # Seven paths within PATH_MAX fit, so this is a guard, not a limit anyone meets.
            # Cut short, an order could name a parent cgroup: refuse it whole.
            raise LaunchError(
                f"the job's launch order is {len(msg)} bytes, over the {MAX_ORDER_BYTES} the "
                "launcher reads"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        try:
            try:
                await self._send(msg, theirs.fileno())
            finally:
                theirs.close()
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        msg, fds, _flags, _addr = socket.recv_fds(ours, 65536, 2)
                        break
                    except BlockingIOError:
                        await wait_fd(ours.fileno())
        except TimeoutError:
            raise LaunchError(f"the job's supervisor did not report within {timeout:g} s") from None
        except OSError as e:
            raise LaunchError(f"cannot reach the launcher: {e}") from e
        finally:
            ours.close()
        return _outcome(order.job_dir, msg, fds)

    async def next_job(self, job: NextJob) -> None:
        """Name the next job created with its start, its cgroup made: its command's
        process is forked there ahead of it.

        Raises:
            OSError: the launcher is gone.
        """
        await self._send(job.encode(), None)

    async def _send(self, msg: bytes, fd: int | None) -> None:
        # The socket's queue is short (net.unix.max_dgram_qlen, often 10), so a burst of
        # launches must wait for room; and an event loop keeps one writer callback per fd,
        # so only one sender may wait at a time.
        async with self._send_lock:
            while True:
                try:
                    socket.send_fds(self._sock, [msg], [] if fd is None else [fd])
                except BlockingIOError:
                    await wait_fd(self._sock.fileno(), write=True)
                else:
                    return

    async def close(self, *, jobs_running: bool) -> None:
        """Close the launcher's socket; reap the launcher unless jobs still run.

        The launcher stays alive while supervisors it started still run (it reaps them), so a
        runtime closed with jobs running leaves it behind on purpose.
        """
        self._sock.close()
        if not jobs_running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._proc.wait, 5.0)


def _outcome(job_dir: str, msg: bytes, fds: list[int]) -> Launched | LaunchFailed:
    """What a launch report says; takes ownership of ``fds``.

    Raises:
        LaunchError: no report (the launcher or supervisor died), or a malformed one.
    """
    report = None
    try:
        if not msg:
            raise LaunchError("the launcher or the job's supervisor died before reporting")
        report = Report.decode(msg)
    except CorruptRecordError as e:
        raise LaunchError(f"the job's supervisor sent a bad report: {e}") from e
    finally:
        if report is None or report.run is None or len(fds) != 2:
            for fd in fds:
                os.close(fd)
    if report.run is not None and len(fds) == 2:
        kept = socket.socket(fileno=fds[1])
        kept.setblocking(False)
        return Launched(report.run, SupervisorHandle(job_dir, fds[0], kept))
    if report.exit is not None:
        return LaunchFailed(report.exit.error or "the command could not start", report.exit)
    return LaunchFailed(report.error or "unknown launch error", None)
