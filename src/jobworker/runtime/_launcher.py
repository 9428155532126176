"""The launcher process: single-threaded, it forks one supervisor per job.

The server runs threads (gRPC), and forking a threaded process is unsafe, so the server starts
this process once, before any thread exists, with ``subprocess`` (fork+exec in C, no Python in
between). Each launch request carries a launch order (``_protocol.LaunchOrder``: the job
directory, and what the supervisor needs) and one end of a report socket. The
launcher forks each job's supervisor straight into a PID namespace of its own, as its PID 1
(``clone3(CLONE_NEWPID)``): each job costs one process, and one fork. The fork is made ahead
of the job: one supervisor waits, forked and set up, for the next launch order (``_Standby``).

Supervisors are the launcher's children, and it ignores SIGCHLD, so the kernel reaps each
as it ends: none becomes a zombie, even when the host's PID 1 does not reap. When the
server goes away, the launcher stays until its last supervisor has ended, then exits.

It also keeps a sandboxed root built ahead for the next job, when asked to (``_spare``).

Run as ``python -m jobworker.runtime._launcher FD [SECCOMP_BPF_HEX [SPARE_JSON]]``: the
seccomp program (empty: none), and where to build spare roots and what they hide (JSON
``{"at": DIR, "hide": [PATH, ...]}``; absent: no spares).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import json
import os
import select
import signal
import socket
import sys
import time
from typing import NoReturn

from ._jobdir import ExitRecord, RunRecord, start_ticks
from ._linux import CLONE_NEWPID, clone3, close_all_but
from ._logformat import HEADER, Stream
from ._preexec import set_seccomp_filter, warm_up
from ._protocol import MAX_ORDER_BYTES, Control, LaunchOrder, NextJob, Reply, Report
from ._rootfs import plan_tree
from ._spare import NAMESPACES, Spare, SpareRoots
from ._supervisor import Ahead, fork_ahead, run_supervisor

__all__ = ["main"]

# After the standby took its job, the standby and the spare root are replaced when the
# server names its next job (``NextJob``), which it does once the launched job has settled
# (``_lifecycle``): replaced sooner, they competed with that job's start for both CPUs
# (docs/benchmarks.md, the fourteenth session). If the server names none (the next job's
# cgroup could not be made), they are replaced this long after the launch: later than the
# server's wait for a job to settle (30 ms).
_REFILL_AFTER = 0.05
# After a launch that forked its own supervisor (a job started that was not the next job,
# one of a burst), no ``NextJob`` follows (the next job named stays), and the spare it took
# is replaced this long after it: during the job's own start, before its output, which a
# later refill slowed (100 followers of a job started so: p99 9.0-11.4 ms, against 8.0-9.5
# refilled at once; docs/benchmarks.md, the fourteenth session).
_REFILL_SOON = 0.001


class _Served(enum.Enum):
    """What a message from the server came to."""

    GONE = enum.auto()  # the server is gone
    NOTHING_TAKEN = enum.auto()  # no standby or spare taken (a next job named: refilled)
    HANDED = enum.auto()  # a launch, handed to the standby
    FORKED = enum.auto()  # a launch that forked its supervisor (or failed to)


def _send_error(report: socket.socket, message: str) -> None:
    with contextlib.suppress(OSError):
        report.send(Report(error=message).encode())


def _detach(server: socket.socket, *keep: int) -> None:
    """In a forked child: nothing of the launcher's stays open (the server's socket, the
    spare root being built, the mount table watch) but ``keep``; stdio on /dev/null; a
    session of its own."""
    server.detach()
    close_all_but(*keep)
    # Supervisors outlive the server: they must not hold its stdio pipes open.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.setsid()  # the job must not get the terminal's Ctrl+C aimed at the server


def _supervisor_main(
    server: socket.socket, order: bytes, report: socket.socket, spare: Spare | None
) -> NoReturn:
    """In the forked child, PID 1 of its PID namespace: become the job's supervisor (on
    the spare root, if any)."""
    try:
        _detach(server, report.fileno(), *(spare.namespaces if spare is not None else ()))
    except BaseException as e:  # noqa: BLE001 - any failure must reach the server as a report
        _send_error(report, f"cannot start the job's supervisor: {e}")
        os._exit(1)
    _run(order, report, spare)


def _run(
    order: bytes, report: socket.socket, spare: Spare | None, ahead: Ahead | None = None
) -> NoReturn:
    try:
        run_supervisor(order, report, spare, ahead)
    except BaseException as e:  # noqa: BLE001 - any failure must reach the server as a report
        _send_error(report, f"job supervisor failed: {e!r}")
    os._exit(1)


# CPython 3.11 rewrites a function's bytecode in place ("quickening") after 8 calls, which
# dirties the page of its code object in whichever process does it.
_QUICKENED_AFTER = 8


def _warm_up(rounds: int = 2 * _QUICKENED_AFTER) -> None:
    """Run the library code every supervisor (or the command it forks, which parses the
    job's spec) runs, ``rounds`` times. In the launcher, until it is quickened, so that
    what it creates on first use (caches, interned strings, specialised bytecode) exists
    before forking and stays shared instead of being copied into each process (measured:
    docs/benchmarks.md (d)). In a standby, once: the pages it writes are copied then,
    before its job comes, not during the launch."""
    order = LaunchOrder("/x", 1, "none", None, 1.0, "/x").encode()
    for _ in range(rounds):
        LaunchOrder.decode(order)
        record = ExitRecord("exited", 0, None, None, time.time_ns(), output_truncated=False)
        ExitRecord.from_json(json.loads(json.dumps(record.to_json())))
        paths = warm_up().cgroup
        if paths is not None:
            _ = paths.join_files(born_in_unified=True)
        Report(run=RunRecord(1, 1, 1, 1)).encode()
        Reply.decode(Control.decode(b"stop 1.0").encode())
        start_ticks("/proc/self")
        HEADER.pack(0, Stream.STDOUT, time.time_ns())
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b, contextlib.suppress(OSError):
            a.setblocking(False)
            select.poll().register(a.fileno(), select.POLLIN)
            socket.send_fds(a, [b"{}"], [b.fileno()])
            for fd in socket.recv_fds(b, 64, 1)[1]:
                os.close(fd)


def _prepare() -> None:
    """Have the kernel reap every supervisor, ignore the server's signals, take the
    seccomp program, warm up and freeze what every supervisor will share."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # A signal aimed at the server's process group (Ctrl+C, `timeout`, a terminal hangup)
    # must not take the launcher down with it: its supervisors would then be orphaned to a
    # PID 1 that may not reap. It exits when the server's socket closes instead.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # The seccomp program, built by the server (hex in argv): building it here would load
    # libseccomp and its binding into the process every supervisor is forked from, which
    # measured +0.4 MiB per idle job (docs/benchmarks.md (d)).
    if len(sys.argv) > 2 and sys.argv[2]:
        set_seccomp_filter(bytes.fromhex(sys.argv[2]))
    _warm_up()
    # Made once here, shared by every job on the host's root (see _rootfs._trees).
    with contextlib.suppress(OSError):
        plan_tree("/")
    # Everything imported so far is shared copy-on-write with every supervisor; freezing keeps
    # the garbage collector from touching (and so copying) those pages in each of them.
    gc.freeze()


def _spares(poller: select.poll) -> SpareRoots | None:
    if len(sys.argv) <= 3:
        return None
    where = json.loads(sys.argv[3])
    return SpareRoots(where["at"], tuple(where["hide"]), poller)


class _Standby:
    """A supervisor forked ahead of its job, waiting for its launch order.

    Forking the supervisor was the largest step of a launch the job's own order does not
    decide (docs/benchmarks.md (h)): the fork itself, and the copy-on-write faults of the
    child's first steps. A standby takes both before the order comes: it is forked into
    its PID namespace, lets go of the launcher's descriptors and runs the supervisor's
    code once, then blocks on its channel. A launch hands it the order, the report
    socket and the spare's namespaces there. One is kept at most, and the next is forked
    only once one was taken: when the server names its next job, or after the launch
    (``_REFILL_AFTER``, ``_REFILL_SOON``).

    The server names its next job ahead (``NextJob``: the id the next job created with its
    start takes, and its cgroup, made already); the standby then forks that job's command
    process too, in the job's cgroups, where it waits for the job (``fork_ahead``). Such a
    standby is that job's: another job's launch forks its own supervisor, as without a
    standby, and the standby goes on waiting."""

    def __init__(self, spares: SpareRoots | None) -> None:
        self._spares = spares
        self._channel: socket.socket | None = None
        # The server's next job, until an order launches it.
        self._next: NextJob | None = None
        # The next job the waiting standby has forked a command for (None: none).
        self._bound: NextJob | None = None

    def refill(self, server: socket.socket) -> None:
        """Fork a standby, unless one is waiting. A failed fork leaves none: the next
        launch forks its supervisor itself."""
        if self._channel is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = clone3(CLONE_NEWPID)
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:
            _standby_main(server, theirs, self._spares, self._next)
        theirs.close()
        self._channel = ours
        self._bound = self._next

    def next_job(self, job: NextJob) -> None:
        """The server's next job: the waiting standby forks its command ahead (and lets
        go of the one it forked for the job named before)."""
        self._next = job
        if self._channel is not None:
            try:
                self._channel.send(job.encode())
            except OSError:
                self.close()  # gone (killed): the next launch forks, the refill after it
            else:
                self._bound = job

    def hand(self, order: bytes, report: socket.socket, spare: Spare | None) -> bool:
        """Give a job to the standby; False if none is waiting (or it is gone: killed,
        say) or it waits for another job, and the caller forks the supervisor itself."""
        try:
            job_dir = LaunchOrder.decode(order).job_dir
        except ValueError:
            job_dir = ""  # the supervisor reports it
        if self._next is not None and self._next.launched_by(job_dir):
            self._next = None
        if self._bound is not None and not self._bound.launched_by(job_dir):
            return False
        channel, self._channel = self._channel, None
        self._bound = None
        if channel is None:
            return False
        with channel:
            fds = [report.fileno(), *(spare.namespaces if spare is not None else ())]
            try:
                socket.send_fds(channel, [order], fds)
            except OSError:
                return False
        return True

    def close(self) -> None:
        """Let a waiting standby go: it exits when its channel closes."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._bound = None


def _standby_main(
    server: socket.socket,
    channel: socket.socket,
    spares: SpareRoots | None,
    next_job: NextJob | None,
) -> NoReturn:
    """In the forked child, PID 1 of its PID namespace: wait for a job, then become its
    supervisor; exit if the launcher lets go first. Each next job named meanwhile (the
    launcher's ``next_job`` when forking, then any sent) gets its command forked ahead."""
    where = None if spares is None else spares.where
    ahead: Ahead | None = None
    try:
        _detach(server, channel.fileno())
        while True:
            if next_job is not None:
                if ahead is not None:
                    ahead.discard()
                ahead = fork_ahead(next_job, where)
            # Take the first steps' copy-on-write faults now, not in the launch; again
            # after each fork ahead, which shares our pages with that process anew.
            _warm_up(1)
            msg, fds, _flags, _addr = socket.recv_fds(channel, MAX_ORDER_BYTES, 1 + len(NAMESPACES))
            if fds or not msg:
                break
            next_job = NextJob.decode(msg)
    except BaseException:  # noqa: BLE001 - no job yet: nobody to report to
        os._exit(1)
    channel.close()
    if not msg or not fds:
        os._exit(0)
    report = socket.socket(fileno=fds[0])
    spare = None
    if len(fds) > 1 and spares is not None:
        spare = Spare(tuple(fds[1:]), *spares.where)
    _run(msg, report, spare, ahead)


def _launch(server: socket.socket, spares: SpareRoots | None, standby: _Standby) -> _Served:
    """Serve one request of the server's: fork a job's supervisor (or hand the job to the
    standby), or take its next job."""
    try:
        msg, fds, flags, _addr = socket.recv_fds(server, MAX_ORDER_BYTES, 1)
    except ConnectionResetError:
        return _Served.GONE
    if msg and not fds:
        with contextlib.suppress(ValueError):
            standby.next_job(NextJob.decode(msg))
        _refill(server, spares, standby)
        return _Served.NOTHING_TAKEN
    if not msg or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return _Served.NOTHING_TAKEN if msg else _Served.GONE
    report = socket.socket(fileno=fds[0])
    if flags & socket.MSG_TRUNC:
        # Cut short, an order could name a parent cgroup (the server refuses longer ones).
        _send_error(report, "the job's launch order was cut short")
        report.close()
        return _Served.NOTHING_TAKEN
    spare = spares.take() if spares is not None else None
    served = _Served.HANDED
    if not standby.hand(msg, report, spare):
        served = _Served.FORKED
        try:
            pid = clone3(CLONE_NEWPID)
        except OSError as e:
            _send_error(report, f"cannot fork the job's supervisor: {e.strerror}")
            pid = -1
        if pid == 0:
            _supervisor_main(server, msg, report, spare)
    report.close()
    if spare is not None:
        spare.close()
    return served


def _refill(server: socket.socket, spares: SpareRoots | None, standby: _Standby) -> None:
    standby.refill(server)
    if spares is not None:
        spares.refill()


def main() -> None:
    server = socket.socket(fileno=int(sys.argv[1]))
    _prepare()
    poller = select.poll()
    poller.register(server, select.POLLIN)
    spares = _spares(poller)
    standby = _Standby(spares)
    _refill(server, spares, standby)
    refill_at: float | None = None
    while True:
        timeout = None if refill_at is None else max(0, (refill_at - time.monotonic()) * 1000)
        events = poller.poll(timeout)
        # The spare's events first: a mount made on the host before the server asked for
        # this launch must throw away a spare built before that mount.
        if spares is not None:
            for fd, _event in events:
                spares.handle(fd)
        if refill_at is not None and time.monotonic() >= refill_at:
            refill_at = None
            _refill(server, spares, standby)
        if any(fd == server.fileno() for fd, _event in events):
            served = _launch(server, spares, standby)
            if served is _Served.GONE:
                break
            if served is not _Served.NOTHING_TAKEN:
                delay = _REFILL_AFTER if served is _Served.HANDED else _REFILL_SOON
                refill_at = time.monotonic() + delay
    standby.close()
    if spares is not None:
        spares.close()
    server.close()
    # The server is gone; our stdio may be its pipes, which its reader waits to see closed.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    # With SIGCHLD ignored, wait() returns only once every child has ended (then ECHILD).
    with contextlib.suppress(ChildProcessError):
        os.wait()


if __name__ == "__main__":
    main()
