"""The files of one job's directory, and how they are written.

A job directory is self-describing, so the job outlives the server that created it:

- ``spec.json``: the spec and creation time, written by the server before the launch;
- ``run.json``: written by the job's supervisor once the command has been exec'd;
- ``output.log``: the framed output log (see ``_logformat``), appended by the supervisor;
- ``exit.json``: the final state, written by the supervisor after the last output byte;
- ``control.sock``: the supervisor's control socket (stop, signal) while the job runs.

This module is imported by the launcher, so it stays light: no asyncio.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

__all__ = [
    "CONTROL",
    "EXIT",
    "LOG",
    "RUN",
    "SPEC",
    "ExitRecord",
    "RunRecord",
    "read_json",
    "write_json_atomic",
]

SPEC = "spec.json"
RUN = "run.json"
EXIT = "exit.json"
LOG = "output.log"
CONTROL = "control.sock"


def write_json_atomic(dir_fd: int, name: str, data: dict[str, Any], *, durable: bool) -> None:
    """Write ``name`` in the directory ``dir_fd`` so readers see the old file or the new one.

    ``durable`` adds an fsync, for records that must survive a power loss; the hot start path
    skips it, since a job whose host lost power is reported as lost anyway.
    """
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, json.dumps(data, separators=(",", ":")).encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None if the file does not exist."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
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
