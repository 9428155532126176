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
  cgroup (through its cgroup namespace);
- paths an operator exposes to the owner are bound at the same path, read-only or writable.
"""

from __future__ import annotations

import contextlib
import os
import stat

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

__all__ = ["PRIVATE_DIRS", "WORKDIR", "build_root"]

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
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# runc's defaults (libcontainer/specconv): hidden, and read-only.
_PROC_MASKED = (
    "acpi",
    "asound",
    "interrupts",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
)
_PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
_SYS_MASKED = ("firmware", "devices/virtual/powercap")
_NODEV = MS_NOSUID | MS_NODEV


def _under(new: str, path: str) -> str:
    return new + path


def _bind(source: str, target: str, *, recursive: bool = True) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def _read_only_bind(source: str, target: str) -> None:
    """A bind that is read-only however its source is mounted (two calls, no superblock)."""
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def _host_tree(new: str, source_root: str) -> None:
    """A bind of each top-level entry of ``source_root`` (symlinks copied), made read-only
    later, all at once."""
    for name in sorted(os.listdir(source_root)):
        if name in _FRESH:
            continue
        source = os.path.join(source_root, name)
        target = _under(new, "/" + name)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            os.mkdir(target, 0o755)
            _bind(source, target)


def _private(new: str, uid: int, gid: int, tmp_bytes: int) -> None:
    """One private tmpfs for every writable place; bound where each appears."""
    stage = _under(new, _PRIVATE)
    mount("tmpfs", stage, "tmpfs", _NODEV, f"size={tmp_bytes},mode=0755")
    for name in PRIVATE_DIRS.values():
        os.mkdir(os.path.join(stage, name), 0o1777)
        os.chmod(os.path.join(stage, name), 0o1777)  # mkdir's mode passes through umask
    work = os.path.join(stage, "work")
    os.mkdir(work, 0o700)
    os.chown(work, uid, gid)
    _bind(work, _under(new, WORKDIR), recursive=False)
    for where, name in PRIVATE_DIRS.items():
        target = _under(new, where)
        # /dev/shm is bound once /dev exists; a minimal image may have no /run/lock.
        if where != "/dev/shm" and os.path.isdir(target):
            _bind(os.path.join(stage, name), target, recursive=False)


def _dev(new: str) -> None:
    dev = _under(new, "/dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in _DEVICES:
        # mknod with the host's device numbers, not a bind per device: a mount call costs
        # several times a mknod (docs/benchmarks.md (e')).
        target = os.path.join(dev, name)
        os.mknod(target, stat.S_IFCHR | 0o666, os.stat(f"/dev/{name}").st_rdev)
        os.chmod(target, 0o666)  # mknod's mode passes through umask
    pts = os.path.join(dev, "pts")
    os.mkdir(pts, 0o755)
    mount("devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    _bind(_under(new, _PRIVATE + "/shm"), os.path.join(dev, "shm"), recursive=False)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))


def _mask(new: str, target: str) -> None:
    """Hide a directory behind the empty, read-only tmpfs, or a file behind /dev/null
    (where writes go nowhere, as runc does): one bind each."""
    if os.path.isdir(target):
        _bind(_under(new, _EMPTY), target, recursive=False)
    elif os.path.exists(target):
        _bind("/dev/null", target, recursive=False)


def _proc(new: str) -> None:
    proc = _under(new, "/proc")
    mount("proc", proc, "proc", _NODEV | MS_NOEXEC)
    for name in _PROC_MASKED:
        _mask(new, os.path.join(proc, name))
    for name in _PROC_READ_ONLY:
        target = os.path.join(proc, name)
        if os.path.exists(target):
            _read_only_bind(target, target)


def _sys(new: str, *, own_network: bool, cgroup2: bool) -> None:
    sys_dir = _under(new, "/sys")
    if own_network:
        # sysfs shows the network devices of the namespace that mounts it.
        mount("sysfs", sys_dir, "sysfs", _NODEV | MS_NOEXEC | MS_RDONLY)
    else:
        _bind("/sys", sys_dir)
        read_only_tree(sys_dir)
    for name in _SYS_MASKED:
        _mask(new, os.path.join(sys_dir, name))
    cgroup_dir = os.path.join(sys_dir, "fs", "cgroup")
    if not os.path.isdir(cgroup_dir):
        return
    if cgroup2 and own_network:
        # The job's cgroup namespace is rooted at its own cgroup: this shows only that.
        # (Over the host's /sys bound for a host-network job, the kernel refuses a new
        # cgroup2 mount with EBUSY: such a job sees an empty directory instead.)
        mount("cgroup2", cgroup_dir, "cgroup2", _NODEV | MS_NOEXEC | MS_RDONLY)
    else:
        _mask(new, cgroup_dir)


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
    mount("tmpfs", new, "tmpfs", _NODEV, "size=1m,mode=0755")
    # The new root lies in the state dir, which a shown path may contain: unbindable, so
    # no recursive bind below copies it into itself.
    mount(None, new, None, MS_UNBINDABLE)
    for path in ("/dev", "/proc", "/sys", "/home", "/root", "/tmp", WORKDIR, _PRIVATE, _EMPTY):
        os.mkdir(_under(new, path), 0o755)
    # One small empty tmpfs, bound over every place that must look empty (the new root
    # itself cannot be a bind's source: it is unbindable).
    # Read-only at the superblock: every bind of it is read-only too, in one call each.
    mount(
        "tmpfs", _under(new, _EMPTY), "tmpfs", _NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0755"
    )
    _host_tree(new, sandbox.image or "/")
    for path in _EMPTY_PLACES:
        _mask(new, _under(new, path))
    read_only_tree(new)
    _private(new, uid, gid, sandbox.tmp_bytes)
    for bind in sandbox.binds:
        if os.path.exists(bind.path) and _show(new, bind.path) and not bind.writable:
            read_only_tree(_under(new, bind.path))
    # After the binds: a hidden path inside a shown one stays hidden.
    for path in sandbox.hide:
        _mask(new, _under(new, path))
    _dev(new)
    _proc(new)
    _sys(new, own_network=own_network, cgroup2=sandbox.cgroup2)
    umount(_under(new, _PRIVATE))
    umount(_under(new, _EMPTY))
    # pivot_root(".", "."): the old root ends up stacked under the new one, and is detached
    # at once (runc does the same); no directory for it is needed.
    os.chdir(new)
    pivot_root(".", ".")
    umount(".")
    os.chdir("/")


def _show(new: str, path: str) -> bool:
    """Bind the host's ``path`` at the same place in the new root, if a place for it can
    be made (inside a read-only host directory it must exist already); whether it was."""
    target = _under(new, path)
    if os.path.isdir(path) and not os.path.isdir(target):
        with contextlib.suppress(OSError):
            os.makedirs(target, 0o755)
    if not os.path.exists(target):
        return False
    _bind(path, target)
    return True
