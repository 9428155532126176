"""The job's root filesystem: what it sees, built in its own mount namespace before exec.

Runs in the pre-exec step as root (so mounts are allowed), after the job has joined its
cgroups (so the private tmpfs pages are charged to it) and entered its namespaces. Like
bubblewrap and nsjail, it builds a fresh root and ``pivot_root``s into it:

- ``/`` is a small tmpfs, read-only once built, holding one read-only recursive bind of
  each top-level directory of the host (or of the image), except those hidden below;
- ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock`` and ``/job`` (the private working
  directory, and HOME) are directories of ONE private tmpfs of ``tmp_bytes``, owned by
  the job: empty at start, gone with the job, counted in its memory cgroup;
- ``/home``, ``/root`` and ``/run/user`` are empty and read-only; so are the server's
  state, configuration and TLS directories (``hide``);
- ``/dev`` holds only null, zero, full, random, urandom and tty (bound from the host),
  a private devpts with ``ptmx``, ``shm``, and the fd/stdin/stdout/stderr links;
- ``/proc`` is a fresh procfs of the job's PID namespace with runc's masked paths masked
  and its read-only paths read-only;
- ``/sys`` is a fresh read-only sysfs (the host's, read-only, with the host network), with
  ``/sys/fs/cgroup`` empty, or on cgroup v2 a read-only cgroup2 mount of the job's own
  cgroup (``show_own_cgroup``, once the job is in its cgroup namespace);
- paths an operator exposes to the owner are bound at the same path, read-only or writable.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import NamedTuple

from ._jobdir import SandboxRecord
from ._linux import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_UNBINDABLE,
    mount,
    pivot_root,
    read_only_tree,
    umount,
)

__all__ = [
    "PRIVATE_DIRS",
    "WORKDIR",
    "build_root",
    "finish_prepared_root",
    "plan_tree",
    "prepare_root",
    "show_own_cgroup",
]

WORKDIR = "/job"
# Where the private writable places appear, and their directory in the private tmpfs.
PRIVATE_DIRS = {
    "/tmp": "tmp",
    "/var/tmp": "var-tmp",
    "/run/lock": "lock",
    "/dev/shm": "shm",
}
# Never bound from the host: made fresh, or empty.
_FRESH = frozenset({"proc", "sys", "dev", "tmp", "home", "root", "job", "lost+found"})
_EMPTY_PLACES = ("/home", "/root", "/run/user")
# In the new root: the mount point of the private tmpfs while it is handed out, and the
# empty directory bound over whatever must look empty (no tmpfs per empty place).
_PRIVATE = "/.private"
_EMPTY = "/.empty"
# The device numbers are fixed by the kernel's ABI (Documentation/admin-guide/devices.txt),
# so no stat of the host's /dev is needed.
_DEVICES = (
    ("null", os.makedev(1, 3)),
    ("zero", os.makedev(1, 5)),
    ("full", os.makedev(1, 7)),
    ("random", os.makedev(1, 8)),
    ("urandom", os.makedev(1, 9)),
    ("tty", os.makedev(5, 0)),
)
# runc's defaults (libcontainer/specconv): hidden, and read-only. Whether each is a
# directory is fixed by the kernel; whether it exists depends on its modules (asound, scsi)
# and version, so it is not cached: a mount that finds nothing there is skipped.
_PROC_MASKED = (
    ("acpi", True),
    ("asound", True),
    ("interrupts", False),
    ("kcore", False),
    ("keys", False),
    ("latency_stats", False),
    ("timer_list", False),
    ("timer_stats", False),
    ("sched_debug", False),
    ("scsi", True),
)
_PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
_SYS_MASKED = ("firmware", "devices/virtual/powercap")
_NODEV = MS_NOSUID | MS_NODEV
# The private tmpfs's size in a root built ahead, until a job's own is set.
_PLACEHOLDER_TMP = 64 << 10


class _Tree(NamedTuple):
    """The top level of a root filesystem, as of its directory's modification time."""

    mtime_ns: int
    dirs: tuple[str, ...]
    links: tuple[tuple[str, str], ...]


# One entry per root filesystem, filled by the launcher before it forks (plan_tree), so
# that a job's pre-exec step makes no stat of the tree: listing and stat-ing it measured a
# quarter of the sandbox's cost (docs/benchmarks.md (e')).
_trees: dict[str, _Tree] = {}


def plan_tree(source_root: str) -> _Tree:
    """What the top level of ``source_root`` holds, from the cache while the directory is
    unchanged (adding, removing or replacing an entry changes its modification time).

    Raises:
        OSError: ``source_root`` cannot be read.
    """
    mtime = os.stat(source_root).st_mtime_ns
    cached = _trees.get(source_root)
    if cached is not None and cached.mtime_ns == mtime:
        return cached
    dirs, links = [], []
    with os.scandir(source_root) as entries:
        for entry in entries:
            if entry.name in _FRESH:
                continue
            if entry.is_symlink():
                links.append((entry.name, os.readlink(entry.path)))
            elif entry.is_dir():
                dirs.append(entry.name)
    tree = _Tree(mtime, tuple(sorted(dirs)), tuple(sorted(links)))
    _trees[source_root] = tree
    return tree


