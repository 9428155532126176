"""The connection keeper: what OpenSSH's ControlMaster/ControlPersist is to ssh.

With ``control-persist`` set (context key, or JOBWORKER_CONTROL_PERSIST, e.g. ``10m``),
the first jobctl starts a keeper in the background: one process per server and
certificate, holding the TLS connection open, listening on a Unix socket in a 0700
directory of the user's. Later jobctl commands pass it their argv and their stdout and
stderr descriptors (SCM_RIGHTS), and Ctrl+C as one byte; the keeper runs the command over
its open connection, writing straight to those descriptors, and sends back the exit status.
A command then skips importing gRPC and the TLS handshake. The keeper exits once it has
been idle for the persist time.

Only the socket's owner may use it (directory mode, and the peer's uid on each connection).
Anything that keeps a command from reaching a keeper makes jobctl run it itself.

This module is the front end's side (light: every jobctl command with a keeper loads it);
the keeper itself is ``_keeper``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._quick import (
    LENGTH,
    MAX_REQUEST,
    Resume,
    interruptible,
    keeper_dir,
    private,
    quick_path,
    status,
)

if TYPE_CHECKING:
    from ._config import Target

__all__ = [
    "READY",
    "connect_keeper",
    "control_path",
    "file_stamps",
    "forward",
]

READY = b"R"
_START_TIMEOUT = 10.0
_MAX_SOCKET_PATH = 108


def _private_dir() -> Path | None:
    """$XDG_RUNTIME_DIR/jobworker, or /tmp/jobworker-UID: made 0700 if missing; None if
    it exists but is not a directory of ours that only we can enter."""
    directory = keeper_dir()
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    return Path(directory) if private(directory) else None


def control_path(target: Target) -> Path | None:
    """The keeper's socket for ``target``: one per server, CA, certificate and key, and per
    version of those files, so a renewed certificate gets a fresh keeper (the old one idles
    out). None where no keeper may be used, or a file is missing (the caller then reports
    that itself)."""
    directory = _private_dir()
    if directory is None:
        return None
    stamps = file_stamps(target)
    if stamps is None:
        return None
    # The protocol's version first: a keeper of an earlier jobctl, which would not
    # understand a quick request (see _quick), has a socket of another name.
    key = "\0".join(["2", target.server, *stamps])
    path = directory / f"ctl-{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"
    # A Unix socket's path has room for 107 bytes.
    return path if len(os.fsencode(path)) < _MAX_SOCKET_PATH else None


def file_stamps(target: Target) -> list[str] | None:
    """Each TLS file's name and version (mtime, size); None if one is missing."""
    stamps = []
    for file in (target.ca, target.cert, target.key):
        try:
            info = file.stat()
        except OSError:
            return None
        stamps += [str(file), str(info.st_mtime_ns), str(info.st_size)]
    return stamps


def connect_keeper(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start_keeper(path: Path, target: Target) -> bool:
    """Start a keeper for ``target`` and wait until it listens (or gives up)."""
    import subprocess  # noqa: PLC0415 - 2-3 ms, only here, not in every command that finds a keeper

    read_end, write_end = os.pipe()
    try:
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in target._asdict().items()}
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobworker.cli._keeper",
                json.dumps(fields),
                str(path),
                str(write_end),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_end,),
            start_new_session=True,
            cwd="/",
        )
        os.close(write_end)
        write_end = -1
        ready, _, _ = select.select([read_end], [], [], _START_TIMEOUT)
        return bool(ready) and os.read(read_end, 1) == READY
    except OSError:
        return False
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _request(argv: list[str], extra: dict[str, object]) -> bytes:
    columns = None
    if os.isatty(1):
        with contextlib.suppress(OSError):
            columns = os.get_terminal_size(1).columns
    body = json.dumps(
        {
            "argv": argv,
            "out_tty": os.isatty(1),
            "columns": columns,
            "no_color": "NO_COLOR" in os.environ,
            # What the command resolved here, where the user is (see _environment).
            **extra,
        }
    ).encode()
    return LENGTH.pack(len(body)) + body


def forward(
    argv: list[str], target: Target, extra: dict[str, object], *, alias: str | None = None
) -> int | Resume | None:
    """Run ``argv`` in the keeper for ``target``, starting one if there is none; return the
    exit status, where to follow on if the keeper went away mid-follow, or None if no
    keeper can be reached (then the caller runs it itself). ``extra`` goes along: what only
    this process could resolve (the job's environment). ``alias``: the inputs (see
    ``_quick``) that resolved to ``target`` with no flag naming it; the keeper is told to
    take quick requests with exactly those, and the alias is pointed at it."""
    path = control_path(target)
    if alias is not None:
        extra = {**extra, "alias": alias}
    request = _request(argv, extra)
    if path is None or len(request) - LENGTH.size > MAX_REQUEST:
        return None
    sock = connect_keeper(path)
    if sock is None:
        if path.is_socket():
            # Left by a keeper that was killed: nobody listens on it.
            with contextlib.suppress(OSError):
                path.unlink()
        if not _start_keeper(path, target):
            return None
        sock = connect_keeper(path)
        if sock is None:
            return None
    with sock:
        try:
            sent = socket.send_fds(sock, [request], [1, 2, 0])
            # sendmsg may send only part (a signal during a send bigger than the
            # socket's buffer): the rest follows, if any (see _quick.try_quick: an empty
            # sendall after the keeper hung up would run the command twice).
            if sent < len(request):
                sock.sendall(request[sent:])
        except OSError:
            return None
        if alias is not None:
            _point_alias(quick_path(str(path.parent), alias), path.name)
        return interruptible(sock, lambda: status(sock))


def _point_alias(alias: str, socket_name: str) -> None:
    """Make ``alias`` a link to ``socket_name`` (in the same directory), atomically."""
    with contextlib.suppress(OSError):
        if os.readlink(alias) == socket_name:
            return
    temporary = f"{alias}.{os.getpid()}"
    try:
        os.symlink(socket_name, temporary)
        os.replace(temporary, alias)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
