"""The syscalls Python 3.11's ``os`` module lacks, through ctypes on libc.

Every wrapper checks the return value and raises ``OSError`` with the errno and the call's name,
so a failure reads "unshare(CLONE_NEWPID): Operation not permitted" rather than a bare -1.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_NO_NEW_PRIVS",
    "loopback_up",
    "mount",
    "prctl",
    "sethostname",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ_FLAGS = struct.Struct("16sh22x")  # struct ifreq: name, then ifr_flags in the union

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
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


def prctl(option: int, arg: int, what: str) -> None:
    """prctl(2) with one argument.

    Raises:
        OSError: the kernel refused the option.
    """
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({what})")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    """mount(2) without data.

    Raises:
        OSError: the kernel refused (e.g. EPERM outside a new mount namespace as non-root).
    """
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            None,
        ),
        f"mount {fstype or 'flags'} on {target}",
    )


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
