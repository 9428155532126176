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
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._config import Target

__all__ = [
    "INTERRUPT",
    "LENGTH",
    "MAX_REQUEST",
    "PROGRESS",
    "READY",
    "STATUS",
    "Resume",
    "connect_keeper",
    "control_path",
    "forward",
]

LENGTH = struct.Struct("!I")
# From the keeper, each message a tag and its fields: the exit status (last), or how far a
# follow has got (a job id and a log offset), so that the front end can follow on by
# itself if the keeper goes away.
STATUS = struct.Struct("!ci")
PROGRESS = struct.Struct("!c36sQ")
MAX_REQUEST = 1 << 20
INTERRUPT = b"I"
READY = b"R"
_START_TIMEOUT = 10.0
_MAX_SOCKET_PATH = 108


def _private_dir() -> Path | None:
    """$XDG_RUNTIME_DIR/jobworker, or /tmp/jobworker-UID: made 0700 if missing; None if
    it exists but is not a directory of ours that only we can enter."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    uid = os.getuid()
    directory = Path(base) / "jobworker" if base else Path(f"/tmp/jobworker-{uid}")  # noqa: S108 - checked below
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    try:
        info = directory.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        return None
    return directory


def control_path(target: Target) -> Path | None:
    """The keeper's socket for ``target``: one per server, CA, certificate and key, and per
    version of those files, so a renewed certificate gets a fresh keeper (the old one idles
    out). None where no keeper may be used, or a file is missing (the caller then reports
    that itself)."""
    directory = _private_dir()
    if directory is None:
        return None
    parts = [target.server]
    for file in (target.ca, target.cert, target.key):
        try:
            info = file.stat()
        except OSError:
            return None
        parts += [str(file), str(info.st_mtime_ns), str(info.st_size)]
    key = "\0".join(parts)
    path = directory / f"ctl-{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"
    # A Unix socket's path has room for 107 bytes.
    return path if len(os.fsencode(path)) < _MAX_SOCKET_PATH else None


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


class Resume(NamedTuple):
    """The keeper went away while following ``job``: go on from ``offset`` here."""

    job: str
    offset: int


def forward(argv: list[str], target: Target, extra: dict[str, object]) -> int | Resume | None:
    """Run ``argv`` in the keeper for ``target``, starting one if there is none; return the
    exit status, where to follow on if the keeper went away mid-follow, or None if no
    keeper can be reached (then the caller runs it itself). ``extra`` goes along: what only
    this process could resolve (the job's environment)."""
    path = control_path(target)
    if path is None:
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
            socket.send_fds(sock, [_request(argv, extra)], [1, 2])
        except OSError:
            return None

        def interrupt(_signum: int, _frame: object) -> None:
            with contextlib.suppress(OSError):
                sock.send(INTERRUPT)

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            return _status(sock)
        finally:
            signal.signal(signal.SIGINT, previous)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except OSError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    return data


def _status(sock: socket.socket) -> int | Resume:
    """The command's exit status, as the keeper reports it; or, if the keeper went away
    while following a job, where to follow on."""
    resume: Resume | None = None
    while True:
        tag = _recv_exactly(sock, 1)
        rest = None
        if tag == b"P":
            rest = _recv_exactly(sock, PROGRESS.size - 1)
            if rest is not None:
                _tag, job, offset = PROGRESS.unpack(tag + rest)
                resume = Resume(job.decode("ascii"), offset)
                continue
        elif tag == b"S":
            rest = _recv_exactly(sock, STATUS.size - 1)
            if rest is not None:
                return int(STATUS.unpack(tag + rest)[1])
        if resume is not None:
            return resume
        # It may have run part of the command, so running it again here could do it twice:
        # say so instead.
        sys.stderr.write(
            "jobctl: the connection keeper went away before the command ended;"
            " check with 'jobctl ls' before running it again\n"
        )
        return 1
