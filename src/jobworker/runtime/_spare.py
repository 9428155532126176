"""A sandboxed job's root built ahead: the launcher keeps one mount namespace ready (and a
network namespace with its loopback up, and UTS and IPC ones), so a job's start does only
the part of its walls that is its own (docs/benchmarks.md (e')).

Most of a sandboxed root does not depend on the job: the host's tree bound read-only, the
empty and hidden places, /dev and the private tmpfs are the same for every job on the host's
root that is shown no extra path. A builder process forked from the launcher makes the
namespaces of ``NAMESPACES``, builds that part of the root in the mount one
(``_rootfs.prepare_root``), brings the loopback up in the network one, hands the namespaces
back as descriptors and exits. The launcher gives them to the next job's supervisor; its
command joins them (``setns``) instead of making its own and building its root, then sets
its hostname and finishes the root for itself (``_rootfs.finish_prepared_root``): its
tmpfs size, its /job, and the /proc and /sys of its own PID and network namespaces. The
builder has already made the root the namespace's own (``pivot_root``), so joining the
mount namespace is entering the root. Each spare goes to one job only.

A spare is a copy of the host's mount table as it was when built, as any job's root is a
copy of it as it was at the job's start. So it is thrown away, and the job builds its own
root, when the host's mount table changed since (the launcher watches
/proc/self/mountinfo, which the kernel marks on every mount or unmount in its namespace),
when the top level of the host's root changed, or when it is older than ``MAX_AGE``. One is
kept at most, and the next is built only once one was taken: an idle host does no work. A
job that finds none ready (one of a burst of starts) builds its own, as with no spares.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from typing import NamedTuple, NoReturn

from ._jobdir import SandboxRecord
from ._linux import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    MS_PRIVATE,
    MS_REC,
    close_all_but,
    loopback_up,
    mount,
    unshare,
)
from ._rootfs import prepare_root

__all__ = ["MAX_AGE", "NAMESPACES", "Spare", "SpareRoots"]

# Seconds a spare may wait for a job: what a change the mount table does not show (a hidden
# path created after it was built) can go unseen for, at most.
MAX_AGE = 60.0
_POLL_MOUNTS = select.POLLPRI | select.POLLERR
# The namespaces a spare holds for its job, in the order of ``Spare.namespaces``: besides
# the mount namespace with its root, a network namespace with its loopback up, and UTS and
# IPC ones: made ahead, they took 1.3 ms off a start (unshare 0.9 ms, lo up 0.45 ms).
NAMESPACES = (
    ("mnt", CLONE_NEWNS),
    ("net", CLONE_NEWNET),
    ("uts", CLONE_NEWUTS),
    ("ipc", CLONE_NEWIPC),
)


class Spare(NamedTuple):
    """Namespaces ready for a job (``namespaces``: a descriptor of each, as ``NAMESPACES``
    lists them), the root of the mount one built at ``at``, hiding ``hide``."""

    namespaces: tuple[int, ...]
    at: str
    hide: tuple[str, ...]

    def close(self) -> None:
        for fd in self.namespaces:
            os.close(fd)

    def fits(self, sandbox: SandboxRecord, *, host_network: bool) -> bool:
        """Whether it is the root ``sandbox`` asks for, but for the job's own part (a job
        on the host's network is shown the host's /sys, which a spare has no way to)."""
        return (
            sandbox.image is None
            and not sandbox.binds
            and sandbox.hide == self.hide
            and not host_network
        )


class SpareRoots:
    """The launcher's spare: built by a child, taken by the next launch. Single-threaded,
    driven by the launcher's poll loop."""

    def __init__(self, at: str, hide: tuple[str, ...], poller: select.poll) -> None:
        self._at = at
        self._hide = hide
        self._poller = poller
        self._ready: tuple[int, ...] = ()
        self._built_at = 0.0
        self._root_mtime = 0
        self._builder: socket.socket | None = None
        # A build failed: none is tried again until the mount table changes, so a host that
        # cannot build one costs a fork per change, not per start.
        self._failed = False
        # The mount table changed while a build ran: what it copied may be older.
        self._stale = False
        # The kernel marks this file (POLLPRI) on every change to the mount table of the
        # namespace it was opened in: ours, the host's.
        self._mounts = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        poller.register(self._mounts, _POLL_MOUNTS)

    @property
    def where(self) -> tuple[str, tuple[str, ...]]:
        """Where spares are built and what they hide: a :class:`Spare` but for its
        namespaces."""
        return self._at, self._hide

    def handle(self, fd: int) -> None:
        """Act on a poll event of ``fd``, if it is one of ours."""
        if fd == self._mounts:
            self._discard()
            self._failed = False
            self._stale = self._builder is not None
        elif self._builder is not None and fd == self._builder.fileno():
            self._collect(self._builder)

    def take(self) -> Spare | None:
        """The spare for the next job, if one is ready and still current; the caller owns
        its descriptor."""
        if self._ready and (
            time.monotonic() - self._built_at > MAX_AGE or _root_mtime() != self._root_mtime
        ):
            self._discard()
        spare = Spare(self._ready, self._at, self._hide) if self._ready else None
        self._ready = ()
        return spare

    def refill(self) -> None:
        """Start building a spare, unless one is ready or being built (or the last build
        failed and the mount table has not changed since)."""
        if not self._ready and self._builder is None and not self._failed:
            self._build()

    def close(self) -> None:
        self._discard()
        if self._builder is not None:
            self._poller.unregister(self._builder)
            self._builder.close()
            self._builder = None
        self._poller.unregister(self._mounts)
        os.close(self._mounts)

    def _discard(self) -> None:
        for fd in self._ready:
            os.close(fd)
        self._ready = ()

    def _build(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mtime = _root_mtime()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            self._failed = True
            return
        if pid == 0:
            _builder(theirs, self._at, self._hide)
        theirs.close()
        self._builder = ours
        self._root_mtime = mtime
        self._poller.register(ours, select.POLLIN)

    def _collect(self, builder: socket.socket) -> None:
        self._poller.unregister(builder)
        self._builder = None
        with builder:
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(builder, 16, len(NAMESPACES))
            except OSError:
                fds = []
        stale, self._stale = self._stale, False
        if len(fds) != len(NAMESPACES) or stale:
            for fd in fds:
                os.close(fd)
            # Built from a copy of the mount table that may predate the change: the next
            # launch builds anew. Else the build failed.
            self._failed = not stale
            return
        self._discard()
        self._ready = tuple(fds)
        self._built_at = time.monotonic()


def _root_mtime() -> int:
    try:
        return os.stat("/").st_mtime_ns
    except OSError:
        return -1


def _builder(report: socket.socket, at: str, hide: tuple[str, ...]) -> NoReturn:
    """In the forked child: namespaces of its own (``NAMESPACES``), the spare root built
    at ``at`` in the mount one and the loopback up in the network one, sent back on
    ``report``; exits. A failure sends nothing (the launcher then builds no more until the
    mount table changes; each job builds its own)."""
    code = 1
    with contextlib.suppress(BaseException):
        # Only its own socket: nothing of the launcher's (the server's socket) stays open.
        close_all_but(report.fileno())
        flags = 0
        for _name, flag in NAMESPACES:
            flags |= flag
        unshare(flags, "mount, net, UTS, IPC")
        # Before the root is built: the new root has no /proc (the job mounts its own).
        namespaces = [
            os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name, _ in NAMESPACES
        ]
        loopback_up()
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        prepare_root(at, hide)
        socket.send_fds(report, [b"ok"], namespaces)
        code = 0
    os._exit(code)
