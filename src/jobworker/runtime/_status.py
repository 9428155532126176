"""A snapshot of a job, as callers see it, and the only ways to make the next one.

Each method that moves a status to another state asks the state machine (``transition``)
first, so no status can be built in a state the machine does not allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from ._jobdir import ExitRecord, UsageRecord
from ._spec import Limits
from ._states import State, transition

__all__ = ["JobStatus", "SandboxInfo", "Usage", "from_ns"]


def from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


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

    def to_record(self) -> UsageRecord:
        return UsageRecord(
            self.cpu_seconds,
            self.memory_bytes,
            self.memory_peak_bytes,
            self.io_read_bytes,
            self.io_write_bytes,
        )

    @classmethod
    def from_record(cls, record: UsageRecord) -> Usage:
        return cls(*record)


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """How a started job is walled in: its own uid and gid, its root (an image's name, or
    None for the host's, read-only), whether the seccomp filter applies, and the size of
    its private writable places."""

    uid: int
    gid: int
    image: str | None
    seccomp: bool
    tmp_bytes: int


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job's state at one moment.

    ``exit_code`` is set when the command exited by itself, ``signal`` when a signal killed it
    (both None while it runs and when it failed to start). ``error`` explains a ``failed``
    state. ``pid`` is the command's pid as the host sees it. ``reason`` says why it ended
    where the state alone does not: "timeout" or "stop" (stopped), "not_found",
    "not_executable", "start_error" or "lost" (failed).
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
    sandbox: SandboxInfo | None = None
    # A fork failed for the job's pids limit at least once (known at its end).
    pids_limited: bool = False
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    reason: str | None = None
    stdin: str = "none"

    def describe_end(self) -> str:
        """How the job ended, in words: "exited with code 0", "stopped (killed by signal 15)"."""
        if self.state is State.FAILED:
            return f"failed: {self.error}"
        how = "exited" if self.state is State.EXITED else "stopped"
        if self.reason == "timeout":
            how = "stopped by its timeout"
        if self.signal is not None:
            return f"{how} (killed by signal {self.signal})"
        return f"{how} with code {self.exit_code}"

    # ------------------------------------------------------------ transitions
    def started(self, started_ns: int, pid: int | None, sandbox: SandboxInfo | None) -> JobStatus:
        """created -> running.

        Raises:
            InvalidTransitionError: the job is not ``created``.
        """
        return replace(
            self,
            state=transition(self.state, State.RUNNING),
            started_at=from_ns(started_ns),
            pid=pid,
            sandbox=sandbox,
        )

    def ended(
        self,
        record: ExitRecord,
        usage: Usage | None,
        *,
        oom_killed: bool,
        pids_limited: bool = False,
    ) -> JobStatus:
        """-> the final state ``record`` names, with what the end is known by.

        Raises:
            InvalidTransitionError: the machine does not allow that end from here.
        """
        return self._final(
            self.state,
            record,
            usage=usage,
            oom_killed=oom_killed,
            pids_limited=pids_limited,
            started_at=self.started_at,
            pid=self.pid,
            sandbox=self.sandbox,
        )

    def restored(  # noqa: PLR0913 - every field a job's end is known by
        self,
        started: tuple[int, int | None] | None,
        sandbox: SandboxInfo | None,
        record: ExitRecord,
        usage: Usage | None,
        *,
        oom_killed: bool,
        pids_limited: bool,
    ) -> JobStatus:
        """created -> (running ->) the final state ``record`` names, in one step: what
        :meth:`started` then :meth:`ended` give, for the thousands of ended jobs a restart
        takes back (one object instead of two each: docs/benchmarks.md (o)).

        Raises:
            InvalidTransitionError: the machine does not allow that path.
        """
        state = self.state if started is None else transition(self.state, State.RUNNING)
        return self._final(
            state,
            record,
            usage=usage,
            oom_killed=oom_killed,
            pids_limited=pids_limited,
            started_at=from_ns(started[0]) if started is not None else None,
            pid=started[1] if started is not None else None,
            sandbox=sandbox if started is not None else None,
        )

    def _final(  # noqa: PLR0913 - the one place a final status is built, field by field
        self,
        state: State,
        record: ExitRecord,
        *,
        usage: Usage | None,
        oom_killed: bool,
        pids_limited: bool,
        started_at: datetime | None,
        pid: int | None,
        sandbox: SandboxInfo | None,
    ) -> JobStatus:
        """From ``state``, the end ``record`` names (through the state machine)."""
        return replace(
            self,
            state=transition(state, State(record.state)),
            started_at=started_at,
            pid=pid,
            sandbox=sandbox,
            usage=usage,
            oom_killed=oom_killed,
            pids_limited=pids_limited,
            exit_code=record.exit_code,
            signal=record.signal,
            error=record.error,
            ended_at=from_ns(record.ended_ns),
            output_truncated=record.output_truncated,
            reason=record.reason,
        )

    def with_usage(self, usage: Usage) -> JobStatus:
        """The same status with live usage (no change of state)."""
        return replace(self, usage=usage)