def _bind(source: str, target: str, *, recursive: bool = True) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def _bind_if_there(source: str, target: str) -> bool:
    """A bind, or nothing when the source or the target does not exist (a kernel without
    that /proc file, an image without /run/lock): one call instead of a stat and a call."""
    try:
        _bind(source, target, recursive=False)
    except FileNotFoundError:
        return False
    return True


def _read_only_bind(target: str) -> None:
    """``target`` bound onto itself, read-only however its source is mounted (two calls,
    no superblock); nothing if it does not exist."""
    if _bind_if_there(target, target):
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def _host_tree(new: str, source_root: str) -> None:
    """A bind of each top-level directory of ``source_root``, and a copy of each symlink,
    made read-only later, all at once."""
    tree = plan_tree(source_root)
    for name, target in tree.links:
        os.symlink(target, f"{new}/{name}")
    for name in tree.dirs:
        os.mkdir(f"{new}/{name}", 0o755)
        _bind(f"{source_root.rstrip('/')}/{name}", f"{new}/{name}")


def _private(new: str, uid: int, gid: int, tmp_bytes: int) -> None:
    """One private tmpfs for every writable place; bound where each appears."""
    stage = new + _PRIVATE
    mount("tmpfs", stage, "tmpfs", _NODEV, f"size={tmp_bytes},mode=0755")
    for name in PRIVATE_DIRS.values():
        os.mkdir(f"{stage}/{name}", 0o1777)
    work = f"{stage}/work"
    os.mkdir(work, 0o700)
    os.chown(work, uid, gid)
    _bind(work, new + WORKDIR, recursive=False)
    for where, name in PRIVATE_DIRS.items():
        # /dev/shm is bound once /dev exists; a minimal image may have no /run/lock.
        if where != "/dev/shm":
            _bind_if_there(f"{stage}/{name}", new + where)


def _dev(new: str) -> None:
    dev = new + "/dev"
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name, rdev in _DEVICES:
        # mknod, not a bind per device: a mount call costs several times a mknod
        # (docs/benchmarks.md (e')).
        os.mknod(f"{dev}/{name}", stat.S_IFCHR | 0o666, rdev)
    os.mkdir(f"{dev}/pts", 0o755)
    mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.mkdir(f"{dev}/shm", 0o1777)
    _bind(f"{new}{_PRIVATE}/shm", f"{dev}/shm", recursive=False)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")


def _mask(new: str, target: str, *, is_dir: bool) -> None:
    """Hide a directory behind the empty, read-only tmpfs, or a file behind /dev/null
    (where writes go nowhere, as runc does): one bind each, nothing if it is not there."""
    _bind_if_there(new + _EMPTY if is_dir else "/dev/null", target)


def _mask_any(new: str, target: str) -> None:
    """``_mask``, for a path whose kind is not known in advance (an operator's)."""
    if os.path.isdir(target):
        _mask(new, target, is_dir=True)
    elif os.path.exists(target):
        _mask(new, target, is_dir=False)


def _proc(new: str) -> None:
    proc = new + "/proc"
    mount("proc", proc, "proc", _NODEV | MS_NOEXEC)
    for name, is_dir in _PROC_MASKED:
        _mask(new, f"{proc}/{name}", is_dir=is_dir)
    for name in _PROC_READ_ONLY:
        _read_only_bind(f"{proc}/{name}")


def _sys(new: str, *, own_network: bool, cgroup2: bool) -> None:
    sys_dir = new + "/sys"
    if own_network:
        # sysfs shows the network devices of the namespace that mounts it.
        mount("sysfs", sys_dir, "sysfs", _NODEV | MS_NOEXEC | MS_RDONLY)
    else:
        _bind("/sys", sys_dir)
        read_only_tree(sys_dir)
    for name in _SYS_MASKED:
        _mask(new, f"{sys_dir}/{name}", is_dir=True)
    if not (cgroup2 and own_network):
        # Empty: on v1, and for a host-network job (over the host's /sys bound there, the
        # kernel refuses a new cgroup2 mount with EBUSY). Else show_own_cgroup mounts it.
        _mask(new, f"{sys_dir}/fs/cgroup", is_dir=True)


def show_own_cgroup() -> None:
    """A read-only cgroup2 mount at /sys/fs/cgroup (cgroup v2, a job with its own network
    and so its own sysfs), in the job's root. Only once the job has its cgroup namespace:
    a cgroup2 mount shows the tree from the mounting process's namespace root, so one made
    before it would show every job's cgroup on the host.

    Raises:
        OSError: the kernel refused the mount.
    """
    with contextlib.suppress(FileNotFoundError):
        mount("cgroup2", "/sys/fs/cgroup", "cgroup2", _NODEV | MS_NOEXEC | MS_RDONLY)


