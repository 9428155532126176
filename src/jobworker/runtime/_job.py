"""One job as the runtime tracks it: its records, its status, and who waits for it to change.

A job changes only through its events (:meth:`Job.launched`, :meth:`Job.start_failed`,
:meth:`Job.ended`, :meth:`Job.lost`, :meth:`Job.reattached`, :meth:`Job.restored`,
:meth:`Job.deleted`); each builds the next status through the state machine and goes
through :meth:`Job._apply`, the one place the status and its history are written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ._jobdir import ExitRecord, FinalRecord, RunRecord, SpecRecord
from ._launch import SupervisorHandle
from ._observer import JobObserver
from ._spec import JobSpec, Limits
from ._states import State
from ._status import JobStatus, SandboxInfo, Usage, from_ns
from ._stdin import StdinPipe
from .cgroups import JobCgroup

__all__ = ["Job"]


class Job:
    """Mutable record of one job."""

    def __init__(  # noqa: PLR0913 - all of it is what a job is
        self,
        record: SpecRecord,
        spec: JobSpec,
        limits: Limits,
        directory: str,
        observer: JobObserver,
        *,
        limits_enforced: bool,
    ) -> None:
        self.id = record.id
        self.spec = spec
        self.dir = directory
        self.limits = limits
        # spec.json as last written: the supervisor's instructions (user, cgroups, ...).
        self.record = record
        self.cgroup: JobCgroup | None = None
        self.supervisor: SupervisorHandle | None = None
        self.run: RunRecord | None = None
        # Disk its directory takes, measured once it has ended (for the retention budget).
        self.disk_bytes = 0
        self.start_lock = asyncio.Lock()
        # Its directory and spec.json exist. Not yet, for a job created with its start:
        # the launch makes them (see Lifecycle.create).
        self.recorded = True
        # Set once the job has ended, or was deleted (waiters then find it gone).
        self.ended_event = asyncio.Event()
        self.gone = False
        self._status = JobStatus(
            id=record.id,
            owner=spec.owner,
            argv=tuple(spec.argv),
            state=State.CREATED,
            exit_code=None,
            signal=None,
            oom_killed=False,
            error=None,
            created_at=from_ns(record.created_ns),
            started_at=None,
            ended_at=None,
            pid=None,
            output_truncated=False,
            limits=limits,
            limits_enforced=limits_enforced,
            name=spec.name,
            labels=spec.labels,
            timeout_s=spec.timeout_s,
            stdin=spec.stdin,
        )
        # Every status the job has been in, so a watcher sees each transition exactly once.
        self.history: list[JobStatus] = [self._status]
        self._waiters: set[asyncio.Event] = set()
        self._observer = observer
        self._announced = False
        # Called once, when the job reaches a final state (the registry's active count).
        self.on_final: Callable[[Job], None] | None = None
        # The server's side of its stdin pipe (stdin "pipe"), made on the first write.
        self.stdin_pipe: StdinPipe | None = None

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def state(self) -> State:
        return self._status.state

    @property
    def owner(self) -> str:
        return self.spec.owner

    def add_waiter(self, event: asyncio.Event) -> None:
        """Set ``event`` on every state change until :meth:`remove_waiter`."""
        self._waiters.add(event)

    def remove_waiter(self, event: asyncio.Event) -> None:
        self._waiters.discard(event)

    def _sandbox(self) -> SandboxInfo | None:
        sandbox = self.record.sandbox
        if sandbox is None:
            return None
        return SandboxInfo(
            uid=self.record.uid,
            gid=self.record.gid,
            image=sandbox.image_name,
            seccomp=sandbox.seccomp,
            tmp_bytes=sandbox.tmp_bytes,
        )

    # ------------------------------------------------------------ the one writer
    def _apply(self, status: JobStatus, *, fresh_history: bool = False) -> None:
        before = self._status if self._announced else None
        ends = status.state.is_final and not self._status.state.is_final
        self._status = status
        if fresh_history:
            self.history = [status]
        else:
            self.history.append(status)
        self._announced = True
        self._observer.job_changed(before, status)
        if status.state.is_final:
            self.ended_event.set()
            if self.stdin_pipe is not None:
                self.stdin_pipe.release()
        if ends and self.on_final is not None:
            self.on_final(self)
        for event in self._waiters:
            event.set()

    # ------------------------------------------------------------ events
    def appeared(self) -> None:
        """Tell the observer this job exists (created now), unless an event already did."""
        if not self._announced:
            self._announced = True
            self._observer.job_changed(None, self._status)

    def launched(self, run: RunRecord, supervisor: SupervisorHandle) -> None:
        """Its command runs (created -> running)."""
        self.run = run
        self.supervisor = supervisor
        self._apply(self._status.started(run.started_ns, run.pid or None, self._sandbox()))

    def start_failed(self, record: ExitRecord) -> None:
        """Its command could not start (created -> failed)."""
        self._apply(self._status.ended(record, None, oom_killed=False))

    def ended(self, final: FinalRecord) -> None:
        """Its command ended, as ``final`` records (running -> exited/stopped/failed)."""
        self.disk_bytes = final.disk_bytes
        usage = Usage.from_record(final.usage) if final.usage is not None else None
        self._apply(
            self._status.ended(
                final.exit, usage, oom_killed=final.oom_killed, pids_limited=final.pids_limited
            )
        )

    def lost(self, record: ExitRecord) -> None:
        """It ended unseen and unrecorded (its supervisor vanished, or a launch in flight
        when the previous server stopped never started): -> failed, with ``record``'s
        reason."""
        self._apply(self._status.ended(record, None, oom_killed=False))

    def reattached(self, run: RunRecord, supervisor: SupervisorHandle | None) -> None:
        """Found running after a restart: appears as running (one status). ``supervisor``
        is None when it has ended meanwhile and its end is about to be recorded."""
        self.run = run
        self.supervisor = supervisor
        status = self._status.started(run.started_ns, run.pid or None, self._sandbox())
        self._apply(status, fresh_history=True)

    def restored(self, final: FinalRecord) -> None:
        """Found ended after a restart: appears in its final state (one status, as a
        watcher arriving now would see it)."""
        self.run = final.run
        self.disk_bytes = final.disk_bytes
        run = final.run
        status = self._status.restored(
            (run.started_ns, run.pid or None) if run is not None else None,
            self._sandbox() if run is not None else None,
            final.exit,
            Usage.from_record(final.usage) if final.usage is not None else None,
            oom_killed=final.oom_killed,
            pids_limited=final.pids_limited,
        )
        self._apply(status, fresh_history=True)

    def deleted(self) -> None:
        """It is deleted: the observer forgets it, and anyone waiting wakes to find it gone."""
        self.gone = True
        self._observer.job_removed(self._status)
        self.ended_event.set()
        for event in self._waiters:
            event.set()
