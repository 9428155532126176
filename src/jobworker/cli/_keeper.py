"""The connection keeper process (see ``_control`` for what it is and how jobctl uses it).

    python -m jobworker.cli._keeper TARGET_JSON SOCKET_PATH READY_FD

It holds one mutual-TLS channel to the server and runs each forwarded command
(``_commands``) over it, writing straight to the descriptors the front end passed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import grpc

from .._aio import wait_fd
from .._peer import peer_uid
from .._units import UsageError
from ..api._tls import TlsError, TlsFiles
from ..api.client import connect
from ._commands import run_command
from ._config import Target
from ._control import READY, connect_keeper, file_stamps
from ._environment import job_env
from ._io import Io
from ._parser import check_not_fleet_only, keeper_takes_stdin, names_target, parse
from ._quick import (
    FALLBACK,
    INTERRUPT,
    LENGTH,
    MAX_REQUEST,
    PROGRESS,
    QUICK,
    STATUS,
    quick_path,
)

__all__ = ["main"]


# At most this many inputs (see _quick) are taken quick requests for: a user's shells in
# as many directories with relative certificate paths, say.
MAX_ALIASES = 64


class _Request:
    """One forwarded command: its argv, the facts of the terminal it came from, and the
    job environment it resolved (a full request); or, for a quick request (see _quick),
    the inputs it resolved nothing from and the front end's whole environment."""

    __slots__ = ("alias", "argv", "columns", "env", "environ", "inputs", "no_color", "out_tty")

    def __init__(self, body: bytes) -> None:
        """Raises TypeError or ValueError: not a request the front end sends."""
        self.alias: str | None = None
        self.inputs: str | None = None
        self.environ: dict[str, str] = {}
        if body.startswith(QUICK.encode() + b"\0"):
            self._quick(body.decode("utf-8", "surrogateescape").split("\0"))
            return
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("argv"), list):
            raise TypeError("malformed request")
        self.argv: list[str] = [str(a) for a in data["argv"]]
        columns = data.get("columns")
        self.columns: int | None = columns if isinstance(columns, int) else None
        self.out_tty = bool(data.get("out_tty"))
        self.no_color = bool(data.get("no_color"))
        env = data.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise TypeError("malformed environment")
        self.env: dict[str, str] = env
        alias = data.get("alias")
        self.alias = alias if isinstance(alias, str) else None

    def _quick(self, fields: list[str]) -> None:
        """Raises ValueError: a field missing or malformed (see _quick._request)."""
        _tag, inputs, out_tty, columns, count, *rest = fields
        self.inputs = inputs.replace("\x1f", "\0")
        self.out_tty = out_tty == "1"
        self.columns = int(columns) if columns else None
        self.argv = rest[: int(count)]
        if len(self.argv) != int(count):
            raise ValueError("malformed quick request")
        for item in rest[int(count) :]:
            name, sep, value = item.partition("=")
            if sep:
                self.environ[name] = value
        self.no_color = "NO_COLOR" in self.environ
        self.env = {}


def _tell(sock: socket.socket, message: bytes) -> None:
    """A progress message to the front end; dropped if its socket is full (the next one
    says more) or gone."""
    with contextlib.suppress(OSError):
        sock.send(message)


