"""Exclusive locks that keep two servers off one state dir or one cgroup subtree.

``flock(2)`` on an open file: the kernel drops it when the holder's last fd closes, so a
server killed with SIGKILL never leaves a stale lock behind, and nothing has to guess
whether a pid file is current. The holder's pid, for the message a second server prints,
comes from ``/proc/locks``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

__all__ = ["LockHeldError", "holder_of", "lock_exclusive"]


class LockHeldError(Exception):
    """Another process holds the lock; ``pid`` is that process (None if unknown)."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(f"held by pid {pid}" if pid else "held by another process")
        self.pid = pid

    @property
    def holder(self) -> str:
        """The holder, for a message: "jobworkerd (pid N)", or "jobworkerd" unknown."""
        return f"jobworkerd (pid {self.pid})" if self.pid else "jobworkerd"


def holder_of(fd: int) -> int | None:
    """The pid holding a flock on the file open at ``fd`` (from /proc/locks), if any."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # A line reads: 1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                return int(fields[4])
    return None


def lock_exclusive(path: str, *, directory: bool = False) -> int:
    """Take an exclusive flock on ``path`` (created as a 0600 file unless ``directory``);
    return its fd, which holds the lock until closed.

    Raises:
        LockHeldError: another process holds it.
        OSError: ``path`` cannot be opened.
    """
    if directory:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = holder_of(fd) or (None if directory else _pid_in(fd))
        os.close(fd)
        raise LockHeldError(pid) from None
    except BaseException:
        os.close(fd)
        raise
    if not directory:
        # For filesystems whose locks /proc/locks does not list (9p, NFS): the holder's pid.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _pid_in(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
