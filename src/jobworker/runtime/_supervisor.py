"""The job's supervisor: PID 1 of the job's PID namespace, one small process per job.

It is forked from the launcher (never from the threaded server), so plain Python between fork
and exec is safe here. It:

- forks the user's command as PID 2, with stdin from /dev/null, stdout and stderr to pipes and
  no other inherited fd, and reports exec success or the OS error back;
- copies both pipes into the framed output log from the first byte, up to the output cap;
- reaps every process of the namespace, so no zombie is left;
- serves stop and signal requests on ``control.sock``: ``kill(-1, sig)`` from PID 1 reaches
  every process of the namespace, including ones that called setsid or double-forked;
- when the command exits, SIGKILLs whatever it left behind (container semantics), so a
  grandchild holding the pipe open cannot keep the job alive;
- writes ``exit.json`` after the last output byte is in the log.

It lives outside the server, so the server can die (even SIGKILL) without the job losing
output or its exit status.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import select
import signal
import socket
import struct
import time
from typing import Any, NoReturn

from ._linux import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    PR_SET_NO_NEW_PRIVS,
    loopback_up,
    mount,
    prctl,
    sethostname,
    unshare,
)
from ._logformat import HEADER, MAGIC, Stream
from ._records import (
    CONTROL,
    EXIT,
    LOG,
    RUN,
    SPEC,
    ExitRecord,
    RunRecord,
    reserve,
    start_ticks,
    write_json_atomic,
)

__all__ = ["DEFAULT_PATH", "job_env", "run_supervisor", "start_ticks", "which"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GRACE_S = 10.0
# 1 MiB pipes and reads: the design notes measured 1.1-1.7 GB/s into the log this way against
# 0.4-0.9 GB/s with the default 64 KiB.
PIPE_SIZE = 1 << 20
READ_SIZE = 1 << 20
_UCRED = struct.Struct("3i")
_CLOSE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def job_env(spec_env: dict[str, str], job_id: str) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/", "LANG": "C.UTF-8", "JOBWORKER_JOB_ID": job_id}
    env.update(spec_env)
    return env


def which(name: str, path: str) -> str | None:
    """The first executable ``name`` in ``path``, like ``shutil.which``.

    Written out because importing shutil drags in the compression modules, and the launcher's
    imports are memory each job's supervisor may copy (docs/benchmarks.md, figure d).
    """
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


class _Supervisor:
    def __init__(self, job_dir: str, report: socket.socket) -> None:
        os.chdir(job_dir)  # every name below is relative, which also keeps the socket path short
        self.dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.report: socket.socket | None = report
        meta = _read_spec()
        self.meta = meta
        self.job_id: str = meta["id"]
        self.spec: dict[str, Any] = meta["spec"]
        self.output_limit: int = meta["output_limit"]
        # Before any output can fill the disk: the job's end must be recordable regardless.
        reserve(self.dir_fd, EXIT)
        self.log_fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.log_size = os.fstat(self.log_fd).st_size
        if self.log_size == 0:
            os.write(self.log_fd, MAGIC)
            self.log_size = len(MAGIC)
        self.written = 0
        self.truncated = False
        # Anonymous mmap, not bytearray: CPython zero-fills a bytearray, making all of it
        # resident at once; mmap pages cost nothing until output actually arrives, which
        # keeps an idle job's supervisor small.
        self.buf = mmap.mmap(-1, READ_SIZE)
        self.view = memoryview(self.buf)
        self.cmd_pid = 0
        self.cmd_status: int | None = None
        self.children_left = True
        self.stop_requested = False
        self.kill_at: float | None = None

    # ---------------------------------------------------------------- output log
    def _append(self, stream: Stream, data: memoryview | bytes) -> bool:
        header = HEADER.pack(len(data), stream, time.time_ns())
        want = len(header) + len(data)
        try:
            done = os.writev(self.log_fd, [header, data])
        except OSError as e:
            done, err = 0, e
        else:
            if done == want:
                self.log_size += done
                return True
            err = OSError(errno.ENOSPC, "short write")
        # Cut the torn record off so readers never see half a frame, then stop logging.
        with contextlib.suppress(OSError):
            os.ftruncate(self.log_fd, self.log_size)
        self.truncated = True
        with contextlib.suppress(OSError):
            note = f"[jobworker] output truncated: writing the log failed: {err.strerror}\n"
            self._append_raw(Stream.SYSTEM, note.encode())
        return False

    def _append_raw(self, stream: Stream, data: bytes) -> None:
        header = HEADER.pack(len(data), stream, time.time_ns())
        if os.writev(self.log_fd, [header, data]) == len(header) + len(data):
            self.log_size += len(header) + len(data)

    def _output(self, stream: Stream, data: memoryview) -> None:
        if self.truncated:
            return  # keep draining the pipe so the job never blocks, but drop the bytes
        room = self.output_limit - self.written
        if len(data) > room:
            if room > 0:
                self._append(stream, data[:room])
            self.written = self.output_limit
            self.truncated = True
            note = (
                f"[jobworker] output truncated: the job wrote more than the {self.output_limit}"
                " byte output limit; the rest is discarded\n"
            )
            with contextlib.suppress(OSError):
                self._append_raw(Stream.SYSTEM, note.encode())
            return
        if self._append(stream, data):
            self.written += len(data)

    # ---------------------------------------------------------------- the command
    def _resolve(self, env: dict[str, str]) -> str:
        argv0: str = self.spec["argv"][0]
        if "/" in argv0:
            return argv0
        found = which(argv0, env.get("PATH", ""))
        if found is None:
            raise _StartError(f"executable {argv0!r} not found in PATH ({env.get('PATH', '')})")
        return found

    def spawn(self) -> tuple[int, int]:
        """Fork and exec the command; return the read ends of its stdout and stderr pipes.

        Raises:
            _StartError: the command could not be started (the text names the OS error).
        """
        env = job_env(self.spec["env"], self.job_id)
        exe = self._resolve(env)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        for fd in (out_r, err_r):
            with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep default
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            _exec_command(exe, self.meta, env, out_w=out_w, err_w=err_w, status_w=status_w)
        os.close(out_w)
        os.close(err_w)
        os.close(status_w)
        self.cmd_pid = pid
        chunks = []
        while chunk := os.read(status_r, 65536):  # EOF: exec succeeded (status_w is CLOEXEC)
            chunks.append(chunk)
        os.close(status_r)
        report = b"".join(chunks)
        if report.startswith(b"E"):
            _, status = os.waitpid(pid, 0)
            self.cmd_status = status
            os.close(out_r)
            os.close(err_r)
            raise _StartError(report[1:].decode("utf-8", "replace"))
        return out_r, err_r

    # ---------------------------------------------------------------- signals and stop
    def _kill_all(self, sig: int) -> None:
        # From PID 1 of a PID namespace, kill(-1) reaches every other process in it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, sig)

    def request_stop(self, grace: float) -> bool:
        if self.cmd_status is not None:
            return False
        deadline = time.monotonic() + max(grace, 0.0)
        if not self.stop_requested:
            self.stop_requested = True
            self._kill_all(signal.SIGTERM)
            self.kill_at = deadline
        elif self.kill_at is not None:
            self.kill_at = min(self.kill_at, deadline)
        if grace <= 0:
            self._check_deadline()
        return True

    def _check_deadline(self) -> None:
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            self.kill_at = None
            self._kill_all(signal.SIGKILL)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children_left = False
                return
            if pid == 0:
                return
            if pid == self.cmd_pid and self.cmd_status is None:
                self.cmd_status = status
                self.kill_at = None
                # The command is the job: once it is gone, so is everything it left behind.
                self._kill_all(signal.SIGKILL)

    # ---------------------------------------------------------------- control socket
    def handle_command(self, line: str) -> str:
        verb, _, arg = line.strip().partition(" ")
        try:
            if verb == "stop":
                return "ok" if self.request_stop(float(arg)) else "ended"
            if verb == "signal":
                if self.cmd_status is not None:
                    return "ended"
                self._kill_all(int(arg))
                return "ok"
        except (ValueError, OSError) as e:
            return f"error {e}"
        return f"error unknown command {verb!r}"

    # ---------------------------------------------------------------- reporting
    def send_report(self, data: dict[str, Any], fds: list[int]) -> None:
        if self.report is None:
            return
        # The server may be gone (restarted); the job goes on regardless.
        with contextlib.suppress(OSError):
            socket.send_fds(self.report, [json.dumps(data).encode()], fds)
        self.report.close()
        self.report = None

    def finish(self, state: str, error: str | None) -> NoReturn:
        exit_code = sig = None
        if self.cmd_status is not None:
            code = os.waitstatus_to_exitcode(self.cmd_status)
            exit_code, sig = (code, None) if code >= 0 else (None, -code)
        record = ExitRecord(
            state=state,
            exit_code=exit_code if state != "failed" else None,
            signal=sig if state != "failed" else None,
            error=error,
            ended_ns=time.time_ns(),
            output_truncated=self.truncated,
        )
        # No fsync of the log: it would flush everything the job wrote (up to the cap) before
        # the job could be reported as ended. Records are length-framed, so a tail lost to a
        # power failure reads as a torn record and is ignored; the exit record is durable.
        os.close(self.log_fd)
        write_json_atomic(self.dir_fd, EXIT, record.to_json(), durable=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CONTROL)
        self.send_report({"ok": False, "exit": record.to_json()}, [])
        os._exit(0)

    # ---------------------------------------------------------------- main loop
    def serve(self, out_r: int, err_r: int, wakeup_r: int, listener: socket.socket) -> None:
        poller = select.poll()
        streams = {out_r: Stream.STDOUT, err_r: Stream.STDERR}
        for fd in (out_r, err_r, wakeup_r, listener.fileno()):
            poller.register(fd, select.POLLIN)
        conns: dict[int, tuple[socket.socket, bytearray]] = {}
        self.reap()
        while streams or self.children_left:
            timeout = None
            if self.kill_at is not None:
                timeout = max(0, int((self.kill_at - time.monotonic()) * 1000) + 1)
            for fd, _events in poller.poll(timeout):
                if fd in streams:
                    self._pump(fd, streams, poller)
                elif fd == wakeup_r:
                    self._on_signals(os.read(wakeup_r, 512))
                elif fd == listener.fileno():
                    self._accept(listener, poller, conns)
                elif fd in conns:
                    self._serve_conn(fd, poller, conns)
            self._check_deadline()
        for conn, _ in conns.values():
            conn.close()
        listener.close()

    def _pump(self, fd: int, streams: dict[int, Stream], poller: select.poll) -> None:
        n = os.readv(fd, [self.buf])
        if n:
            self._output(streams[fd], self.view[:n])
        else:
            poller.unregister(fd)
            os.close(fd)
            del streams[fd]

    def _on_signals(self, signums: bytes) -> None:
        for signum in signums:
            if signum in _CLOSE_SIGNALS:
                self.request_stop(DEFAULT_GRACE_S)
        self.reap()

    def _accept(
        self,
        listener: socket.socket,
        poller: select.poll,
        conns: dict[int, tuple[socket.socket, bytearray]],
    ) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        # The job dir is 0700, but check the peer too: only our own uid may steer the job.
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _pid, uid, _gid = _UCRED.unpack(cred)
        if uid != os.geteuid():
            conn.close()
            return
        conn.setblocking(False)
        conns[conn.fileno()] = (conn, bytearray())
        poller.register(conn.fileno(), select.POLLIN)

    def _serve_conn(
        self, fd: int, poller: select.poll, conns: dict[int, tuple[socket.socket, bytearray]]
    ) -> None:
        conn, buf = conns[fd]
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if b"\n" in buf or not data or len(buf) > 4096:
            if b"\n" in buf:
                reply = self.handle_command(buf.split(b"\n", 1)[0].decode("ascii", "replace"))
                with contextlib.suppress(OSError):
                    conn.send(reply.encode() + b"\n")
            poller.unregister(fd)
            del conns[fd]
            conn.close()


class _StartError(Exception):
    """The command could not be started; the message is the reason, for the user."""


def _read_spec() -> dict[str, Any]:
    with open(SPEC, "rb") as f:
        data: dict[str, Any] = json.loads(f.read())
    return data


def _enter_namespaces(meta: dict[str, Any]) -> None:
    host_network = meta["spec"].get("host_network", False)
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP
    unshare(flags | (0 if host_network else CLONE_NEWNET), "mount, UTS, IPC, cgroup, net")
    # Nothing mounted from here on may propagate back to the host.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A /proc of the job's PID namespace: ps shows only the job's processes.
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not host_network:
        # sysfs shows the network devices of the namespace that mounts it; also hides the
        # host's cgroup files. Read-only.
        mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        loopback_up()
    sethostname(meta["hostname"])


def _isolate(meta: dict[str, Any]) -> None:
    """Join the job's cgroups, enter its own namespaces, drop privileges (in that order).

    Runs in the command's process before exec, so none of the user's code runs outside its
    cgroup and namespaces. "0" names the writing process: its host pid would mean nothing
    here, inside the job's PID namespace.
    """
    for procs in meta["cgroup_procs"]:
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    if meta["namespaces"]:
        _enter_namespaces(meta)
    os.setgroups([])
    os.setgid(meta["gid"])
    os.setuid(meta["uid"])
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def _exec_command(  # noqa: PLR0913 - the three fds are the point of this function
    exe: str, meta: dict[str, Any], env: dict[str, str], *, out_w: int, err_w: int, status_w: int
) -> NoReturn:
    """In the forked child: stdio, signals, isolation, cwd, then exec. Never returns."""
    spec = meta["spec"]
    stage = "set up the job's process"
    try:
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        # Only 0-2 survive: nothing of the launcher or the server can leak into the job.
        os.closerange(3, status_w)
        os.closerange(status_w + 1, 1 << 20)
        signal.set_wakeup_fd(-1)
        # Python ignores SIGPIPE and SIGXFSZ, and ignored signals stay ignored across exec.
        for signum in range(1, signal.NSIG):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        stage = "isolate the job (cgroups, namespaces, user)"
        _isolate(meta)
        stage = f"change to working directory {spec['cwd']!r}"
        os.chdir(spec["cwd"])
        stage = f"execute {exe!r}"
        os.execve(exe, spec["argv"], env)  # noqa: S606 - exec'ing the user's argv, no shell, is the job
    except OSError as e:
        message = f"cannot {stage}: {e.strerror}"
    except BaseException as e:  # noqa: BLE001 - anything here must become a report, not a trace
        message = f"cannot {stage}: {e!r}"
    with contextlib.suppress(OSError):
        os.write(status_w, b"E" + message.encode())
    os._exit(127)


def _noop(_signum: int, _frame: object) -> None:
    """A Python-level handler, so the signal reaches the wakeup fd (and PID 1 receives it)."""


def run_supervisor(job_dir: str, report: socket.socket) -> NoReturn:
    """Run the job in ``job_dir`` as PID 1 of a fresh PID namespace. Never returns."""
    wakeup_r, wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    for signum in (signal.SIGCHLD, *_CLOSE_SIGNALS):
        signal.signal(signum, _noop)
    sup = _Supervisor(job_dir, report)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(CONTROL)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(CONTROL)
    os.chmod(CONTROL, 0o600)
    listener.listen(16)
    listener.setblocking(False)
    try:
        out_r, err_r = sup.spawn()
    except _StartError as e:
        sup.finish("failed", str(e))
    # /proc is still the host's here, so it names our host pid, which the server needs.
    host_pid = int(os.readlink("/proc/self"))
    cmd_host_pid = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        children = open(f"/proc/{host_pid}/task/{host_pid}/children").read().split()  # noqa: SIM115
        cmd_host_pid = int(children[0])
    run = RunRecord(
        supervisor_pid=host_pid,
        supervisor_start_ticks=start_ticks(f"/proc/{host_pid}"),
        pid=cmd_host_pid,
        started_ns=time.time_ns(),
    )
    write_json_atomic(sup.dir_fd, RUN, run.to_json(), durable=False)
    # pidfd_open resolves pids in our own namespace, where we are 1.
    pidfd = os.pidfd_open(1)
    sup.send_report({"ok": True, "run": run.to_json()}, [pidfd])
    os.close(pidfd)
    sup.serve(out_r, err_r, wakeup_r, listener)
    sup.finish("stopped" if sup.stop_requested else "exited", None)
