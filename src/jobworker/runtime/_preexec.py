"""The pre-exec step: what happens in the command's process between fork and exec.

Forked from the job's supervisor (itself forked from the single-threaded launcher), so plain
Python here is safe: at its launch, or ahead of the job by the standby supervisor, in the
next job's cgroup, where it waits for its go (:func:`await_job`). In order: the job's
spec.json (read here, not in the supervisor: what this process parses is gone at exec),
stdio, signal dispositions and mask, the job's cgroups (born in the v2 one,
``fork_in_cgroup``; the v1 ones joined here), its namespaces and mounts, its cgroup
namespace, its user, ``no_new_privs``, the working directory, then ``execve``.
Any failure is written to the exec-status pipe and the process exits 127; the supervisor
turns that into a ``failed`` job with the reason.

This module is the one place the job's walls are built.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import termios
from collections.abc import Callable
from typing import NamedTuple, NoReturn

from ._jobdir import NEW_ROOT, SPEC, CorruptRecordError, SpecRecord, read_json
from ._linux import (
    CLONE_INTO_CGROUP,
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
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_SECUREBITS,
    SECBITS_LOCKED_NOROOT,
    clone3,
    close_all_but,
    load_seccomp,
    loopback_up,
    mount,
    prctl,
    prctl5,
    sethostname,
    setns,
    unshare,
)
from ._protocol import MAX_ORDER_BYTES, ExecOrder
from ._rootfs import WORKDIR, build_root, finish_prepared_root, show_own_cgroup
from ._spare import NAMESPACES, Spare

__all__ = [
    "DEFAULT_PATH",
    "ExecError",
    "await_job",
    "exec_command",
    "exec_in_job",
    "fork_in_cgroup",
    "go_message",
    "job_env",
    "resolve",
    "seccomp_filter",
    "set_seccomp_filter",
    "warm_up",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The seccomp program every sandboxed job loads: built once by the launcher before it forks
# (``_seccomp.build_filter``), shared copy-on-write with every supervisor.
_SECCOMP_BPF: list[bytes] = []


def set_seccomp_filter(bpf: bytes) -> None:
    _SECCOMP_BPF[:] = [bpf]


def seccomp_filter() -> bytes:
    """Raises ExecError: the launcher built none (a bug: it builds one at start)."""
    if not _SECCOMP_BPF:
        raise ExecError("the seccomp filter was not built; the job cannot start safely")
    return _SECCOMP_BPF[0]


class ExecError(Exception):
    """The command cannot be started; the message is the reason, for the user, and
    ``reason`` its kind: "not_found", "not_executable" or "start_error" (the job's
    ``reason``, which jobctl turns into exit status 127 or 126, as docker does)."""

    def __init__(self, message: str, reason: str = "start_error") -> None:
        super().__init__(message)
        self.reason = reason


# ioctls on a pseudo-terminal master (linux/include/uapi/asm-generic/ioctls.h): unlock the
# peer, and open it through the master (no path lookup in the job's /dev/pts).
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441


def _open_terminal(window: tuple[int, int], status_w: int) -> None:
    """Make a pseudo-terminal of the job's own devpts the job's stdin, stdout, stderr and
    controlling terminal, and hand its master to the supervisor over ``status_w`` (a
    SEQPACKET socket): opened here, inside the job's root, so ``tty`` names a /dev/pts
    device of the job's own, as runc's console socket does."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    peer = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    rows, cols = window
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    fcntl.ioctl(peer, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(peer, fd)
    os.close(peer)
    channel = socket.socket(fileno=status_w)
    try:
        socket.send_fds(channel, [b"T"], [master])
    finally:
        channel.detach()
    os.close(master)


def job_env(spec_env: dict[str, str], job_id: str, home: str = "/") -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": home, "LANG": "C.UTF-8", "JOBWORKER_JOB_ID": job_id}
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


def resolve(argv0: str, env: dict[str, str]) -> str:
    """The executable to exec for ``argv0``: as given if it has a slash, else from PATH.

    Raises:
        ExecError: it is not in the job's PATH.
    """
    if "/" in argv0:
        return argv0
    found = which(argv0, env.get("PATH", ""))
    if found is None:
        raise ExecError(
            f"executable {argv0!r} not found in PATH ({env.get('PATH', '')})", "not_found"
        )
    return found


def _enter_namespaces(spec: SpecRecord, new_root: str, spare: Spare | None) -> None:
    """Every namespace but the cgroup one (made once we are in the job's cgroups). With a
    ``spare`` (it fits the job: never on the host's network), its namespaces, built ahead
    for us: only our own part of the root is left to build, and the loopback is up."""
    own_network = not spec.host_network
    if spare is not None and spec.sandbox is not None:
        # The mount namespace's root is the root built ahead: setns puts us there.
        for fd, (name, flag) in zip(spare.namespaces, NAMESPACES, strict=True):
            setns(fd, flag, f"the {name} namespace built ahead")
        spare.close()
        finish_prepared_root(spec.sandbox, spec.uid, spec.gid)
    else:
        flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | (CLONE_NEWNET if own_network else 0)
        unshare(flags, "mount, UTS, IPC, net")
        # Nothing mounted from here on may propagate back to the host.
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        if spec.sandbox is not None:
            build_root(new_root, spec.sandbox, spec.uid, spec.gid, own_network=own_network)
        else:
            _proc_and_sys(own_network=own_network)
        if own_network:
            loopback_up()
    sethostname(spec.hostname)


def _proc_and_sys(*, own_network: bool) -> None:
    """With no sandbox: a /proc of the job's PID namespace (ps shows only the job's
    processes), and with its own network a sysfs of it (it shows the network devices of
    the namespace that mounts it, and hides the host's cgroup files), read-only."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if own_network:
        mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _cap_last() -> int:
    fd = os.open("/proc/sys/kernel/cap_last_cap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(os.read(fd, 32))
    finally:
        os.close(fd)


def _drop_privileges(spec: SpecRecord, last_cap: int) -> None:
    """Sandboxed, no capability can come back, even for a job mapped to uid 0: the
    bounding and ambient sets emptied and the securebits locked (while we still hold
    CAP_SETPCAP). Then the job's own uid and gid with no supplementary groups,
    no_new_privs, no core dumps."""
    if spec.sandbox is not None:
        for cap in range(last_cap + 1):
            prctl(PR_CAPBSET_DROP, cap, "PR_CAPBSET_DROP")
        prctl5(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, "PR_CAP_AMBIENT_CLEAR_ALL")
        prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT, "PR_SET_SECUREBITS")
    os.setgroups([])
    os.setgid(spec.gid)
    os.setuid(spec.uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def fork_in_cgroup(unified: str) -> tuple[int, bool]:
    """In the supervisor: fork a process of the job, born in the job's cgroup v2 directory
    ``unified`` ("" for none) where the kernel allows (:func:`clone3`). Returns
    what os.fork does, and whether the process was born there; if not, it joins that
    cgroup itself (:func:`_join_cgroups`), whose write then says what is wrong.

    Raises:
        OSError: fork failed.
    """
    if not unified:
        return os.fork(), False
    try:
        fd = os.open(unified, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return os.fork(), False
    try:
        return clone3(CLONE_INTO_CGROUP, fd), True
    except OSError:
        return os.fork(), False
    finally:
        os.close(fd)


def _join_cgroups(spec: SpecRecord, *, born_in_unified: bool) -> None:
    """Move this process into the job's cgroups, before anything of the job's is made:
    "0" written into each file :meth:`CgroupPaths.join_files` names (0 is the writer; the
    kernel reads a pid in the writer's PID namespace, where a host pid means nothing).

    Raises:
        ExecError: a cgroup refused it (removed meanwhile, or full: its pids.max).
    """
    if spec.cgroup is None:
        return
    for path in spec.cgroup.join_files(born_in_unified=born_in_unified):
        try:
            _join(path)
        except OSError as e:
            raise ExecError(f"cannot move the command into the job's cgroups: {e.strerror}") from e


def _join(path: str) -> None:
    """Write "0" (this process) into a cgroup's ``path``.

    Raises:
        OSError: the cgroup refused it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def _isolate(
    spec: SpecRecord, new_root: str, spare: Spare | None, *, born_in_unified: bool, joined: bool
) -> None:
    """Join the job's cgroups first (unless ``joined`` ahead), so that all the process
    makes from here on (its root's tmpfs pages, its children) is counted in them; then the
    job's own namespaces and root, the cgroup namespace (whose root is the cgroup we are
    in), and drop privileges."""
    last_cap = _cap_last()  # read while the host's /proc is still there
    if not joined:
        _join_cgroups(spec, born_in_unified=born_in_unified)
    if spec.namespaces:
        _enter_namespaces(spec, new_root, spare)
        unshare(CLONE_NEWCGROUP, "cgroup")
        if spec.sandbox is not None and spec.sandbox.cgroup2 and not spec.host_network:
            show_own_cgroup()
    _drop_privileges(spec, last_cap)


def _default_signals() -> None:
    """Every signal at its default and none blocked. Python ignores SIGPIPE and SIGXFSZ
    (and the launcher more), and ignored signals stay ignored across exec."""
    signal.set_wakeup_fd(-1)
    for signum in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def await_job(
    stdio: tuple[int, int],
    status_w: int,
    go: socket.socket,
    where: tuple[str, tuple[str, ...]] | None,
    joins: tuple[str, ...],
) -> NoReturn:
    """In a process a standby forked ahead of its job (in the job's cgroup v2 directory,
    if it has one): the job's other cgroups (``joins``, as :func:`_join_cgroups` writes
    them), a session of its own and default signals now, then wait on ``go`` for the job
    (:func:`go_message`) and run its command as :func:`exec_command` does; ``where`` is the
    launcher's spare roots. Exits 0 if ``go`` closes first, 1 on a failure before the job
    comes (the supervisor then forks the command itself, and that one reports it)."""
    try:
        for path in joins:
            _join(path)
        os.setsid()
        close_all_but(*stdio, status_w, go.fileno())
        _default_signals()
        warm_up()
        msg, fds, _flags, _addr = socket.recv_fds(go, MAX_ORDER_BYTES, 1 + len(NAMESPACES))
    except BaseException:  # noqa: BLE001 - no job yet: nobody to report to
        os._exit(1)
    go.close()
    if not msg:
        os._exit(0)
    stdin = fds.pop(0) if msg[:1] == b"i" else None
    spare = Spare(tuple(fds), *where) if fds and where is not None else None
    try:
        os.chdir(msg[1:].decode())
    except OSError as e:
        _fail(status_w, "start_error", f"cannot enter the job's directory: {e.strerror}")
    exec_command(stdio, status_w, born_in_unified=True, stdin=stdin, spare=spare, fresh=False)


def go_message(job_dir: str, *, stdin: bool) -> bytes:
    """What :func:`await_job` waits for: the job's directory, and whether the first
    descriptor passed with it is the job's stdin."""
    return (b"i" if stdin else b"-") + job_dir.encode()


# A spec.json of the shape every job's has, for warm_up.
_SAMPLE_SPEC = json.dumps(
    {
        "id": "x",
        "created_ns": 1,
        "spec": {"argv": ["true"], "env": {}, "cwd": "/", "owner": "x"},
        "limits": {},
        "output_limit": 1,
        "uid": 65534,
        "gid": 65534,
        "hostname": "x",
        "namespaces": True,
        "cgroup": {"pids": "/x"},
    }
).encode()


def warm_up() -> SpecRecord:
    """Read a spec from its JSON as a job's is read, and make its environment and look up
    its executable, so that what this writes (caches, specialised bytecode, the pages of
    the objects it touches) is made or copied now, before a job comes. Returns it."""
    spec = SpecRecord.from_json(json.loads(_SAMPLE_SPEC))
    _env(spec, {}, None)
    which("true", DEFAULT_PATH)
    return spec


def exec_command(  # noqa: PLR0913 - each is one descriptor or fact the child needs
    stdio: tuple[int, int],
    status_w: int,
    *,
    born_in_unified: bool,
    stdin: int | None = None,
    spare: Spare | None = None,
    fresh: bool = True,
) -> NoReturn:
    """In the forked child, in the job's directory: the job's spec, stdio (``stdin`` the
    read end of the job's stdin pipe, or None for /dev/null; ``stdio`` = stdout and stderr
    write ends; a terminal job gets its terminal instead, once inside its root), signals,
    isolation (on ``spare``, the root built ahead, if it fits the job), cwd, the seccomp
    filter, then exec. ``born_in_unified``: :func:`fork_in_cgroup` made this process in the
    job's cgroup v2 directory. Never returns; a failure is written to
    ``status_w``. ``fresh`` is False in a process forked ahead (:func:`await_job`), which
    has its cgroups, session and signals already. The executable is looked up in the
    job's PATH after the job's root is in place and as the job's user, so it is the job's
    own view that decides."""
    try:
        spec = _read_spec()
        if spare is not None and not (
            spec.sandbox is not None and spare.fits(spec.sandbox, host_network=spec.host_network)
        ):
            spare.close()
            spare = None
        new_root = _root_place(spec, spare)
    except ExecError as e:
        _fail(status_w, e.reason, str(e))
    except OSError as e:
        _fail(status_w, "start_error", f"cannot make the job's root: {e.strerror}")
    tty = spec.stdin_mode == "tty"
    env = _env(spec, {}, spec.term if tty else None)
    _start(
        spec,
        _Command(spec.argv, env, spec.cwd, spec.window if tty else None),
        stdio=(stdin, *stdio),
        status_w=status_w,
        enter=lambda: _isolate(
            spec, new_root, spare, born_in_unified=born_in_unified, joined=not fresh
        ),
        keep=() if spare is None else spare.namespaces,
        root=new_root,
        fresh=fresh,
    )


def _read_spec() -> SpecRecord:
    """The job's spec.json, from the current directory (the job's).

    Raises:
        ExecError: it is missing or corrupt.
    """
    try:
        data = read_json(SPEC)
        if data is None:
            raise ExecError("the job's spec.json is missing")
        return SpecRecord.from_json(data)
    except CorruptRecordError as e:
        raise ExecError(f"the job's record is corrupt: {e}") from None
    except OSError as e:
        raise ExecError(f"cannot read the job's spec.json: {e.strerror}") from None


def _root_place(spec: SpecRecord, spare: Spare | None) -> str:
    """Where the job's root is built, as the host names it: where the spare's was, or an
    empty directory of the job's (never seen by anyone else).

    Raises:
        OSError: that directory cannot be made.
    """
    if spare is not None:
        return spare.at
    new_root = os.path.abspath(NEW_ROOT)
    if spec.sandbox is not None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(new_root, 0o700)
    return new_root


def _env(spec: SpecRecord, extra: dict[str, str], term: str | None) -> dict[str, str]:
    """The environment of a process of the job: the job's, then ``extra``, and ``TERM`` on
    a terminal (unless given)."""
    home = WORKDIR if spec.sandbox is not None else "/"
    env = job_env({**spec.env, **extra}, spec.id, home)
    if term is not None:
        env.setdefault("TERM", term)
    return env


def exec_in_job(
    order: ExecOrder,
    *,
    stdio: tuple[int | None, int, int],
    status_w: int,
    job_pidfd: int,
    born_in_unified: bool,
) -> NoReturn:
    """In a child the supervisor forked (so already in the job's PID namespace, and in the
    job's directory): run ``order`` inside the running job whose command ``job_pidfd``
    names, as ``docker exec`` does: its cgroups, then its other namespaces (and with its
    mount namespace, its root), its terminal if asked, its user, its seccomp filter. Never
    returns; a failure is written to ``status_w`` as :func:`exec_command` does."""
    try:
        spec = _read_spec()
    except ExecError as e:
        _fail(status_w, e.reason, str(e))
    cwd = order.cwd if order.cwd is not None else spec.cwd
    window = order.window if order.tty else None
    env = _env(spec, order.env, order.term if order.tty else None)

    def enter() -> None:
        _join_cgroups(spec, born_in_unified=born_in_unified)
        last_cap = _cap_last()
        if spec.namespaces:
            flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP | CLONE_NEWNET
            setns(job_pidfd, flags, "the job's mount, UTS, IPC, cgroup and net namespaces")
        _drop_privileges(spec, last_cap)

    _start(
        spec,
        _Command(order.argv, env, cwd, window),
        stdio=stdio,
        status_w=status_w,
        enter=enter,
        keep=(job_pidfd,),
    )


class _Command(NamedTuple):
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    # A terminal of this size (rows, columns) is the process's stdio; None: the pipes.
    window: tuple[int, int] | None


def _start(  # noqa: PLR0913 - each is one descriptor or fact the child needs
    spec: SpecRecord,
    command: _Command,
    *,
    stdio: tuple[int | None, int, int],
    status_w: int,
    enter: Callable[[], None],
    keep: tuple[int, ...],
    root: str = "",
    fresh: bool = True,
) -> NoReturn:
    """What the job's command and an exec'd process share: a session of its own, stdio
    (``None`` stdin: /dev/null), only ``status_w`` and ``keep`` left open, default signals,
    ``enter`` (the walls), the terminal, cwd, seccomp, exec. ``root`` is the job's root as
    the host names it, cut from messages."""
    stage = "set up the job's process"
    reason = "start_error"
    try:
        if fresh:
            os.setsid()
        stdin, stdout, stderr = stdio
        os.dup2(os.open("/dev/null", os.O_RDONLY) if stdin is None else stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        # Only 0-2 survive: nothing of the launcher or the server can leak into the job.
        close_all_but(status_w, *keep)
        if fresh:
            _default_signals()
        stage = "isolate the job (cgroups, namespaces, root, user)"
        enter()
        if command.window is not None:
            stage = "open the job's terminal"
            _open_terminal(command.window, status_w)
        exe = resolve(command.argv[0], command.env)
        stage = f"change to working directory {command.cwd!r}"
        os.chdir(command.cwd)
        if spec.sandbox is not None and spec.sandbox.seccomp:
            stage = "install the seccomp filter"
            load_seccomp(seccomp_filter())
        stage = f"execute {exe!r}"
        reason = "not_executable"
        os.execve(exe, command.argv, command.env)  # noqa: S606 - the user's argv, no shell, is the job
    except ExecError as e:
        message, reason = str(e), e.reason
    except OSError as e:
        message = f"cannot {stage}: {e.strerror}"
        if reason == "not_executable" and e.errno == errno.ENOENT:
            reason = "not_found"
    except BaseException as e:  # noqa: BLE001 - anything here must become a report, not a trace
        message = f"cannot {stage}: {e}"
    if root:
        # The job's root is built in the server's state dir; a failing mount names its
        # target there. The user sees the path as the job would (".../root/sys" -> "/sys").
        message = message.replace(root, "")
    _fail(status_w, reason, message)


def _fail(status_w: int, reason: str, message: str) -> NoReturn:
    """Report why the process cannot start (the supervisor makes it the job's failure, or
    the exec's error), and exit."""
    with contextlib.suppress(OSError):
        os.write(status_w, b"E" + reason.encode() + b"\n" + message.encode())
    os._exit(127)
