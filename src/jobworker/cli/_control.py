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

    python -m jobworker.cli._control TARGET_JSON SOCKET_PATH READY_FD   # the keeper
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from ._config import Target

__all__ = ["control_path", "forward"]

_LENGTH = struct.Struct("!I")
_STATUS = struct.Struct("!i")
_MAX_REQUEST = 1 << 20
_INTERRUPT = b"I"
_READY = b"R"
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


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start_keeper(path: Path, target: Target) -> bool:
    """Start a keeper for ``target`` and wait until it listens (or gives up)."""
    import subprocess  # noqa: PLC0415 - only here, not in every command that finds a keeper

    read_end, write_end = os.pipe()
    try:
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in target._asdict().items()}
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobworker.cli._control",
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
        return bool(ready) and os.read(read_end, 1) == _READY
    except OSError:
        return False
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _request(argv: list[str]) -> bytes:
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
        }
    ).encode()
    return _LENGTH.pack(len(body)) + body


def forward(argv: list[str], target: Target) -> int | None:
    """Run ``argv`` in the keeper for ``target``, starting one if there is none; return the
    exit status, or None if no keeper can be reached (then the caller runs it itself)."""
    path = control_path(target)
    if path is None:
        return None
    sock = _connect(path)
    if sock is None:
        if path.is_socket():
            # Left by a keeper that was killed: nobody listens on it.
            with contextlib.suppress(OSError):
                path.unlink()
        if not _start_keeper(path, target):
            return None
        sock = _connect(path)
        if sock is None:
            return None
    with sock:
        try:
            socket.send_fds(sock, [_request(argv)], [1, 2])
        except OSError:
            return None

        def interrupt(_signum: int, _frame: object) -> None:
            with contextlib.suppress(OSError):
                sock.send(_INTERRUPT)

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            return _status(sock)
        finally:
            signal.signal(signal.SIGINT, previous)


def _status(sock: socket.socket) -> int:
    """The command's exit status, as the keeper reports it."""
    reply = b""
    while len(reply) < _STATUS.size:
        try:
            chunk = sock.recv(_STATUS.size - len(reply))
        except OSError:
            chunk = b""
        if not chunk:
            # It may have run part of the command, so running it again here could do it
            # twice: say so instead.
            sys.stderr.write(
                "jobctl: the connection keeper went away before the command ended;"
                " check with 'jobctl ls' before running it again\n"
            )
            return 1
        reply += chunk
    return int(_STATUS.unpack(reply)[0])


