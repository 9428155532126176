"""One job as the runtime tracks it: spec, state, and who is waiting for it to change."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

from ._launch import SupervisorHandle
from ._observer import JobObserver
from ._records import ExitRecord, RunRecord
from ._spec import JobSpec, Limits
from ._states import State, transition
from ._status import JobStatus, Usage

__all__ = ["Job"]


def _from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


class Job:
    """Mutable record of one job; every state change goes through :meth:`_set`."""

    def __init__(  # noqa: PLR0913 - all of it is what a job is
        self,
        job_id: str,
        spec: JobSpec,
        directory: str,
        created_ns: int,
        *,
        limits: Limits,
        meta: dict[str, Any],
        observer: JobObserver,
    ) -> None:
        self.id = job_id
        self.spec = spec
        self.dir = directory
        self.limits = limits
        # What spec.json holds: the supervisor's instructions (user, cgroups, hostname...).
        self.meta = meta
        self.supervisor: SupervisorHandle | None = None
        self.run: RunRecord | None = None
        # Disk its directory takes, measured once it has ended (for the retention budget).
        self.disk_bytes = 0
        self.start_lock = asyncio.Lock()
        self.ended = asyncio.Event()
        self._status = JobStatus(
            id=job_id,
            owner=spec.owner,
            argv=tuple(spec.argv),
            state=State.CREATED,
            exit_code=None,
            signal=None,
            oom_killed=False,
            error=None,
            created_at=_from_ns(created_ns),
            started_at=None,
            ended_at=None,
            pid=None,
            output_truncated=False,
            limits=limits,
        )
        # Every status the job has been in, so a watcher sees each transition exactly once.
        self.history: list[JobStatus] = [self._status]
        self._waiters: set[asyncio.Event] = set()
        self._observer = observer
        self._announced = False

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def state(self) -> State:
        return self._status.state

    def add_waiter(self, event: asyncio.Event) -> None:
        """Set ``event`` on every state change until :meth:`remove_waiter`."""
        self._waiters.add(event)

    def remove_waiter(self, event: asyncio.Event) -> None:
        self._waiters.discard(event)

    def appeared(self) -> None:
        """Tell the observer this job exists, unless a change already did. A job taken back
        after a restart appears in the state it is found in, so it counts as no new start
        or end."""
        if not self._announced:
            self._announced = True
            self._observer.job_changed(None, self._status)

    def _changed(self, before: JobStatus) -> None:
        if self._announced:
            self._observer.job_changed(before, self._status)
        else:
            self.appeared()

    def removed(self) -> None:
        self._observer.job_removed(self._status)

    def _set(self, new_state: State, **changes: object) -> None:
        before = self._status
        transition(before.state, new_state)
        self._status = dataclasses.replace(before, state=new_state, **changes)  # type: ignore[arg-type]
        self.history.append(self._status)
        self._changed(before)
        if new_state.is_final:
            self.ended.set()
        for event in self._waiters:
            event.set()

    def limits_not_enforced(self) -> None:
        """Record that this job runs without cgroup limits (cgroups are off)."""
        self._status = dataclasses.replace(self._status, limits_enforced=False)
        self.history[-1] = self._status

    def mark_running(self, run: RunRecord, supervisor: SupervisorHandle | None) -> None:
        """``supervisor`` is None for a job that, restored after a restart, has ended too."""
        self.run = run
        self.supervisor = supervisor
        self._set(State.RUNNING, started_at=_from_ns(run.started_ns), pid=run.pid or None)

    def mark_failed_to_start(self, error: str, ended_ns: int) -> None:
        self._set(State.FAILED, error=error, ended_at=_from_ns(ended_ns))

    def restore_ended(
        self, run: RunRecord | None, record: ExitRecord, usage: Usage | None, *, oom_killed: bool
    ) -> None:
        """Put a job that ended before this runtime started straight into its final state
        (one status, as a watcher arriving now would see it)."""
        before = self._status
        state = State(record.state)
        if run is not None:
            transition(transition(self.state, State.RUNNING), state)
        else:
            transition(self.state, state)
        self.run = run
        self._status = dataclasses.replace(
            self._status,
            state=state,
            started_at=_from_ns(run.started_ns) if run is not None else None,
            pid=(run.pid or None) if run is not None else None,
            **_end_fields(record, usage, oom_killed=oom_killed),
        )
        self.history = [self._status]
        self.ended.set()
        self._changed(before)

    def mark_ended(self, record: ExitRecord, usage: Usage | None, *, oom_killed: bool) -> None:
        self._set(State(record.state), **_end_fields(record, usage, oom_killed=oom_killed))


def _end_fields(record: ExitRecord, usage: Usage | None, *, oom_killed: bool) -> dict[str, Any]:
    """The status fields a job's end sets."""
    return {
        "usage": usage,
        "oom_killed": oom_killed,
        "exit_code": record.exit_code,
        "signal": record.signal,
        "error": record.error,
        "ended_at": _from_ns(record.ended_ns),
        "output_truncated": record.output_truncated,
    }