async def _receive(sock: socket.socket) -> tuple[_Request, list[int]]:
    """The request and its descriptors: stdout, stderr and stdin (a front end before
    ``run -i`` could come through a keeper sent only the first two).

    Raises:
        ValueError: a malformed request (its descriptors are closed).
    """
    fds: list[int] = []
    try:
        data = await _read_request(sock, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return _Request(data), fds


async def _read_request(sock: socket.socket, fds: list[int]) -> bytes:
    """The request's bytes; the descriptors that came with it go into ``fds``.

    Raises:
        ValueError: a malformed request.
    """
    data = b""
    while len(data) < LENGTH.size or len(data) < LENGTH.size + LENGTH.unpack_from(data)[0]:
        if len(data) >= LENGTH.size and LENGTH.unpack_from(data)[0] > MAX_REQUEST:
            raise ValueError("request too large")
        await wait_fd(sock.fileno())
        chunk, got, _flags, _addr = socket.recv_fds(sock, 65536, 3)
        fds += got
        if not chunk:
            raise ValueError("connection closed mid-request")
        data += chunk
    if len(fds) not in (2, 3):
        raise ValueError("expected stdout, stderr and stdin descriptors")
    return data[LENGTH.size :]


class _Keeper:
    def __init__(self, target: Target, persist: float) -> None:
        self.target = target
        self.persist = persist
        # The TLS files' versions at start: a quick request after a renewal goes the
        # full way, to a fresh keeper (as control_path does for full requests).
        self.stamps = file_stamps(target)
        # Inputs a front end resolved to this keeper's target with no flag (see _quick).
        self.aliases: dict[str, None] = {}
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # The one connection every command shares (set by serve).
        self.channel: grpc.aio.Channel | None = None

    async def handle(self, sock: socket.socket) -> None:
        if peer_uid(sock) != os.getuid():
            return
        request, fds = await _receive(sock)
        stdin_fd = fds[2] if len(fds) > 2 else -1
        if request.inputs is None:
            if request.alias is not None:
                self._remember(request.alias)
            args = None
        else:
            args = self._quick_args(request, stdin_fd)
            if args is None:
                # Nothing has run: the front end goes the full way (and prints a usage
                # error or help itself).
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    sock.setblocking(True)
                    sock.sendall(FALLBACK)
                return
        writer = concurrent.futures.ThreadPoolExecutor(1, "jobctl-write")
        io = Io(
            fds[0],
            fds[1],
            out_tty=request.out_tty,
            columns=request.columns,
            no_color=request.no_color,
            writer=writer,
            progress=lambda job, offset: _tell(sock, PROGRESS.pack(b"P", job.encode(), offset)),
            in_fd=stdin_fd,
        )
        try:
            if args is None:
                args = parse(request.argv)
                args.job_env = request.env
            target = self.target._replace(timeout=args.request_timeout)
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
            sock.setblocking(True)
            sock.sendall(STATUS.pack(b"S", status))

    def _remember(self, inputs: str) -> None:
        self.aliases.pop(inputs, None)
        self.aliases[inputs] = None
        while len(self.aliases) > MAX_ALIASES:
            del self.aliases[next(iter(self.aliases))]

    def _quick_args(self, request: _Request, stdin_fd: int) -> argparse.Namespace | None:
        """A quick request's argv parsed, if this keeper runs it as the full way would;
        None if not (see _quick for when)."""
        if request.inputs not in self.aliases or file_stamps(self.target) != self.stamps:
            return None
        try:
            args = parse(request.argv)
            check_not_fleet_only(args)
        except (SystemExit, UsageError):
            return None
        if (
            args.command in ("config", "completion")
            or names_target(args)
            or args.fleet
            or not keeper_takes_stdin(args, stdin_fd)
            or getattr(args, "env_file", None)
        ):
            return None
        if args.command in ("run", "start", "exec"):
            args.job_env = job_env(args.env, [], request.environ)
        return args

    async def _listen(self, sock: socket.socket, io: Io) -> None:
        """Ctrl+C bytes from the jobctl that asked, until it hangs up."""
        while True:
            await wait_fd(sock.fileno())
            data = sock.recv(64)
            if not data:
                return
            for _ in range(data.count(INTERRUPT)):
                io.interrupt()

    async def serve(self, listener: socket.socket) -> None:
        """Answer requests until none came and none ran for ``persist`` seconds."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        target = self.target
        # Any: asyncio types sock_accept's address as Any.
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
                    # Any: the two futures' results differ, and asyncio.wait takes one type.
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
        except (OSError, ValueError, TypeError):
            pass  # a malformed or vanished client: only its own command is affected
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()


def _keep(target: Target, path: Path, ready_fd: int) -> None:
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
        os.write(ready_fd, READY if connect_keeper(path) else b"X")
        return
    listener.listen(64)
    listener.setblocking(False)
    mine = path.stat().st_ino
    os.write(ready_fd, READY)
    os.close(ready_fd)
    # Colours follow each request's NO_COLOR, not the environment this keeper started in.
    os.environ.pop("NO_COLOR", None)
    keeper = _Keeper(target, target.control_persist)
    try:
        asyncio.run(keeper.serve(listener))
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == mine:
                path.unlink()
        # The aliases still leading here (another keeper may have taken one over since).
        for inputs in keeper.aliases:
            alias = quick_path(str(path.parent), inputs)
            with contextlib.suppress(OSError):
                if os.readlink(alias) == path.name:
                    os.unlink(alias)
        listener.close()


def main() -> None:
    fields = json.loads(sys.argv[1])
    for name in ("ca", "cert", "key"):
        fields[name] = Path(fields[name])
    _keep(Target(**fields), Path(sys.argv[2]), int(sys.argv[3]))
    # Writer threads blocked on a reader that never drains must not hold the exit up.
    os._exit(0)


if __name__ == "__main__":
    main()
