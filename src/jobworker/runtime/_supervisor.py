"""The job's supervisor: PID 1 of the job's PID namespace, one small process per job.

It is forked from the launcher (never from the threaded server), so plain Python between fork
and exec is safe here. It:

- forks the user's command as PID 2 (the pre-exec step is ``_preexec``), or, as a standby,
  has forked it ahead and tells it to go (:class:`Ahead`), and reports exec success or the
  OS error back;
- copies both pipes into the framed output log from the first byte (``_logwriter``);
- reaps every process of the namespace, so no zombie is left;
- serves stop and signal requests on ``control.sock`` (``_protocol``): ``kill(-1, sig)`` from
  PID 1 reaches every process of the namespace, including ones that called setsid or
  double-forked;
- when the command exits, SIGKILLs whatever it left behind (container semantics), so a
  grandchild holding the pipe open cannot keep the job alive;
- writes ``exit.json`` after the last output byte is in the log.

Its own phase is an explicit state machine (:class:`Phase`), changed only by ``_enter``.
It lives outside the server, so the server can die (even SIGKILL) without the job losing
output or its exit status.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import mmap
import os
import select
import signal
import socket
import time
from typing import NamedTuple, NoReturn

from .._peer import peer_uid
from ._jobdir import (
    CONTROL,
    EXIT,
    RUN,
    ExitRecord,
    RunRecord,
    reserve,
    start_ticks,
    write_atomic,
    write_json_atomic,
)
from ._logformat import Stream
from ._logwriter import LogWriter
from ._preexec import (
    ExecError,
    await_job,
    exec_command,
    exec_in_job,
    fork_in_cgroup,
    go_message,
)
from ._protocol import (
    DEFAULT_GRACE_S,
    MAX_CONTROL_BYTES,
    Control,
    ExecExit,
    ExecOrder,
    LaunchOrder,
    NextJob,
    Outcome,
    Reply,
    Report,
    Verb,
)
from ._spare import Spare

__all__ = ["Ahead", "Phase", "fork_ahead", "run_supervisor"]

# 1 MiB pipes and reads: the design notes measured 1.1-1.7 GB/s into the log this way against
# 0.4-0.9 GB/s with the default 64 KiB.
PIPE_SIZE = 1 << 20
READ_SIZE = 1 << 20
_CLOSE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Phase(enum.Enum):
    """Where the supervisor is:

    ``SPAWNING`` (forking the command) -> ``RUNNING`` -> ``STOPPING`` (SIGTERM sent, SIGKILL
    armed for the grace's end) -> ``DRAINING`` (the command has exited: leftovers killed,
    pipes drained, children reaped) -> ``DONE``. A command that exits without a stop goes
    from ``RUNNING`` to ``DRAINING``; one that cannot start, from ``SPAWNING`` to ``DONE``.
    """

    SPAWNING = "spawning"
    RUNNING = "running"
    STOPPING = "stopping"
    DRAINING = "draining"
    DONE = "done"


_NEXT = {
    Phase.SPAWNING: {Phase.RUNNING, Phase.DONE},
    Phase.RUNNING: {Phase.STOPPING, Phase.DRAINING},
    Phase.STOPPING: {Phase.DRAINING},
    Phase.DRAINING: {Phase.DONE},
    Phase.DONE: set(),
}


def _has_children() -> bool:
    """Whether any process is left in the job's PID namespace. Each one descends from
    us, its PID 1, and orphans come to us: none is left once we have no child. Asked
    before ``kill(-1)``, which walks every process of the host (the kernel keeps no list
    of a namespace's); in 1,000 stops at once, those walks took 2% of the CPU."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


class _Supervisor:
    def __init__(self, order: LaunchOrder, report: socket.socket, spare: Spare | None) -> None:
        # Every name below is relative, which also keeps the socket path short; and the
        # processes it forks find spec.json here.
        os.chdir(order.job_dir)
        self.dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.report: socket.socket | None = report
        # All the supervisor knows of its job: spec.json is read by the processes it forks,
        # whose copies of what they parse go at exec (see LaunchOrder).
        self.order = order
        # Before any output can fill the disk: the job's end must be recordable regardless.
        reserve(self.dir_fd, EXIT)
        self.log = LogWriter(self.dir_fd, order.output_limit)
        # Anonymous mmap, not bytearray: CPython zero-fills a bytearray, making all of it
        # resident at once; mmap pages cost nothing until output actually arrives, which
        # keeps an idle job's supervisor small.
        self.buf = mmap.mmap(-1, READ_SIZE)
        self.view = memoryview(self.buf)
        self.phase = Phase.SPAWNING
        # The phase the command's exit found us in: decides "exited" or "stopped".
        self.ended_in = Phase.SPAWNING
        self.cmd_pid = 0
        self.cmd_status: int | None = None
        # When STOPPING turns into SIGKILL for every process (monotonic seconds).
        self.kill_at: float | None = None
        # When the job's timeout stops it (monotonic seconds; None: it has none). Kept
        # here, not in the server, so it holds while no server runs.
        self.timeout_at: float | None = None
        # Why a stop began: "stop" (asked for) or "timeout".
        self.stop_reason = "stop"
        # The write end of the command's stdin pipe (stdin "pipe"), held here so the job's
        # stdin stays open while no server runs; -1 once closed (or with no pipe).
        self.stdin_w = -1
        # A terminal job's master: its output is read from it, and input written to it.
        self.tty_master = -1
        # Processes run inside the job (``jobctl exec``), by pid: the connection each one's
        # exit status goes back on.
        self.execs: dict[int, socket.socket] = {}
        # The connection the server that launched us keeps for its requests (its end went
        # with the launch report), serving any number of them in turn: a stop or signal
        # then costs no connect (a tenth of a 1,000-stop storm's event loop, issue 15).
        # A restarted server connects to the control socket per request instead.
        self.kept: socket.socket | None = None
        # The sandboxed root the launcher built ahead (``_spare``): the command takes it if
        # it fits the job.
        self.spare = spare

    def _enter(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise AssertionError(f"supervisor cannot go from {self.phase} to {phase}")
        self.phase = phase

    # ---------------------------------------------------------------- the command
    def spawn(self, ahead: Ahead | None) -> dict[int, Stream]:
        """Fork and exec the command (or take the one ``ahead``, already told to go);
        return the descriptors its output is read from (its stdout and stderr pipes, or
        its terminal's master), each with its stream.

        Raises:
            ExecError: the command could not be started (the text names the OS error).
        """
        if ahead is not None:
            self.cmd_pid = ahead.pid
            return self._started(ahead.status, ahead.out_r, ahead.err_r)
        (out_r, out_w), (err_r, err_w) = _big_pipe(), _big_pipe()
        in_r = None
        if self.order.stdin_mode == "pipe":
            in_r, self.stdin_w = _big_pipe()
        # The child reports on it: an error ("E"), its terminal's master ("T", passed
        # alongside), and EOF once exec succeeded (it is CLOEXEC).
        status, status_w = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        pid, born = fork_in_cgroup(self.order.unified)
        if pid == 0:
            exec_command(
                (out_w, err_w),
                status_w.fileno(),
                born_in_unified=born,
                stdin=in_r,
                spare=self.spare,
            )
        if self.spare is not None:
            self.spare.close()
            self.spare = None
        os.close(out_w)
        os.close(err_w)
        status_w.close()
        if in_r is not None:
            os.close(in_r)
        self.cmd_pid = pid
        return self._started(status, out_r, err_r)

    def _started(self, status: socket.socket, out_r: int, err_r: int) -> dict[int, Stream]:
        error = self._read_status(status)
        if error is not None:
            pid = self.cmd_pid
            os.waitpid(pid, 0)
            os.close(out_r)
            os.close(err_r)
            if self.tty_master >= 0:
                os.close(self.tty_master)
            raise error
        self._enter(Phase.RUNNING)
        if self.order.timeout_s is not None:
            self.timeout_at = time.monotonic() + self.order.timeout_s
        if self.tty_master >= 0:
            # Nothing is written to the pipes of a terminal job: its output is the master's.
            os.close(out_r)
            os.close(err_r)
            return {self.tty_master: Stream.STDOUT}
        return {out_r: Stream.STDOUT, err_r: Stream.STDERR}

    def _read_status(self, status: socket.socket) -> ExecError | None:
        """What the command reported before exec (its terminal's master is kept); None when
        exec succeeded."""
        error, self.tty_master = _child_status(status)
        return error

    # ---------------------------------------------------------------- exec
    def exec_process(self, order: ExecOrder) -> tuple[Reply, list[int]]:
        """Fork a process running ``order`` inside the job (it is ours, so it is in the
        job's PID namespace already, and ``kill(-1)`` ends it with the job). The reply
        passes a pidfd of it, then its terminal's master or its three pipes; the caller
        owns those (ours are closed once sent). Its pid is in ``reply.detail``."""
        if self.phase is not Phase.RUNNING:
            return Reply(Outcome.ENDED), []  # stopping: it would start only to be killed
        try:
            job_pidfd = os.pidfd_open(self.cmd_pid)
        except OSError:
            return Reply(Outcome.ENDED), []
        (out_r, out_w), (err_r, err_w) = _big_pipe(), _big_pipe()
        in_r, in_w = _big_pipe() if order.stdin and not order.tty else (None, -1)
        status, status_w = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        pid, born = fork_in_cgroup(self.order.unified)
        if pid == 0:
            exec_in_job(
                order,
                stdio=(in_r, out_w, err_w),
                status_w=status_w.fileno(),
                job_pidfd=job_pidfd,
                born_in_unified=born,
            )
        for fd in (out_w, err_w, job_pidfd, *(() if in_r is None else (in_r,))):
            os.close(fd)
        status_w.close()
        error, master = _child_status(status)
        ours = [out_r, err_r, *(() if in_w < 0 else (in_w,))]
        if error is not None:
            # The child exits 127 at once; reap() collects it (it is no exec of ours).
            for fd in ours:
                os.close(fd)
            return Reply(Outcome.ERROR, f"{error.reason} {error}"), []
        pidfd = os.pidfd_open(pid)
        if master >= 0:
            for fd in ours:
                os.close(fd)  # a terminal is all three
            return Reply(Outcome.OK, str(pid)), [pidfd, master]
        return Reply(Outcome.OK, str(pid)), [pidfd, in_w, out_r, err_r] if in_w >= 0 else [
            pidfd,
            out_r,
            err_r,
        ]

    # ---------------------------------------------------------------- signals and stop
    def _kill_all(self, sig: int) -> None:
        # From PID 1 of a PID namespace, kill(-1) reaches every other process in it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, sig)

    def request_stop(self, grace: float, reason: str = "stop") -> Outcome:
        """SIGTERM everything now, SIGKILL after ``grace``; a second request can only bring
        the deadline closer. ``reason`` is the job's, if this begins the stop."""
        if self.phase not in (Phase.RUNNING, Phase.STOPPING):
            return Outcome.ENDED
        deadline = time.monotonic() + max(grace, 0.0)
        if self.phase is Phase.RUNNING:
            self.stop_reason = reason
            self.timeout_at = None
            self._enter(Phase.STOPPING)
            self._kill_all(signal.SIGTERM)
            self.kill_at = deadline
        elif self.kill_at is not None:
            self.kill_at = min(self.kill_at, deadline)
        self._check_deadline()
        return Outcome.OK

    def _check_deadline(self) -> None:
        if self.timeout_at is not None and time.monotonic() >= self.timeout_at:
            grace = self.order.stop_grace
            self.request_stop(DEFAULT_GRACE_S if grace is None else grace, "timeout")
        if (
            self.phase is Phase.STOPPING
            and self.kill_at is not None
            and time.monotonic() >= self.kill_at
        ):
            self.kill_at = None
            self._kill_all(signal.SIGKILL)

    def reap(self) -> bool:
        """Reap what has exited; False once no child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            conn = self.execs.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(ExecExit(os.waitstatus_to_exitcode(status)).encode())
                conn.close()
            if pid == self.cmd_pid and self.phase in (Phase.RUNNING, Phase.STOPPING):
                self.cmd_status = status
                self.ended_in = self.phase
                self.kill_at = self.timeout_at = None
                self._enter(Phase.DRAINING)
                self.close_stdin()
                # The command is the job: once it is gone, so is everything it left behind.
                if _has_children():
                    self._kill_all(signal.SIGKILL)

    # ---------------------------------------------------------------- control socket
    def handle(self, request: Control) -> tuple[Reply, list[int]]:
        """The reply to ``request``, and the descriptors to pass with it."""
        if request.verb is Verb.STOP:
            return Reply(self.request_stop(request.value)), []
        if self.phase not in (Phase.RUNNING, Phase.STOPPING):
            return Reply(Outcome.ENDED), []
        if request.verb is Verb.STDIN:
            fd = self.tty_master if self.tty_master >= 0 else self.stdin_w
            if fd < 0:
                return Reply(Outcome.ERROR, "the job's stdin is closed"), []
            return Reply(Outcome.OK), [fd]
        if request.verb is Verb.EXEC and request.order is not None:
            return self.exec_process(request.order)
        if request.verb is Verb.CLOSE_STDIN:
            self.close_stdin()  # a terminal has no EOF to send: Ctrl+D is a keystroke
        else:
            self._kill_all(int(request.value))
        return Reply(Outcome.OK), []

    def close_stdin(self) -> None:
        if self.stdin_w >= 0:
            os.close(self.stdin_w)
            self.stdin_w = -1

    # ---------------------------------------------------------------- reporting
    def send_report(self, report: Report, fds: list[int]) -> None:
        if self.report is None:
            return
        # The server may be gone (restarted); the job goes on regardless.
        with contextlib.suppress(OSError):
            socket.send_fds(self.report, [report.encode()], fds)
        self.report.close()
        self.report = None

    def finish(self, error: ExecError | None) -> NoReturn:
        """Record how the job ended (after its last output byte), tell the server, exit."""
        reason: str | None = None
        if error is not None:
            state, exit_code, sig, reason = "failed", None, None, error.reason
        else:
            # The one place exited-vs-stopped is decided: a command that ended while a stop
            # was under way was stopped, whatever its status.
            state = "stopped" if self.ended_in is Phase.STOPPING else "exited"
            if state == "stopped":
                reason = self.stop_reason
            exit_code = sig = None
            if self.cmd_status is not None:
                code = os.waitstatus_to_exitcode(self.cmd_status)
                exit_code, sig = (code, None) if code >= 0 else (None, -code)
        self._enter(Phase.DONE)
        record = ExitRecord(
            state=state,
            exit_code=exit_code,
            signal=sig,
            error=str(error) if error is not None else None,
            ended_ns=time.time_ns(),
            output_truncated=self.log.truncated,
            reason=reason,
        )
        self.log.close()
        write_json_atomic(self.dir_fd, EXIT, record.to_json(), durable=True)
        # control.sock stays, dead (a connect is refused, which callers take as the end),
        # and goes with the job's directory. Unlinking it freed an inode per job end, and
        # ext4 without a journal makes every file created in that block group for the next
        # minute (six, until the inode table is written back) step over each such inode:
        # in 1,000 stops at once, creating each final.json took about 1 ms
        # (docs/benchmarks.md, (s)).
        self.send_report(Report(exit=record, error=record.error), [])
        os._exit(0)

    # ---------------------------------------------------------------- main loop
    def serve(self, streams: dict[int, Stream], wakeup_r: int, listener: socket.socket) -> None:
        poller = select.poll()
        kept = [] if self.kept is None else [self.kept]
        conns = {c.fileno(): (c, bytearray()) for c in kept}
        for fd in (*streams, wakeup_r, listener.fileno(), *conns):
            poller.register(fd, select.POLLIN)
        children_left = self.reap()
        while streams or children_left:
            timeout = None
            deadlines = [t for t in (self.kill_at, self.timeout_at) if t is not None]
            if deadlines:
                timeout = max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)
            for fd, _events in poller.poll(timeout):
                if fd in streams:
                    self._pump(fd, streams, poller)
                elif fd == wakeup_r:
                    children_left = self._on_signals(os.read(wakeup_r, 512))
                elif fd == listener.fileno():
                    self._accept(listener, poller, conns)
                elif fd in conns:
                    self._serve_conn(fd, poller, conns)
            self._check_deadline()
        for conn in [*(c for c, _ in conns.values()), *self.execs.values(), listener]:
            conn.close()

    def _pump(self, fd: int, streams: dict[int, Stream], poller: select.poll) -> None:
        try:
            n = os.readv(fd, [self.buf])
        except BlockingIOError:
            return  # the server made the terminal's master non-blocking; nothing yet
        except OSError:
            # EIO: a terminal's every other end has closed (its processes are gone).
            n = 0
        if n:
            self.log.write(streams[fd], self.view[:n])
        else:
            poller.unregister(fd)
            os.close(fd)
            del streams[fd]
            if fd == self.tty_master:
                self.tty_master = -1

    def _on_signals(self, signums: bytes) -> bool:
        for signum in signums:
            if signum in _CLOSE_SIGNALS:
                self.request_stop(DEFAULT_GRACE_S)
        return self.reap()

    def _accept(
        self,
        listener: socket.socket,
        poller: select.poll,
        conns: dict[int, tuple[socket.socket, bytearray]],
    ) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        # The job dir is 0700, but check the peer too: only our own uid may steer the job.
        if peer_uid(conn) != os.geteuid():
            conn.close()
            return
        conn.setblocking(False)
        conns[conn.fileno()] = (conn, bytearray())
        poller.register(conn.fileno(), select.POLLIN)

    def _serve_conn(
        self, fd: int, poller: select.poll, conns: dict[int, tuple[socket.socket, bytearray]]
    ) -> None:
        conn, buf = conns[fd]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        kept = conn is self.kept
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            exec_kept = self._answer(conn, line, kept=kept)
            if not kept:
                # One request per connection, except the server's kept one.
                poller.unregister(fd)
                del conns[fd]
                if not exec_kept:
                    conn.close()
                return
        if not data or len(buf) > MAX_CONTROL_BYTES:
            poller.unregister(fd)
            del conns[fd]
            conn.close()
            if kept:
                self.kept = None

    def _answer(self, conn: socket.socket, line: bytes, *, kept: bool) -> bool:
        """Reply to the request ``line``; True if ``conn`` now carries an exec'd process's
        exit status (then it stays open, and is no longer a request connection)."""
        fds: list[int] = []
        request: Control | None
        try:
            request = Control.decode(line)
            if kept and request.verb is Verb.EXEC:
                # Its exit status needs a connection of its own.
                request, reply = None, Reply(Outcome.ERROR, "exec takes a connection of its own")
            else:
                reply, fds = self.handle(request)
        except (ValueError, OSError) as e:
            request, reply = None, Reply(Outcome.ERROR, str(e))
        is_exec = request is not None and request.verb is Verb.EXEC
        try:
            conn.setblocking(True)
            socket.send_fds(conn, [reply.encode()], fds)
        except OSError:
            pass  # the server went away; an exec'd process runs on, unheard
        finally:
            if is_exec:
                for passed in fds:
                    os.close(passed)  # the server has them now
        if is_exec and reply.outcome is Outcome.OK:
            # Kept open: the process's exit status goes back on it.
            self.execs[int(reply.detail)] = conn
            return True
        return False


def _child_status(status: socket.socket) -> tuple[ExecError | None, int]:
    """What a child reported on ``status`` before exec: an error (None when exec
    succeeded), and the master of the terminal it opened (-1: none)."""
    master = -1
    with status:
        while True:
            message, fds, _flags, _addr = socket.recv_fds(status, 65536, 1)
            if message.startswith(b"T") and fds:
                master = fds[0]
                continue
            for fd in fds:
                os.close(fd)
            if not message.startswith(b"E"):
                return None, master
            if master >= 0:
                os.close(master)
                master = -1
            reason, _, text = message[1:].partition(b"\n")
            return ExecError(text.decode("utf-8", "replace"), reason.decode()), master


def _big_pipe() -> tuple[int, int]:
    """A pipe of PIPE_SIZE (or the default, above /proc/sys/fs/pipe-max-size)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end


def _noop(_signum: int, _frame: object) -> None:
    """A Python-level handler, so the signal reaches the wakeup fd (and PID 1 receives it)."""


def _first_child(host_pid: int) -> int:
    """The host pid of our first child (the command), 0 if it cannot be read."""
    try:
        fd = os.open(f"/proc/{host_pid}/task/{host_pid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        children = os.read(fd, 4096).split()
    finally:
        os.close(fd)
    return int(children[0]) if children else 0


class Ahead(NamedTuple):
    """The command's process of the next job, forked ahead of it by a standby
    (:func:`fork_ahead`), with the supervisor's ends of its go socket, exec-status socket
    and output pipes."""

    pid: int
    go: socket.socket
    status: socket.socket
    out_r: int
    err_r: int

    def discard(self) -> None:
        """End it unused, and reap it: a child left would pass for the job's command
        (``_first_child``). The next process forked in our PID namespace is then PID 2
        again, as the job's command always is."""
        for sock in (self.go, self.status):
            sock.close()
        os.close(self.out_r)
        os.close(self.err_r)
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            # A child may already be reaped (the launcher's SIGCHLD is still ignored).
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            # The kernel hands out the pid after the last one it gave in the namespace
            # (ours: the writer's); where this write is refused, the command is PID 3.
            with contextlib.suppress(OSError):
                fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY)
                try:
                    os.write(fd, b"1")
                finally:
                    os.close(fd)


def fork_ahead(job: NextJob, where: tuple[str, tuple[str, ...]] | None) -> Ahead | None:
    """In a standby: fork the next job's command process into its cgroups, to wait for
    it (``_preexec.await_job``); ``where`` the launcher's spare roots. None if it cannot
    be forked, or not born in the job's cgroup v2 directory (joining it later would take
    the kernel's global lock that ``CgroupPaths.join_files`` avoids): the job's
    supervisor then forks it."""
    (out_r, out_w), (err_r, err_w) = _big_pipe(), _big_pipe()
    status, status_w = socket.socketpair(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
    )
    go, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    cgroup = job.cgroup
    unified = (cgroup.unified or "") if cgroup is not None else ""
    try:
        pid, born = fork_in_cgroup(unified)
    except OSError:
        pid = -1
    if pid == 0:
        if unified and not born:
            os._exit(1)
        joins = () if cgroup is None else cgroup.join_files(born_in_unified=born)
        await_job((out_w, err_w), status_w.fileno(), theirs, where, joins)
    os.close(out_w)
    os.close(err_w)
    status_w.close()
    theirs.close()
    ahead = Ahead(pid, go, status, out_r, err_r)
    if pid < 0:
        ahead.discard()
        return None
    return ahead


def _go(ahead: Ahead, order: LaunchOrder, spare: Spare | None) -> int | None:
    """Tell the process forked ahead to run the job; return the write end of the job's
    stdin pipe (-1: none), or None if it is gone (then it is discarded)."""
    in_r, in_w = _big_pipe() if order.stdin_mode == "pipe" else (-1, -1)
    fds = [*(() if in_r < 0 else (in_r,)), *(() if spare is None else spare.namespaces)]
    try:
        socket.send_fds(ahead.go, [go_message(order.job_dir, stdin=in_r >= 0)], fds)
    except OSError:
        ahead.discard()
        if in_r >= 0:
            os.close(in_r)
            os.close(in_w)
        return None
    ahead.go.close()
    if in_r >= 0:
        os.close(in_r)
    return in_w


def run_supervisor(
    order: bytes, report: socket.socket, spare: Spare | None, ahead: Ahead | None = None
) -> NoReturn:
    """Run the job a :class:`LaunchOrder` (encoded) names as PID 1 of a fresh PID namespace,
    its root on ``spare`` if that fits the job. Never returns.

    Raises:
        ValueError: ``order`` is not a launch order.
    """
    wakeup_r, wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    for signum in (signal.SIGCHLD, *_CLOSE_SIGNALS):
        signal.signal(signum, _noop)
    launch = LaunchOrder.decode(order)
    # Told first (the launcher hands a standby only the job it forked for): it sets
    # itself up while we do.
    stdin_w = None if ahead is None else _go(ahead, launch, spare)
    if stdin_w is None:
        ahead = None
    elif spare is not None:
        spare.close()
        spare = None
    sup = _Supervisor(launch, report, spare)
    if stdin_w is not None:
        sup.stdin_w = stdin_w
    with contextlib.suppress(FileNotFoundError):
        os.unlink(CONTROL)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(CONTROL)
    os.chmod(CONTROL, 0o600)
    listener.listen(16)
    listener.setblocking(False)
    try:
        streams = sup.spawn(ahead)
    except ExecError as e:
        sup.finish(e)
    # /proc is still the host's here, so it names our host pid, which the server needs.
    host_pid = int(os.readlink("/proc/self"))
    run = RunRecord(
        supervisor_pid=host_pid,
        supervisor_start_ticks=start_ticks(f"/proc/{host_pid}"),
        pid=_first_child(host_pid),
        started_ns=time.time_ns(),
    )
    write_atomic(sup.dir_fd, RUN, run.json_bytes(), durable=False)
    # pidfd_open resolves pids in our own namespace, where we are 1.
    pidfd = os.pidfd_open(1)
    sup.kept, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sup.send_report(Report(run=run), [pidfd, theirs.fileno()])
    os.close(pidfd)
    theirs.close()
    sup.serve(streams, wakeup_r, listener)
    sup.finish(None)