def build_root(new: str, sandbox: SandboxRecord, uid: int, gid: int, *, own_network: bool) -> None:
    """Build the job's root at the empty directory ``new`` (in the job's directory, so
    never a path anyone exposes), as the module says, and make it this process's root.

    The order keeps the mount calls few (they are most of a sandboxed start's cost:
    docs/benchmarks.md (e')): every directory the new root needs is made while it is
    writable; the host's tree and the empty places are bound; ONE recursive
    mount_setattr makes all of that read-only; only then come the private tmpfs, the
    shown and hidden paths, and the fresh /dev, /proc and /sys.

    Raises:
        OSError: a mount failed (the job then fails to start, with the reason).
    """
    with _modes_as_given():
        _walls(new, sandbox.image or "/", sandbox, sandbox.tmp_bytes, (uid, gid))
    _finish(new, sandbox, own_network=own_network)


def prepare_root(new: str, hide: tuple[str, ...]) -> None:
    """Build ahead, at the empty directory ``new`` of a fresh mount namespace of its own,
    what :func:`build_root` builds for any job on the host's root that hides ``hide`` and
    shows no path, and make it the namespace's root: everything but /proc and /sys (they
    show the job's own PID and network namespaces). Its private tmpfs is as small as it can
    be and its /job is root's: :func:`finish_prepared_root` gives both to the job.

    Raises:
        OSError: a mount failed.
    """
    spare = SandboxRecord(None, None, _PLACEHOLDER_TMP, hide, (), seccomp=True, cgroup2=False)
    with _modes_as_given():
        _walls(new, "/", spare, _PLACEHOLDER_TMP, (0, 0))
    _pivot(new)


def finish_prepared_root(sandbox: SandboxRecord, uid: int, gid: int) -> None:
    """In a mount namespace :func:`prepare_root` made, which is this process's root once
    it has joined it: give the job its tmpfs size and /job, and mount its /proc and its own
    network's /sys (a job on the host's network builds all of its root itself).

    Raises:
        OSError: a mount failed.
    """
    # A remount of the private tmpfs through one of its binds: the size is the superblock's,
    # so every place on it shares it. The flags are those it was bound with.
    mount(None, "/tmp", None, MS_REMOUNT | _NODEV, f"size={sandbox.tmp_bytes}")
    os.chown(WORKDIR, uid, gid)
    _proc("")
    _sys("", own_network=True, cgroup2=sandbox.cgroup2)


@contextlib.contextmanager
def _modes_as_given() -> Iterator[None]:
    """Modes as given, without the umask (no chmod after each mkdir); the job gets the
    umask back."""
    umask = os.umask(0)
    try:
        yield
    finally:
        os.umask(umask)


def _walls(
    new: str, source_root: str, sandbox: SandboxRecord, tmp_bytes: int, owner: tuple[int, int]
) -> None:
    """Every part of the root but /proc and /sys; the empty tmpfs stays at its staging
    place for their masks."""
    mount("tmpfs", new, "tmpfs", _NODEV, "size=1m,mode=0755")
    # The new root lies in the state dir, which a shown path may contain: unbindable, so
    # no recursive bind below copies it into itself.
    mount(None, new, None, MS_UNBINDABLE)
    for path in ("/dev", "/proc", "/sys", "/home", "/root", "/tmp", WORKDIR, _PRIVATE, _EMPTY):
        os.mkdir(new + path, 0o755)
    # One small empty tmpfs, bound over every place that must look empty (the new root
    # itself cannot be a bind's source: it is unbindable).
    # Read-only at the superblock: every bind of it is read-only too, in one call each.
    mount("tmpfs", new + _EMPTY, "tmpfs", _NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0755")
    _host_tree(new, source_root)
    for path in _EMPTY_PLACES:
        _mask(new, new + path, is_dir=True)
    read_only_tree(new)
    _private(new, *owner, tmp_bytes)
    for bind in sandbox.binds:
        if os.path.exists(bind.path) and _show(new, bind.path) and not bind.writable:
            read_only_tree(new + bind.path)
    # After the binds: a hidden path inside a shown one stays hidden.
    for path in sandbox.hide:
        _mask_any(new, new + path)
    _dev(new)
    umount(new + _PRIVATE)


def _finish(new: str, sandbox: SandboxRecord, *, own_network: bool) -> None:
    """/proc and /sys, then ``new`` becomes the root."""
    _proc(new)
    _sys(new, own_network=own_network, cgroup2=sandbox.cgroup2)
    _pivot(new)


def _pivot(new: str) -> None:
    """Make ``new`` this process's (and its mount namespace's) root; the old root is
    detached. The empty tmpfs stays mounted at /.empty, as empty and read-only as the place
    that would be left: an unmount waits out an RCU grace period."""
    # pivot_root(".", "."): the old root ends up stacked under the new one, and is detached
    # at once (runc does the same); no directory for it is needed.
    os.chdir(new)
    pivot_root(".", ".")
    umount(".")
    os.chdir("/")


def _show(new: str, path: str) -> bool:
    """Bind the host's ``path`` at the same place in the new root, if a place for it can
    be made (inside a read-only host directory it must exist already); whether it was."""
    target = new + path
    if os.path.isdir(path) and not os.path.isdir(target):
        with contextlib.suppress(OSError):
            os.makedirs(target, 0o755)
    if not os.path.exists(target):
        return False
    _bind(path, target)
    return True