# ------------------------------------------------------------------ the keeper itself
async def _readable(sock: socket.socket) -> None:
    import asyncio  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The request and its two descriptors.

    Raises:
        ValueError: a malformed request.
    """
    data, fds = b"", []
    while len(data) < _LENGTH.size or len(data) < _LENGTH.size + _LENGTH.unpack_from(data)[0]:
        if len(data) >= _LENGTH.size and _LENGTH.unpack_from(data)[0] > _MAX_REQUEST:
            raise ValueError("request too large")
        await _readable(sock)
        chunk, got, _flags, _addr = socket.recv_fds(sock, 65536, 2)
        fds += got
        if not chunk:
            raise ValueError("connection closed mid-request")
        data += chunk
    if len(fds) != 2:
        raise ValueError("expected stdout and stderr descriptors")
    return json.loads(data[_LENGTH.size :]), fds


class _Keeper:
    def __init__(self, target: Target, persist: float) -> None:
        import asyncio  # noqa: PLC0415

        self.target = target
        self.persist = persist
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # The one connection every command shares (set by serve).
        self.channel: Any = None

    async def handle(self, sock: socket.socket) -> None:
        import asyncio  # noqa: PLC0415
        import concurrent.futures  # noqa: PLC0415

        from .._units import UsageError, parse_duration  # noqa: PLC0415
        from .__main__ import parser, run_command  # noqa: PLC0415
        from ._io import Io  # noqa: PLC0415

        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            return
        request, fds = await _receive(sock)
        writer = concurrent.futures.ThreadPoolExecutor(1, "jobctl-write")
        io = Io(
            fds[0],
            fds[1],
            out_tty=bool(request.get("out_tty")),
            columns=request.get("columns"),
            no_color=bool(request.get("no_color")),
            writer=writer,
        )
        try:
            args = parser().parse_args(request["argv"])
            target = self.target._replace(timeout=parse_duration(args.timeout, "--timeout"))
            command = asyncio.ensure_future(run_command(args, target, io, self.channel))
            listen = asyncio.ensure_future(self._listen(sock, io))
            await asyncio.wait({command, listen}, return_when=asyncio.FIRST_COMPLETED)
            if not command.done():
                # The jobctl that asked went away: so does its command.
                command.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await command
                return
            listen.cancel()
            # Before the socket closes: its fd number is reused by the next connection,
            # whose reader the cancelled listener would otherwise remove.
            with contextlib.suppress(asyncio.CancelledError):
                await listen
            status = command.result()
        except (UsageError, SystemExit):
            status = 2
        finally:
            writer.shutdown(wait=False)
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(OSError):
            sock.sendall(_STATUS.pack(status))

    async def _listen(self, sock: socket.socket, io: Any) -> None:
        """Ctrl+C bytes from the jobctl that asked, until it hangs up."""
        while True:
            await _readable(sock)
            data = sock.recv(64)
            if not data:
                return
            for _ in range(data.count(_INTERRUPT)):
                io.interrupt()

    async def serve(self, listener: socket.socket) -> None:
        """Answer requests until none came and none ran for ``persist`` seconds."""
        import asyncio  # noqa: PLC0415

        from ..api._tls import TlsFiles  # noqa: PLC0415
        from ..api.client import connect  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        target = self.target
        accept: asyncio.Future[tuple[socket.socket, Any]] | None = None
        async with connect(target.server, TlsFiles(target.ca, target.cert, target.key)) as ch:
            self.channel = ch
            while True:
                if accept is None:
                    accept = asyncio.ensure_future(loop.sock_accept(listener))
                if self.idle.is_set():
                    done, _ = await asyncio.wait({accept}, timeout=self.persist)
                    if not done:
                        accept.cancel()
                        return
                else:
                    idle: asyncio.Future[Any] = asyncio.ensure_future(self.idle.wait())
                    await asyncio.wait({accept, idle}, return_when=asyncio.FIRST_COMPLETED)
                    idle.cancel()
                if accept.done():
                    conn, _ = accept.result()
                    accept = None
                    # Counted before the task runs, so an idle check never misses it.
                    self.active += 1
                    self.idle.clear()
                    task = asyncio.ensure_future(self._run(conn))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

    async def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.setblocking(False)
                await self.handle(conn)
        except (OSError, ValueError):
            pass  # a malformed or vanished client: only its own command is affected
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()


def _keep(target: Target, path: Path, ready_fd: int) -> None:
    import asyncio  # noqa: PLC0415

    from ..api._tls import TlsError, TlsFiles  # noqa: PLC0415

    try:
        TlsFiles(target.ca, target.cert, target.key).read()
    except TlsError:
        # The front end runs the command itself then, and says clearly what is wrong.
        os.write(ready_fd, b"X")
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
    except OSError:
        # Another keeper won the race: it serves the same target.
        os.write(ready_fd, _READY if _connect(path) else b"X")
        return
    listener.listen(64)
    listener.setblocking(False)
    mine = path.stat().st_ino
    os.write(ready_fd, _READY)
    os.close(ready_fd)
    # Colours follow each request's NO_COLOR, not the environment this keeper started in.
    os.environ.pop("NO_COLOR", None)
    try:
        asyncio.run(_Keeper(target, target.control_persist).serve(listener))
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == mine:
                path.unlink()
        listener.close()


def main() -> None:
    from ._config import Target  # noqa: PLC0415

    fields = json.loads(sys.argv[1])
    for name in ("ca", "cert", "key"):
        fields[name] = Path(fields[name])
    _keep(Target(**fields), Path(sys.argv[2]), int(sys.argv[3]))
    # Writer threads blocked on a reader that never drains must not hold the exit up.
    os._exit(0)


if __name__ == "__main__":
    main()
