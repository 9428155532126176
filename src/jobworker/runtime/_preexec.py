"""The pre-exec step: what happens in the command's process between fork and exec.

Forked from the job's supervisor (itself forked from the single-threaded launcher), so plain
Python here is safe. In order: stdio, signal dispositions and mask, the job's cgroups, its
namespaces and mounts, its user, ``no_new_privs``, the working directory, then ``execve``.
Any failure is written to the exec-status pipe and the process exits 127; the supervisor
turns that into a ``failed`` job with the reason.

This module is the one place the job's walls are built.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import NoReturn

from ._jobdir import SpecRecord
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

__all__ = ["DEFAULT_PATH", "ExecError", "exec_command", "job_env", "resolve"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ExecError(Exception):
    """The command cannot be started; the message is the reason, for the user."""


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


def resolve(argv0: str, env: dict[str, str]) -> str:
    """The executable to exec for ``argv0``: as given if it has a slash, else from PATH.

    Raises:
        ExecError: it is not in the job's PATH.
    """
    if "/" in argv0:
        return argv0
    found = which(argv0, env.get("PATH", ""))
    if found is None:
        raise ExecError(f"executable {argv0!r} not found in PATH ({env.get('PATH', '')})")
    return found


def _enter_namespaces(spec: SpecRecord) -> None:
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP
    unshare(flags | (0 if spec.host_network else CLONE_NEWNET), "mount, UTS, IPC, cgroup, net")
    # Nothing mounted from here on may propagate back to the host.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A /proc of the job's PID namespace: ps shows only the job's processes.
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not spec.host_network:
        # sysfs shows the network devices of the namespace that mounts it; also hides the
        # host's cgroup files. Read-only.
        mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        loopback_up()
    sethostname(spec.hostname)


def _isolate(spec: SpecRecord) -> None:
    """Join the job's cgroups, enter its own namespaces, drop privileges (in that order).

    "0" names the writing process: its host pid would mean nothing here, inside the job's
    PID namespace.
    """
    if spec.cgroup is not None:
        for procs in spec.cgroup.procs_files:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
    if spec.namespaces:
        _enter_namespaces(spec)
    os.setgroups([])
    os.setgid(spec.gid)
    os.setuid(spec.uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def exec_command(
    exe: str, spec: SpecRecord, env: dict[str, str], stdio: tuple[int, int], status_w: int
) -> NoReturn:
    """In the forked child: stdio (``stdio`` = stdout and stderr write ends), signals,
    isolation, cwd, then exec. Never returns; a failure is written to ``status_w``."""
    stage = "set up the job's process"
    try:
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdio[0], 1)
        os.dup2(stdio[1], 2)
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
        _isolate(spec)
        stage = f"change to working directory {spec.cwd!r}"
        os.chdir(spec.cwd)
        stage = f"execute {exe!r}"
        os.execve(exe, spec.argv, env)  # noqa: S606 - exec'ing the user's argv, no shell, is the job
    except OSError as e:
        message = f"cannot {stage}: {e.strerror}"
    except BaseException as e:  # noqa: BLE001 - anything here must become a report, not a trace
        message = f"cannot {stage}: {e!r}"
    with contextlib.suppress(OSError):
        os.write(status_w, b"E" + message.encode())
    os._exit(127)
