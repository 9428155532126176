"""The files of one job's directory, and how they are written.

A job directory is self-describing, so the job outlives the server that created it:

- ``spec.json``: the spec and creation time, written by the server before the launch;
- ``run.json``: written by the job's supervisor once the command has been exec'd;
- ``output.log``: the framed output log (see ``_logformat``), appended by the supervisor;
- ``exit.json``: the final state, written by the supervisor after the last output byte (by the
  server for a job that never got a supervisor, or whose supervisor vanished: "lost");
- ``final.json``: written by the server when it sees the job end: the final resource usage
  and OOM flag (from the job's cgroup, before removing it), the disk the job takes, and the
  run and exit records, so a restart reads an ended job from two files;
- ``control.sock``: the supervisor's control socket (stop, signal) while the job runs.

This module is imported by the launcher, so it stays light: no asyncio.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Any, NamedTuple

__all__ = [
    "CONTROL",
    "EXIT",
    "FINAL",
    "LOG",
    "RUN",
    "SPEC",
    "ExitRecord",
    "RunRecord",
    "read_json",
    "reserve",
    "start_ticks",
    "write_json_atomic",
]

SPEC = "spec.json"
RUN = "run.json"
EXIT = "exit.json"
LOG = "output.log"
FINAL = "final.json"
_READ_SIZE = 16384
# Room for an exit record: a few hundred bytes of JSON, with the error message.
RESERVED_BYTES = 4096
CONTROL = "control.sock"


def write_json_atomic(dir_fd: int, name: str, data: dict[str, Any], *, durable: bool) -> None:
    """Write ``name`` in the directory ``dir_fd`` so readers see the old file or the new one.

    ``durable`` adds an fsync, for records that must survive a power loss; the hot start path
    skips it, since a job whose host lost power is reported as lost anyway.
    """
    tmp = _tmp_name(name)
    # No O_TRUNC: a temp file set aside by reserve() keeps its blocks, so the write needs no
    # new space even on a full disk; the truncate after it only ever shrinks the file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        body = json.dumps(data, separators=(",", ":")).encode()
        if os.pwrite(fd, body, 0) != len(body):
            raise OSError(errno.ENOSPC, f"short write of {name}")
        os.ftruncate(fd, len(body))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _tmp_name(name: str) -> str:
    return f".{name}.tmp"


def reserve(dir_fd: int, name: str, size: int = RESERVED_BYTES) -> None:
    """Set disk space aside now for a later :func:`write_json_atomic` of ``name``, so that
    record can still be written once output has filled the disk. Best effort: a filesystem
    without fallocate simply gets no reservation."""
    fd = os.open(_tmp_name(name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def start_ticks(pid_path: str) -> int:
    """Field 22 of /proc/PID/stat: with the pid it names a process uniquely across reuse."""
    with open(f"{pid_path}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces and parentheses; split after the last ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None if the file does not exist."""
    # Raw fd reads, not open(): a restart reads two records per job, and the buffered file
    # object's set-up cost three times the read itself (measured: docs/benchmarks.md (o)).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        parts = [os.read(fd, _READ_SIZE)]
        while len(parts[-1]) == _READ_SIZE:
            parts.append(os.read(fd, _READ_SIZE))
    finally:
        os.close(fd)
    data = json.loads(b"".join(parts))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")  # noqa: TRY004 - a corrupt file, not a caller's type error
    return data


# Records are NamedTuples rather than dataclasses: importing dataclasses pulls in inspect and
# ast, and every module the launcher holds enlarges what each supervisor ends up copying.
class RunRecord(NamedTuple):
    """Where the running job is: the supervisor's pid and start time (to detect pid reuse)."""

    supervisor_pid: int
    supervisor_start_ticks: int
    pid: int
    started_ns: int

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        return cls(**data)


class ExitRecord(NamedTuple):
    """How the job ended. ``state`` is "exited", "stopped" or "failed"."""

    state: str
    exit_code: int | None
    signal: int | None
    error: str | None
    ended_ns: int
    output_truncated: bool

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExitRecord:
        return cls(**data)
