"""The cgroup driver interface, and what the v1 and v2 drivers share.

Shaped after runc's cgroup manager: a few verbs (create with limits, usage, OOM count,
remove), each job's cgroup named after its id beneath one subtree of ours. All methods block
(file I/O); the runtime calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from asyncinotify import Inotify, Mask

from .._jobdir import CgroupPaths
from .._locks import LockHeldError, lock_exclusive
from .._spec import IOLimit, Limits
from .._status import Usage
from .._usage import Sample
from ._files import CgroupError, read_keyed, read_text

__all__ = [
    "CgroupDriver",
    "JobCgroup",
    "UsageProbe",
    "backoff",
    "block_device_of",
    "lock_subtree",
    "remove_dirs",
    "wait_unpopulated",
]

CPU_PERIOD_US = 100_000


class UsageProbe(Protocol):
    """What a job uses now, read again each time: CPU and IO totals, memory and processes
    at that moment (zeros once its cgroup is gone)."""

    def read(self) -> Sample:
        """Raises OSError: a usage file could not be read (EMFILE: out of descriptors)."""
        ...

    def close(self) -> None: ...


class JobCgroup(Protocol):
    """One job's cgroups, as runc's cgroup manager is one object per container: created by
    :meth:`CgroupDriver.create`, or attached again from the paths a record kept."""

    @property
    def paths(self) -> CgroupPaths:
        """Its directories, for the job's record (and its first process to join)."""
        ...

    def usage(self) -> Usage:
        """CPU, memory and IO the job has used (zeros if its cgroup is gone).

        Raises:
            OSError: a usage file could not be read.
        """
        ...

    def probe(self) -> UsageProbe:
        """A reader of what the job uses now, for its usage history, holding its cgroup
        files open between reads; the caller closes it."""
        ...

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of the job."""
        ...

    def pids_limited(self) -> bool:
        """Whether a fork of the job failed for its pids limit (pids.events ``max``)."""
        ...

    def kill(self) -> bool:
        """SIGKILL every process of the job at once through ``cgroup.kill`` (cgroup2, kernel
        5.14+); False where that is not available.

        Raises:
            CgroupError: the kernel refused.
        """
        ...

    def remove(self, timeout: float) -> bool:
        """Wait for the job's cgroups to empty, then remove them, all within ``timeout`` s.

        Returns False if they were still populated (left for the driver's prune).

        Raises:
            CgroupError: an empty directory could not be removed.
        """
        ...


class CgroupDriver(Protocol):
    """Creates per-job cgroups beneath the server's own cgroup, and tidies its subtree."""

    @property
    def kind(self) -> str:
        """ "v2", "hybrid" or "v1"."""
        ...

    def create(self, job_id: str, limits: Limits, *, made: bool = False) -> JobCgroup:
        """Create the job's cgroups with ``limits`` applied; ``made``: they were made
        ahead (by a create with no limits), and only the limits are written.

        Raises:
            CgroupError: a directory or limit could not be created; nothing is left behind
                but directories ``made`` ahead, which are the caller's to remove (the
                process forked ahead into them may still be there).
        """
        ...

    def attach(self, paths: CgroupPaths) -> JobCgroup:
        """The job cgroup a record names (whatever this server's subtree setting is now)."""
        ...

    def find(self, job_id: str) -> JobCgroup:
        """The job cgroup this driver would create for ``job_id`` (for a record that names
        none: the server died between creating it and recording it)."""
        ...

    def prune(self, keep: set[str]) -> list[str]:
        """Remove our empty job cgroups whose id is not in ``keep``; return the ids removed."""
        ...

    def close(self, timeout: float) -> None:
        """With no job running: remove every job cgroup left (waiting up to ``timeout`` s
        for any still emptying), then our subtree. Whatever cannot go stays for the next
        start-up's :meth:`prune`."""
        ...

    def release(self) -> None:
        """Let go of the subtree's lock (after :meth:`close`, or leaving jobs running)."""
        ...


def lock_subtree(base: str, subtree: str) -> int:
    """An exclusive lock on our subtree's directory, held while the server runs: a second
    server on the same subtree would prune, and at its clean shutdown remove, the first
    one's job cgroups.

    Raises:
        CgroupError: another process holds it (the message names its pid).
    """
    try:
        return lock_exclusive(base, directory=True)
    except LockHeldError as e:
        raise CgroupError(
            f"the cgroup subtree {subtree!r} is in use by another {e.holder}; give this server "
            "a subtree of its own ([cgroups] subtree in the configuration)"
        ) from None
    except OSError as e:
        raise CgroupError(f"cannot open the cgroup subtree {subtree!r}: {e.strerror}") from e


def block_device_of(path: str) -> str:
    """The whole-disk "MAJ:MIN" holding ``path`` (IO throttling applies to disks, not
    partitions).

    Raises:
        CgroupError: ``path`` is not on a block device (tmpfs, overlay...).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise CgroupError(f"cannot find the block device of {path}: {e.strerror}") from e
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sys_dir = f"/sys/dev/block/{dev}"
    if not os.path.exists(sys_dir):
        raise CgroupError(
            f"{path} is not on a block device (device {dev}); name the device for IO limits"
        )
    if os.path.exists(f"{sys_dir}/partition"):
        parent = read_text(os.path.join(os.path.realpath(sys_dir), "..", "dev"))
        if parent:
            return parent.strip()
    return dev


def check_block_device(device: str) -> None:
    """Raises CgroupError if ``device`` ("MAJ:MIN") is not a block device of this host."""
    if not os.path.exists(f"/sys/dev/block/{device}"):
        raise CgroupError(f"IO limit device {device} is not a block device on this host")


def resolve_io(limits: Limits, cwd: str) -> tuple[IOLimit, ...]:
    """IO limits with every device named: a limit without one applies to ``cwd``'s disk."""
    resolved = []
    for io in limits.io:
        device = io.device or block_device_of(cwd)
        check_block_device(device)
        resolved.append(IOLimit(device, io.read_bps, io.write_bps, io.read_iops, io.write_iops))
    return tuple(resolved)


def wait_unpopulated(events_file: str | None, procs_file: str, timeout: float) -> bool:
    """Wait until the cgroup has no process left; True if it emptied in time.

    With a cgroup2 ``cgroup.events`` file the wait is an inotify wake-up on its change;
    pure v1 has no such file, so the task list is re-read with a short back-off.
    """
    deadline = time.monotonic() + timeout
    if events_file is not None and os.path.exists(events_file):
        if timeout <= 0:
            # One look, no watch: closing an inotify instance waits for the kernel's SRCU
            # grace period, which made it the biggest cost of removing 1,000 cgroups at once.
            return not read_keyed(events_file).get("populated", 0)
        with Inotify(sync_timeout=timeout) as inotify:
            inotify.add_watch(events_file, Mask.MODIFY)
            while read_keyed(events_file).get("populated", 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                inotify.sync_timeout = left
                inotify.sync_get()
        return True
    for _ in backoff(deadline, first=0.001):
        if not (read_text(procs_file) or "").strip():
            return True
    return not (read_text(procs_file) or "").strip()


def backoff(deadline: float, *, first: float, cap: float = 0.05) -> Iterator[bool]:
    """Yield before each try, sleeping between tries with a doubling delay (``first`` to
    ``cap`` seconds) until the monotonic ``deadline``; each value says whether this try is
    the last. For the two waits the kernel gives no event for (pure v1's task list, and a
    v1 hierarchy still busy after its tasks left)."""
    delay = first
    while True:
        last = time.monotonic() + delay > deadline
        yield last
        if last:
            return
        time.sleep(delay)
        delay = min(delay * 2, cap)


def remove_dirs(dirs: list[str], timeout: float = 1.0) -> None:
    """rmdir each of ``dirs`` that exists; a busy one is retried for up to ``timeout`` s in
    all, then reported.

    Raises:
        CgroupError: a directory could not be removed.
    """
    deadline = time.monotonic() + timeout
    for directory in dirs:
        for last in backoff(deadline, first=0.005):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # v1 hierarchies can lag behind cgroup2 in letting go of the last task (more
                # so on a loaded host: seen beyond a second).
                if e.errno != errno.EBUSY or last:
                    raise CgroupError(f"cannot remove cgroup {directory}: {e.strerror}") from e


def remove_all(cgroups: Iterable[JobCgroup], timeout: float) -> None:
    """Remove each job's cgroups, all within ``timeout`` s; those that cannot go (still
    populated, or busy) stay for the next start-up's prune."""
    deadline = time.monotonic() + timeout
    for cgroup in cgroups:
        with contextlib.suppress(CgroupError):
            cgroup.remove(max(0.0, deadline - time.monotonic()))


def job_dirs(base: str) -> list[str]:
    """Names of the job cgroups under ``base``."""
    try:
        entries = os.scandir(base)
    except FileNotFoundError:
        return []
    names = []
    with entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    names.append(entry.name)
            except FileNotFoundError:
                continue  # removed while we listed: a job ending meanwhile
    return names
