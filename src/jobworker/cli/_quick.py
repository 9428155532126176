"""The front end's quick way into a connection keeper: argv handed over unparsed.

A command through a keeper used to cost the front end its parse and its target resolution
(argparse, the config file, ~40 ms of imports and work: docs/benchmarks.md (n)) before it
could hand over. Here the front end does neither: it names what the target depends on
(``inputs``: the JOBWORKER_* variables, the config file's identity, and the current
directory when a certificate path in the environment is relative), finds the alias a
keeper left for exactly those inputs, and passes the raw argv, its environment and its
stdout, stderr and stdin. The keeper parses, and answers ``F`` (do it yourself) for
anything it will not run unparsed-from-here: a usage error or help (the front end prints
those), a flag naming another target, a command that reads a terminal, a fleet, an env file,
inputs it was not told of, or TLS files changed since it started. Nothing has run then;
the front end goes the full way, which also leaves a fresh alias.

The alias is a symbolic link ``quick-HASH.sock`` -> ``ctl-HASH.sock`` in the same private
directory; the keeper it reaches still checks the inputs word for word, so a stale or
colliding link can only cost a fallback.

Only builtin modules load here: this module's imports are the front end's whole cost
(``socket`` alone costs 5-7 ms: it loads enum and selectors; ``typing`` 10 ms).
"""

from __future__ import annotations

import _sha256  # type: ignore[import-not-found]  # builtin, no stub; hashlib loads OpenSSL (3 ms)
import _signal  # type: ignore[import-not-found]  # builtin, no stub; signal loads enum (2 ms)
import _socket
import _struct
import os
import stat
import sys

# Not typing's: importing typing costs 3.5 ms (mypy knows the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "FALLBACK",
    "INPUT_VARIABLES",
    "INTERRUPT",
    "LENGTH",
    "MAX_REQUEST",
    "PROGRESS",
    "QUICK",
    "STATUS",
    "Resume",
    "inputs",
    "interruptible",
    "keeper_dir",
    "private",
    "quick_path",
    "status",
    "try_quick",
]

LENGTH = _struct.Struct("!I")
# From the keeper, each message a tag and its fields: the exit status (last), or how far a
# follow has got (a job id and a log offset), so that the front end can follow on by
# itself if the keeper goes away.
STATUS = _struct.Struct("!ci")
PROGRESS = _struct.Struct("!c36sQ")
INTERRUPT = b"I"
# The largest request a keeper reads; a command with a bigger one runs in jobctl itself.
MAX_REQUEST = 1 << 20
# The keeper's answer to a quick request it will not run: nothing has been done.
FALLBACK = b"F"
# A quick request's first field (the full request is JSON, so it starts with "{").
QUICK = "quick1"
# What the target depends on when no flag names it (see _config.resolve_target).
INPUT_VARIABLES = (
    "JOBWORKER_CA",
    "JOBWORKER_CERT",
    "JOBWORKER_CONTEXT",
    "JOBWORKER_CONTROL_PERSIST",
    "JOBWORKER_KEY",
    "JOBWORKER_SERVER",
    "HOME",
    "XDG_CONFIG_HOME",
)
_SEP = "\0"
_MAX_SOCKET_PATH = 108


class Resume:
    """The keeper went away while following ``job``: go on from ``offset`` here.

    A slotted class rather than a NamedTuple: importing typing costs this path 10 ms.
    """

    __slots__ = ("job", "offset")

    def __init__(self, job: str, offset: int) -> None:
        self.job = job
        self.offset = offset


