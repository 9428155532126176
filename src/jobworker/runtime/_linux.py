"""The syscalls Python 3.11's ``os`` module lacks, through ctypes on libc.

Every wrapper checks the return value and raises ``OSError`` with the errno and the call's name,
so a failure reads "unshare(CLONE_NEWPID): Operation not permitted" rather than a bare -1.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct

__all__ = [
    "CLONE_INTO_CGROUP",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_UNBINDABLE",
    "PR_CAPBSET_DROP",
    "PR_CAP_AMBIENT",
    "PR_CAP_AMBIENT_CLEAR_ALL",
    "PR_SET_NO_NEW_PRIVS",
    "PR_SET_SECUREBITS",
    "SECBITS_LOCKED_NOROOT",
    "clone3",
    "close_all_but",
    "load_seccomp",
    "loopback_up",
    "mount",
    "pivot_root",
    "prctl",
    "prctl5",
    "read_only_tree",
    "sethostname",
    "setns",
    "umount",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_INTO_CGROUP = 0x200000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
# capabilities(7): NOROOT (uid 0 gains no capability at exec) | NOROOT_LOCKED |
# NO_SETUID_FIXUP_LOCKED (the fix-up that clears capabilities on setuid stays ON) |
# KEEP_CAPS_LOCKED (keep-caps stays OFF) | NO_CAP_AMBIENT_RAISE | its lock. Never set
# NO_SETUID_FIXUP or KEEP_CAPS themselves: either would keep capabilities across setuid.
SECBITS_LOCKED_NOROOT = 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80

_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and the generic table (arm64)
_SYS_CLONE3 = 435  # likewise
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ_FLAGS = struct.Struct("16sh22x")  # struct ifreq: name, then ifr_flags in the union

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.mount.restype = ctypes.c_int
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class _CloneArgs(ctypes.Structure):
    """struct clone_args up to its ``cgroup`` field (CLONE_ARGS_SIZE_VER2)."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (
        ("len", ctypes.c_ushort),
        ("filter", ctypes.c_void_p),
    )


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int, what: str) -> None:
    """unshare(2); ``what`` names the flags in the error message.

    Raises:
        OSError: the kernel refused (EPERM without CAP_SYS_ADMIN, EINVAL for a second
            CLONE_NEWPID before forking).
    """
    _check(_libc.unshare(flags), f"unshare({what})")


def setns(fd: int, flags: int, what: str) -> None:
    """setns(2) with a pidfd: join every namespace of that process ``flags`` names, at once
    (Linux 5.8+); ``what`` names them in the error message.

    Raises:
        OSError: the kernel refused (EPERM without the capabilities, ESRCH: it has exited).
    """
    _check(_libc.setns(fd, flags), f"setns({what})")


def clone3(flags: int, cgroup_fd: int = 0) -> int:
    """fork(2) through clone3(2) (Linux 5.3; 5.7 for CLONE_INTO_CGROUP), with ``flags``:
    CLONE_NEWPID, the child is PID 1 of a PID namespace of its own; CLONE_INTO_CGROUP, it
    is born in the cgroup v2 directory ``cgroup_fd`` names. 0 in the child, its pid in the
    parent; SIGCHLD when it ends, as for fork.

    Why not fork: fork, then unshare(CLONE_NEWPID), then fork again took a process more
    per job (its fork, its copy-on-write faults, its exit); and a fork, then a pid written
    into cgroup.procs, takes the kernel's global cgroup_threadgroup_rwsem for writing,
    which waits out an RCU grace period once no migration happened for a while (10-14 ms
    measured here, docs/benchmarks.md), where a birth in the cgroup takes it for reading.

    For a single-threaded caller only: the child goes on without os.fork's after-fork
    steps (CPython's lock resets and at-fork hooks, glibc's), which only threads of the
    parent's could have needed.

    Raises:
        OSError: the kernel refused (ENOSYS under a seccomp filter that hides clone3;
            EBUSY for a cgroup with controllers enabled for children; EAGAIN at a pids
            limit).
    """
    args = _CloneArgs(flags=flags, exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
    pid = _libc.syscall(_SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid < 0:
        _check(pid, "clone3")
    return int(pid)


def prctl(option: int, arg: int, what: str) -> None:
    """prctl(2) with one argument.

    Raises:
        OSError: the kernel refused the option.
    """
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({what})")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """mount(2).

    Raises:
        OSError: the kernel refused (e.g. EPERM outside a new mount namespace as non-root).
    """
    ret = _libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data is not None else None,
    )
    # The message is built only on failure: a sandboxed start makes some 40 mounts.
    if ret != 0:
        _check(ret, f"mount {fstype or source or 'flags'} on {target}")


def umount(target: str) -> None:
    """umount2(2) with MNT_DETACH.

    Raises:
        OSError: the kernel refused.
    """
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def read_only_tree(path: str) -> None:
    """Make the mount at ``path`` and every mount beneath it read-only, in one call
    (mount_setattr(2) with AT_RECURSIVE, Linux 5.12+), like systemd's ProtectSystem=strict.

    Raises:
        OSError: the kernel refused, or has no mount_setattr.
    """
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = _libc.syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(_AT_FDCWD),
        path.encode(),
        ctypes.c_uint(_AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(0 if ret == 0 else -1, f"mount_setattr({path}, read-only, recursive)")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (libc has no wrapper).

    Raises:
        OSError: the kernel refused.
    """
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(0, f"pivot_root: no syscall number known for {os.uname().machine}")
    ret = _libc.syscall(number, new_root.encode(), put_old.encode())
    _check(0 if ret == 0 else -1, "pivot_root")


def prctl5(option: int, arg2: int, arg3: int, what: str) -> None:
    """prctl(2) with two arguments.

    Raises:
        OSError: the kernel refused the option.
    """
    _check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl({what})")


def load_seccomp(bpf: bytes) -> None:
    """Install the classic-BPF seccomp program ``bpf`` (8 bytes per instruction) on this
    thread; needs no_new_privs (or CAP_SYS_ADMIN).

    Raises:
        OSError: the kernel refused the filter.
    """
    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    ret = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0)
    _check(ret, "prctl(PR_SET_SECCOMP)")


def sethostname(name: str) -> None:
    """sethostname(2).

    Raises:
        OSError: the kernel refused (outside a new UTS namespace this changes the host's name,
            so it is only ever called inside one).
    """
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace (a fresh one has it down).

    Raises:
        OSError: the ioctl failed.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ_FLAGS.pack(b"lo", 0)
        flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ_FLAGS.pack(b"lo", flags | _IFF_UP))


def close_all_but(*keep: int) -> None:
    """Close every descriptor above stdio (0-2) but ``keep``, in a forked child: nothing of
    its parent's stays open by accident."""
    low = 3
    for fd in sorted(set(keep)):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
