"""A snapshot of a job, as callers see it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ._spec import Limits
from ._states import State

__all__ = ["JobStatus", "Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources a job used, from its cgroup: live while it runs, final once it ended.

    ``memory_peak_bytes`` is None where the kernel does not track it (cgroup v2 before 5.19).
    """

    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int | None
    io_read_bytes: int
    io_write_bytes: int


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job's state at one moment.

    ``exit_code`` is set when the command exited by itself, ``signal`` when a signal killed it
    (both None while it runs and when it failed to start). ``error`` explains a ``failed``
    state. ``pid`` is the command's pid as the host sees it.
    """

    id: str
    owner: str
    argv: tuple[str, ...]
    state: State
    exit_code: int | None
    signal: int | None
    oom_killed: bool
    error: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    pid: int | None
    output_truncated: bool
    limits: Limits
    limits_enforced: bool = True
    usage: Usage | None = None

    def describe_end(self) -> str:
        """How the job ended, in words: "exited with code 0", "stopped (killed by signal 15)"."""
        if self.state is State.FAILED:
            return f"failed: {self.error}"
        how = "exited" if self.state is State.EXITED else "stopped"
        if self.signal is not None:
            return f"{how} (killed by signal {self.signal})"
        return f"{how} with code {self.exit_code}"