def keeper_dir() -> str:
    """Where keepers listen: $XDG_RUNTIME_DIR/jobworker, or /tmp/jobworker-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return f"{base}/jobworker" if base else f"/tmp/jobworker-{os.getuid()}"  # noqa: S108 - a private dir, checked before use


def private(directory: str) -> bool:
    """``directory`` is a directory of ours that only we can enter."""
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def inputs() -> str:
    """Everything the target depends on when no flag names it, as one string."""
    environ = os.environ
    parts = [f"{name}={environ.get(name, '')}" for name in INPUT_VARIABLES]
    config_home = environ.get("XDG_CONFIG_HOME") or f"{environ.get('HOME', '')}/.config"
    config = f"{config_home}/jobworker/config.toml"
    try:
        info = os.stat(config)
        parts.append(f"{config}:{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}:{info.st_size}")
    except OSError:
        parts.append(f"{config}:none")
    if any(
        environ.get(name, "/")[:1] not in ("/", "~")
        for name in ("JOBWORKER_CA", "JOBWORKER_CERT", "JOBWORKER_KEY")
    ):
        # A relative name means a file of the current directory.
        parts.append(f"cwd={os.getcwd()}")
    return _SEP.join(parts)


def quick_path(directory: str, key: str) -> str:
    """The alias for ``key`` (see ``inputs``) in ``directory``."""
    # The builtin module, not hashlib, which loads OpenSSL (3 ms).
    digest = _sha256.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{directory}/quick-{digest[:24]}.sock"


def _request(argv: list[str], key: str) -> bytes:
    columns = ""
    out_tty = os.isatty(1)
    if out_tty:
        try:
            columns = str(os.get_terminal_size(1).columns)
        except OSError:
            columns = ""
    fields = [
        QUICK,
        key.replace(_SEP, "\x1f"),
        "1" if out_tty else "0",
        columns,
        str(len(argv)),
        *argv,
        *(f"{k}={v}" for k, v in os.environ.items()),
    ]
    body = _SEP.join(fields).encode("utf-8", "surrogateescape")
    return LENGTH.pack(len(body)) + body


def try_quick(argv: list[str]) -> int | Resume | None:
    """Run ``argv`` in the keeper whose alias matches this process's inputs: its exit
    status, where to follow on if the keeper went away mid-follow, or None when there is
    no such keeper or it answered ``F`` (then nothing has run, and the caller goes the
    full way)."""
    directory = keeper_dir()
    if not private(directory):
        return None
    key = inputs()
    path = quick_path(directory, key)
    request = _request(argv, key)
    if len(path.encode()) >= _MAX_SOCKET_PATH or len(request) - LENGTH.size > MAX_REQUEST:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
            creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            if _struct.unpack("3i", creds)[1] != os.getuid():
                return None
            sent = sock.sendmsg(
                [request],
                [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack("3i", 1, 2, 0))],
            )
            # sendmsg may send only part (a signal during a send bigger than the
            # socket's buffer): the rest follows. Only if there is a rest: sendall sends
            # even nothing, and by then the keeper may have run the command and hung up,
            # whose EPIPE would have this process run it a second time.
            if sent < len(request):
                sock.sendall(request[sent:])
        except OSError:
            return None
        return interruptible(sock, lambda: status(sock, quick=True))
    finally:
        sock.close()


def interruptible(
    sock: _socket.socket, wait: Callable[[], int | Resume | None]
) -> int | Resume | None:
    """``wait()``, with Ctrl+C meanwhile passed to the keeper as one byte."""

    def interrupt(_signum: int, _frame: object) -> None:
        try:  # noqa: SIM105 - contextlib costs this path 3 ms of imports
            sock.send(INTERRUPT)
        except OSError:
            pass

    previous = _signal.signal(_signal.SIGINT, interrupt)
    try:
        return wait()
    finally:
        _signal.signal(_signal.SIGINT, previous)


def _recv_exactly(sock: _socket.socket, size: int) -> bytes | None:
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


def status(sock: _socket.socket, *, quick: bool = False) -> int | Resume | None:
    """The command's exit status, as the keeper reports it; where to follow on, if the
    keeper went away while following a job; or (``quick``) None if it answered ``F``."""
    resume: Resume | None = None
    while True:
        tag = _recv_exactly(sock, 1)
        rest = None
        if tag == FALLBACK and quick and resume is None:
            return None
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
