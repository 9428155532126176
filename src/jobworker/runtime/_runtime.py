"""The runtime: create, start, stop, signal, watch and read jobs, with an asyncio API."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import signal as signal_module
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from ._errors import (
    InvalidSpecError,
    JobEndedError,
    JobNotFoundError,
    JobNotRunningError,
    JobRunningError,
    LaunchError,
    NotPermittedError,
    RuntimeClosedError,
    StateDirError,
)
from ._job import Job
from ._launch import Launched, Launcher, SupervisorHandle
from ._logformat import Stream
from ._notify import DirNotifier
from ._observer import JobObserver, NullObserver
from ._output import Batch, Chunk, read_log
from ._records import CONTROL, EXIT, FINAL, LOG, SPEC, ExitRecord, read_json, write_json_atomic
from ._restore import Found, boot_id, open_supervisor, read_job_dir, scan
from ._spec import JobSpec, Limits
from ._states import State
from ._status import JobStatus, Usage
from .cgroups import CgroupDriver, CgroupError, open_driver, resolve_io

__all__ = ["NOBODY", "RunAs", "Runtime", "RuntimeConfig"]

log = logging.getLogger("jobworker.runtime")

# A supervisor that has not ended the job this long after the grace period is presumed hung;
# it is then SIGKILLed, which makes the kernel kill the job's whole PID namespace.
_STOP_SLACK_S = 10.0
# After a restart, how long a launch left in flight gets for its supervisor to show up.
_SUPERVISOR_APPEARS_S = 5.0


@dataclass(frozen=True, slots=True)
class RunAs:
    """The local user and group a job's command runs as."""

    uid: int
    gid: int


NOBODY = RunAs(65534, 65534)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Settings of a runtime.

    ``state_dir`` holds one directory per job (spec, output log, exit record).
    ``output_limit`` caps each job's logged output in bytes; past it the log gets an
    "output truncated" note and the rest is discarded while the job keeps running.

    Isolation: ``cgroups`` puts each job in its own cgroup under ``cgroup_subtree`` beneath
    the server's own cgroup (or ``cgroup_parent`` on cgroup v2); turning it off runs jobs
    without limits, and their status says so. ``default_limits`` fill what a spec leaves
    unset; ``max_limits`` cap what a spec may ask. Jobs run as ``run_as`` (default nobody),
    or as ``owner_run_as[owner]``; uid 0 only with ``allow_root``. Only owners in
    ``host_network_owners`` may ask for the host's network instead of an empty one.
    ``namespaces`` off skips the mount, UTS, IPC, network and cgroup namespaces (to measure
    what they cost, or to debug); the PID namespace stays, as stop relies on it.

    Retention: ended jobs and their output are deleted once ``retention_seconds`` have
    passed since they ended, and, oldest first, while all jobs together take more than
    ``retention_bytes`` of disk; checked every ``retention_interval`` seconds and at start.
    Running and created jobs are never deleted.
    """

    state_dir: Path
    output_limit: int = 1 << 30
    default_grace: float = 10.0
    launch_timeout: float = 60.0
    cgroups: bool = True
    cgroup_subtree: str = "jobworker"
    cgroup_parent: str | None = None
    default_limits: Limits = field(default_factory=Limits)
    max_limits: Limits = field(default_factory=Limits)
    run_as: RunAs = NOBODY
    owner_run_as: Mapping[str, RunAs] = field(default_factory=dict)
    allow_root: bool = False
    host_network_owners: frozenset[str] = frozenset()
    cgroup_remove_timeout: float = 10.0
    namespaces: bool = True
    retention_seconds: float = 7 * 24 * 3600.0
    retention_bytes: int = 10 << 30
    retention_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.output_limit < 1:
            raise InvalidSpecError("output_limit must be at least 1 byte")
        if self.retention_seconds < 0 or self.retention_bytes < 0:
            raise InvalidSpecError("retention age and size must not be negative")
        if self.retention_interval <= 0:
            raise InvalidSpecError("retention_interval must be positive")
        if self.default_grace < 0:
            raise InvalidSpecError("default_grace must not be negative")
        for who, user in [("default", self.run_as), *self.owner_run_as.items()]:
            if min(user.uid, user.gid) < 0:
                raise InvalidSpecError(f"run-as user for {who} has a negative uid or gid")
            if 0 in (user.uid, user.gid) and not self.allow_root:
                raise InvalidSpecError(
                    f"run-as user for {who} is root (uid or gid 0); set allow_root to permit it"
                )

    def user_for(self, owner: str) -> RunAs:
        return self.owner_run_as.get(owner, self.run_as)


def _parse_job_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except (ValueError, TypeError, AttributeError):
        raise JobNotFoundError(str(job_id)) from None


class Runtime:
    """Runs jobs on this host. Use ``async with await Runtime.open(config) as rt:``.

    Jobs outlive the runtime: closing it (or the process dying) leaves running jobs running,
    with their output and exit status still recorded in the state dir. Opening a runtime on
    the same state dir takes them all back: running ones are watched and steered again,
    and those whose end was missed show how they ended.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        launcher: Launcher,
        cgroups: CgroupDriver | None,
        observer: JobObserver,
    ) -> None:
        self._config = config
        self._observer = observer
        self._jobs_dir = config.state_dir / "jobs"
        self._launcher = launcher
        self._cgroups = cgroups
        self._jobs: dict[str, Job] = {}
        self._notifier = DirNotifier()
        # Watchers of running supervisors: cancelled at close (the jobs go on without us).
        self._tasks: set[asyncio.Task[None]] = set()
        # Removal of ended jobs' cgroups: awaited at close, so nothing is left half-done.
        self._cleanups: set[asyncio.Task[None]] = set()
        # Launches in flight: awaited first at close, as each may still start a watcher.
        self._launches: set[asyncio.Task[JobStatus]] = set()
        # Log reads go to their own small pool, so many followers cannot starve other work.
        self._readers = concurrent.futures.ThreadPoolExecutor(4, "jobworker-log")
        self._boot_id = boot_id()
        # Jobs whose end is being recorded: their cgroups are still needed (for usage).
        self._ending: set[str] = set()
        self._closed = False

    @classmethod
    async def open(cls, config: RuntimeConfig, observer: JobObserver | None = None) -> Runtime:
        """Prepare the state dir and the cgroup subtree, then start the launcher process.
        ``observer`` sees every job appear, change and go (for metrics).

        Raises:
            CgroupError: cgroups are on but not usable (the message says what to fix).
            LaunchError: the launcher could not be started.
            OSError: the state dir cannot be created.
        """
        jobs_dir = config.state_dir / "jobs"
        await asyncio.to_thread(jobs_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        cgroups = None
        if config.cgroups:
            # Before the launcher exists: on cgroup v2 the server may move itself into a leaf,
            # and the launcher (and every supervisor) must start there too.
            cgroups = await asyncio.to_thread(
                open_driver, config.cgroup_subtree, config.cgroup_parent
            )
        runtime = cls(config, Launcher.spawn(), cgroups, observer or NullObserver())
        try:
            await runtime._restore()
        except BaseException:
            await runtime.close()
            raise
        if cgroups is not None:
            # A cgroup of no running job was left by a crash or a deleted job: take it down.
            keep = {j.id for j in runtime._jobs.values() if not j.state.is_final}
            await asyncio.to_thread(cgroups.prune, keep | runtime._ending)
        runtime._background(runtime._retention_loop(), runtime._tasks)
        return runtime

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watching jobs and release the launcher; running jobs keep running."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*self._launches, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        running = False
        for job in self._jobs.values():
            if job.supervisor is not None:
                running = running or not job.state.is_final
                job.supervisor.close()
        await self._notifier.close()
        await self._launcher.close(jobs_running=running)
        if self._cgroups is not None and not running:
            await asyncio.to_thread(self._cgroups.close, self._config.cgroup_remove_timeout)
        self._readers.shutdown(wait=True)

    @property
    def cgroup_kind(self) -> str | None:
        """ "v2", "hybrid" or "v1"; None when cgroups are off and limits not enforced."""
        return self._cgroups.kind if self._cgroups is not None else None

    # ---------------------------------------------------------------- restart
    async def _restore(self) -> None:
        """Take back every job in the state dir (see :class:`Runtime`)."""
        found, empty, corrupt = await asyncio.to_thread(scan, str(self._jobs_dir))
        for directory in empty:
            # mkdir happened, spec.json never did: the create was cut short and its id was
            # never given to anyone.
            await asyncio.to_thread(shutil.rmtree, directory, True)
        for directory, reason in corrupt:
            log.warning("skipping job directory %s: unreadable records (%s)", directory, reason)
        found.sort(key=lambda f: int(f.meta["created_ns"]))
        for record in found:
            meta = record.meta
            job = Job(
                meta["id"],
                JobSpec.from_json(meta["spec"]),
                record.directory,
                int(meta["created_ns"]),
                limits=Limits.from_json(meta["limits"]),
                meta=meta,
                observer=self._observer,
            )
            if not meta["cgroup_procs"] and (self._cgroups is None or meta["launching"]):
                job.limits_not_enforced()
            self._jobs[job.id] = job
            await self._resume(job, record)
            job.appeared()

    async def _resume(self, job: Job, found: Found) -> None:
        if found.exit is not None:
            if found.final is not None:
                # Recorded in full at its end, cgroup removed then (or by prune below).
                usage = found.final.get("usage")
                job.disk_bytes = int(found.final.get("disk_bytes", 0))
                job.restore_ended(
                    found.run,
                    found.exit,
                    Usage(**usage) if usage else None,
                    oom_killed=bool(found.final.get("oom_killed")),
                )
            else:
                if found.run is not None:
                    job.mark_running(found.run, None)
                await self._end(job, found.exit)
        elif found.run is not None:
            pidfd = await asyncio.to_thread(open_supervisor, found.run)
            if pidfd is not None:
                handle = SupervisorHandle(job.dir, pidfd)
                job.mark_running(found.run, handle)
                self._background(self._watch_supervisor(job, handle), self._tasks)
                return
            # Gone. It may have recorded its end in the meantime; if not, it never will.
            again = await asyncio.to_thread(read_job_dir, job.dir)
            if again is not None and again.exit is not None:
                await self._resume(job, again)
                return
            job.mark_running(found.run, None)
            await self._end(job, await self._record_lost(job, self._lost_reason(job)))
        elif job.meta["launching"]:
            self._background(self._await_launch(job), self._tasks)

    def _lost_reason(self, job: Job) -> str:
        if job.meta.get("boot_id") not in (None, self._boot_id):
            return "lost: the host restarted while the job ran"
        return "lost: the job's supervisor is gone and recorded no end (killed from outside)"

    async def _await_launch(self, job: Job) -> None:
        """A launch was under way when the previous server stopped: wait for its supervisor
        to record a start or an end, for at most the launch timeout. A supervisor binds its
        control socket first thing; if none has appeared after _SUPERVISOR_APPEARS_S, the
        launch request never reached the launcher and the job never started."""
        async with job.start_lock:
            changed = asyncio.Event()
            loop = asyncio.get_running_loop()
            started = loop.time()
            found: Found | None = None
            with self._notifier.subscribe(job.dir, changed), contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.launch_timeout):
                    while True:
                        changed.clear()
                        found, has_supervisor = await asyncio.to_thread(_launch_progress, job.dir)
                        if found is not None:
                            break
                        wait = None
                        if not has_supervisor:
                            wait = started + _SUPERVISOR_APPEARS_S - loop.time()
                            if wait <= 0:
                                break
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait):
                                await changed.wait()
            if found is not None:
                await self._resume(job, found)
                return
            if self._cgroups is not None:
                with contextlib.suppress(CgroupError, OSError):
                    await asyncio.to_thread(self._cgroups.kill, job.id)
            error = "lost: the server stopped while starting the job, and it never started"
            job.mark_failed_to_start(error, time.time_ns())
            await self._record_lost(job, error)
            self._background(self._finish(job), self._cleanups)

    # ---------------------------------------------------------------- retention
    async def remove(self, job_id: str) -> None:
        """Delete an ended (or never started) job and its output.

        Followers already reading its output read on to the end of what they had.

        Raises:
            JobNotFoundError: no job has this id.
            JobRunningError: the job is running (or starting); stop it first.
        """
        job = self._get(job_id)
        async with job.start_lock:
            if job.state is State.CREATED:
                job.mark_failed_to_start("deleted before it was started", time.time_ns())
            if not job.state.is_final:
                raise JobRunningError(
                    f"job {job.id} is {job.state}; stop it first (jobctl stop {job.id[:12]})"
                )
            await self._delete(job)

    async def _delete(self, job: Job) -> None:
        if self._jobs.pop(job.id, None) is None:
            return  # deleted meanwhile
        job.removed()
        # Its cgroup is removed by the cleanup that follows its end; the directory goes now.
        await asyncio.to_thread(shutil.rmtree, job.dir, True)

    async def prune_ended(self, now: float | None = None) -> list[str]:
        """Apply the retention settings now (``now``: seconds since the epoch, for tests);
        return the ids of the jobs deleted, oldest first."""
        now = time.time() if now is None else now
        ended = [j for j in self._jobs.values() if j.state.is_final and j.status.ended_at]
        running = [j.dir for j in self._jobs.values() if not j.state.is_final]
        total = await asyncio.to_thread(lambda: sum(_dir_bytes(d) for d in running))
        total += sum(j.disk_bytes for j in ended)
        cutoff = now - self._config.retention_seconds
        if total <= self._config.retention_bytes:
            # Within budget (the usual case, checked at every job's end): only age counts,
            # so only the expired are sorted, not every ended job.
            ended = [j for j in ended if _ended_s(j) < cutoff]
        ended.sort(key=_ended_s)
        removed = []
        for job in ended:
            if _ended_s(job) >= cutoff and total <= self._config.retention_bytes:
                break
            total -= job.disk_bytes
            await self._delete(job)
            removed.append(job.id)
        if removed:
            log.info("retention: deleted %d ended job(s)", len(removed))
        return removed

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.prune_ended()
            except OSError as e:
                log.warning("retention pass failed: %s", e)
            await asyncio.sleep(self._config.retention_interval)

    # ---------------------------------------------------------------- lookups
    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(_parse_job_id(job_id))
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("the runtime is closed")

    async def status(self, job_id: str) -> JobStatus:
        """The job's current status, with its resource usage (live while it runs).

        Raises:
            JobNotFoundError: no job has this id.
        """
        job = self._get(job_id)
        if job.state is State.RUNNING and self._cgroups is not None:
            try:
                usage = await asyncio.to_thread(self._cgroups.usage, job.id)
            except OSError:
                # The job ended and its cgroup is going away under us: its final status,
                # with final usage, follows in a moment; this one simply has none.
                return job.status
            if job.state is State.RUNNING:  # it may have ended while we read
                return replace(job.status, usage=usage)
        return job.status

    async def list(self, owner: str | None = None) -> list[JobStatus]:
        """All jobs, or those of ``owner``, oldest first, with usage as :meth:`status`."""
        jobs = [j for j in self._jobs.values() if owner is None or j.spec.owner == owner]
        jobs.sort(key=lambda j: j.status.created_at)
        running = [j.id for j in jobs if j.state is State.RUNNING]
        usages = {}
        if running and self._cgroups is not None:
            usages = await asyncio.to_thread(self._live_usages, running)
        return [
            replace(j.status, usage=usages[j.id])
            if j.id in usages and j.state is State.RUNNING
            else j.status
            for j in jobs
        ]

    def _live_usages(self, job_ids: Sequence[str]) -> dict[str, Usage]:
        """Usage of each running job whose cgroup can still be read (in a worker thread)."""
        usages = {}
        if self._cgroups is not None:
            for job_id in job_ids:
                with contextlib.suppress(OSError):
                    usages[job_id] = self._cgroups.usage(job_id)
        return usages

    # ---------------------------------------------------------------- lifecycle
    async def create(self, spec: JobSpec, *, start: bool = False) -> JobStatus:
        """Create a job (state ``created``); with ``start``, start it too.

        The server's default limits fill what ``spec`` leaves unset.

        Raises:
            InvalidSpecError: ``spec`` is not a JobSpec, or asks for a limit above the
                server's maximum or for an IO device that does not exist.
            NotPermittedError: the owner may not use the host network.
            RuntimeClosedError: the runtime is closed.
            StateDirError: the job cannot be recorded (e.g. the state disk is full).
            LaunchError: with ``start``, the launcher failed (not the command: a command
                that cannot be executed gives a job in state ``failed``).
        """
        self._check_open()
        if not isinstance(spec, JobSpec):
            raise InvalidSpecError("spec must be a JobSpec")
        config = self._config
        if spec.host_network and spec.owner not in config.host_network_owners:
            raise NotPermittedError(
                f"owner {spec.owner!r} may not use the host network (server configuration)"
            )
        limits = spec.limits.resolve(config.default_limits, config.max_limits)
        if limits.io and self._cgroups is not None:
            try:
                limits = replace(limits, io=await asyncio.to_thread(resolve_io, limits, spec.cwd))
            except CgroupError as e:
                raise InvalidSpecError(str(e)) from e
        job_id = str(uuid.uuid4())
        directory = str(self._jobs_dir / job_id)
        created_ns = time.time_ns()
        user = config.user_for(spec.owner)
        meta = {
            "id": job_id,
            "spec": spec.to_json(),
            "limits": limits.to_json(),
            "created_ns": created_ns,
            "output_limit": config.output_limit,
            "uid": user.uid,
            "gid": user.gid,
            "hostname": f"job-{job_id[:8]}",
            "namespaces": config.namespaces,
            "cgroup_procs": [],
            "boot_id": self._boot_id,
            # With ``start``, the start is on record from the first write: a server that dies
            # before launching leaves a failed job, not one that looks never started.
            "launching": start,
        }
        try:
            await asyncio.to_thread(_make_job_dir, directory, meta)
        except OSError as e:
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise StateDirError(
                f"cannot record the job in {self._jobs_dir}: {e.strerror}; free space there,"
                " delete ended jobs (jobctl rm) or lower the retention budget"
            ) from e
        job = Job(
            job_id, spec, directory, created_ns, limits=limits, meta=meta, observer=self._observer
        )
        if self._cgroups is None:
            job.limits_not_enforced()
        self._jobs[job_id] = job
        job.appeared()
        if start:
            return await self._start(job)
        return job.status

    async def run(self, spec: JobSpec) -> JobStatus:
        """Create and start a job in one call; see :meth:`create`."""
        return await self.create(spec, start=True)

    async def start(self, job_id: str) -> JobStatus:
        """Start a created job; return its status (``running``, or ``failed`` with the reason).

        Raises:
            JobNotFoundError: no job has this id.
            JobEndedError: the job has already been started (and maybe ended).
            LaunchError: the launcher failed.
        """
        self._check_open()
        return await self._start(self._get(job_id))

    async def _start(self, job: Job) -> JobStatus:
        # Once a launch begins it must be seen through: a caller that goes away mid-launch (a
        # client disconnecting during CreateJob) would otherwise leave a running supervisor
        # behind a job still marked "created", with nobody watching it. The launch runs as a
        # task of its own, which close() awaits, and the caller only waits for it.
        task = asyncio.get_running_loop().create_task(self._launch(job))
        self._launches.add(task)
        task.add_done_callback(self._launches.discard)
        return await asyncio.shield(task)

    async def _launch(self, job: Job) -> JobStatus:
        async with job.start_lock:
            if job.state is not State.CREATED:
                raise JobEndedError(f"job {job.id} has already been started ({job.state})")
            try:
                if self._cgroups is not None:
                    # The job's first process joins these before exec: no unlimited window.
                    cgroup = await asyncio.to_thread(self._cgroups.create, job.id, job.limits)
                    job.meta["cgroup_procs"] = list(cgroup.procs_files)
                # On record before the launch: a server that dies from here on finds, at its
                # next start, a job whose supervisor may be running (see _await_launch).
                job.meta["launching"] = True
                await asyncio.to_thread(_write_record, job.dir, SPEC, job.meta)
                result = await self._launcher.launch(job.dir, self._config.launch_timeout)
            except (LaunchError, CgroupError, OSError) as e:
                await self._failed_to_start(job, str(e))
                if isinstance(e, CgroupError | OSError):
                    raise LaunchError(f"cannot start job {job.id}: {e}") from e
                raise
            if isinstance(result, Launched):
                job.mark_running(result.run, result.supervisor)
                self._background(self._watch_supervisor(job, result.supervisor), self._tasks)
            elif result.exit is not None:  # the supervisor recorded why (exit.json)
                job.mark_failed_to_start(result.error, result.exit.ended_ns)
                self._background(self._finish(job), self._cleanups)
            else:
                await self._failed_to_start(job, result.error)
        return job.status

    async def _failed_to_start(self, job: Job, error: str) -> None:
        """Record (exit.json, unless the supervisor wrote one) and show a failed start."""
        record = ExitRecord(State.FAILED, None, None, error, time.time_ns(), output_truncated=False)
        with contextlib.suppress(OSError):  # a full disk: the job is failed either way
            await asyncio.to_thread(_write_exit_if_missing, job.dir, record)
        job.mark_failed_to_start(error, record.ended_ns)
        self._background(self._finish(job), self._cleanups)

    @staticmethod
    def _background(coro: Coroutine[object, object, None], tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _watch_supervisor(self, job: Job, supervisor: SupervisorHandle) -> None:
        await supervisor.wait()
        supervisor.close()
        data = await asyncio.to_thread(read_json, os.path.join(job.dir, EXIT))
        if data is None:
            # The supervisor died without a record (killed from outside). Its PID namespace
            # died with it, so nothing of the job is left running.
            record = await self._record_lost(
                job, "the job's supervisor was killed; the job's processes were killed with it"
            )
        else:
            record = ExitRecord.from_json(data)
        await self._end(job, record)

    async def _end(self, job: Job, record: ExitRecord) -> None:
        """Show the job ended as ``record`` says, with its final usage and disk use, measured
        now and recorded (final.json); then remove its cgroup."""
        self._ending.add(job.id)
        try:
            final = await asyncio.to_thread(self._measure_final, job, record)
            usage = final.get("usage")
            job.disk_bytes = int(final.get("disk_bytes", 0))
            job.mark_ended(
                record, Usage(**usage) if usage else None, oom_killed=bool(final.get("oom_killed"))
            )
        finally:
            self._ending.discard(job.id)
        self._background(self._finish(job), self._cleanups)

    def _measure_final(self, job: Job, record: ExitRecord) -> dict[str, Any]:
        """Final usage (from the job's cgroup) and disk use, recorded in final.json with the
        run and exit records: everything a restart needs of an ended job, in one file."""
        final: dict[str, Any] = {"usage": None, "oom_killed": False}
        if self._cgroups is not None and job.meta["cgroup_procs"]:
            with contextlib.suppress(OSError):  # already removed: usage is no longer known
                final = {
                    "usage": asdict(self._cgroups.usage(job.id)),
                    "oom_killed": self._cgroups.oom_killed(job.id),
                }
        final["disk_bytes"] = _dir_bytes(job.dir)
        final["run"] = job.run.to_json() if job.run is not None else None
        final["exit"] = record.to_json()
        with contextlib.suppress(OSError):
            _write_record(job.dir, FINAL, final)
        return final

    async def _record_lost(self, job: Job, error: str) -> ExitRecord:
        """Record that the job ended unseen, so every later start reports it the same way."""
        record = ExitRecord(State.FAILED, None, None, error, time.time_ns(), output_truncated=False)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(_write_exit_if_missing, job.dir, record)
        data = await asyncio.to_thread(read_json, os.path.join(job.dir, EXIT))
        return ExitRecord.from_json(data) if data is not None else record

    async def _finish(self, job: Job) -> None:
        """After a job's end: remove its cgroup, then apply the disk budget."""
        # Whether or not spec.json lists the cgroup: a server that died between creating it
        # and recording it leaves one that only this knows about.
        if self._cgroups is not None:
            with contextlib.suppress(CgroupError):
                # Left for prune() at the next start-up; the job has ended either way.
                await asyncio.to_thread(
                    self._cgroups.remove, job.id, self._config.cgroup_remove_timeout
                )
        if not self._closed:
            await self.prune_ended()

    def _running(self, job: Job, action: str) -> SupervisorHandle:
        if job.state is State.CREATED:
            raise JobNotRunningError(f"job {job.id} has not been started; start it first")
        if job.state.is_final or job.supervisor is None:
            raise JobEndedError(
                f"cannot {action} job {job.id}: it already {job.status.describe_end()}"
            )
        return job.supervisor

    async def stop(self, job_id: str, grace: float | None = None) -> JobStatus:
        """SIGTERM every process of the job, SIGKILL them after ``grace`` seconds.

        Returns the final status once every process of the job is gone. Concurrent calls
        are safe; the earliest deadline wins.

        Raises:
            JobNotFoundError: no job has this id.
            JobNotRunningError: the job has not been started.
            JobEndedError: the job had already ended ("... already exited with code 0").
            InvalidSpecError: ``grace`` is negative or not finite.
        """
        grace = self._config.default_grace if grace is None else grace
        if not (0 <= grace < 1e9):
            raise InvalidSpecError("grace must be between 0 and 1e9 seconds")
        job = self._get(job_id)
        supervisor = self._running(job, "stop")
        await supervisor.command(f"stop {grace!r}")
        try:
            async with asyncio.timeout(grace + _STOP_SLACK_S):
                await job.ended.wait()
        except TimeoutError:
            supervisor.kill()  # the kernel then kills the job's whole PID namespace
            await job.ended.wait()
        return job.status

    async def signal(self, job_id: str, signum: int) -> None:
        """Send ``signum`` to every process of the job.

        Raises:
            JobNotFoundError: no job has this id.
            JobNotRunningError: the job has not been started.
            JobEndedError: the job has ended.
            InvalidSpecError: ``signum`` is not a valid signal number.
        """
        valid = {int(s) for s in signal_module.valid_signals()}
        if not isinstance(signum, int) or signum not in valid or signum == 0:
            raise InvalidSpecError(f"{signum!r} is not a signal number; use e.g. 15 (SIGTERM)")
        job = self._get(job_id)
        supervisor = self._running(job, "signal")
        if signum == signal_module.SIGKILL and self._cgroups is not None:
            # One atomic kernel operation for every process of the job, where available.
            driver = self._cgroups
            try:
                if await asyncio.to_thread(driver.kill, job.id):
                    return
            except CgroupError:
                pass  # e.g. the job just ended and its cgroup is going; ask the supervisor
        reply = await supervisor.command(f"signal {int(signum)}")
        if reply == "ended":
            raise JobEndedError(f"cannot signal job {job.id}: it has ended")
        if reply != "ok":
            raise JobEndedError(f"cannot signal job {job.id}: {reply}")

    async def wait(self, job_id: str) -> JobStatus:
        """Return the job's final status once it has ended (at once if it has).

        Raises:
            JobNotFoundError: no job has this id.
        """
        job = self._get(job_id)
        await job.ended.wait()
        return job.status

    async def watch(self, job_id: str) -> AsyncGenerator[JobStatus, None]:
        """Yield the job's status now and after every state change, ending at a final state.

        Raises:
            JobNotFoundError: no job has this id.
        """
        job = self._get(job_id)
        changed = asyncio.Event()
        job.add_waiter(changed)
        try:
            seen = 0
            while True:
                changed.clear()
                for status in job.history[seen:]:
                    yield status
                    if status.state.is_final:
                        return
                seen = len(job.history)
                await changed.wait()
        finally:
            job.remove_waiter(changed)

    # ---------------------------------------------------------------- output
    async def output(
        self,
        job_id: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        follow: bool = False,
    ) -> AsyncGenerator[Chunk, None]:
        """The job's output from its first byte, as chunks tagged with stream and time.

        With ``follow``, waits for new output until the job has ended and all of it has been
        delivered. Notes from jobworker itself (e.g. truncation) come as ``Stream.SYSTEM``
        chunks in every view. Close the iterator (``contextlib.aclosing``) if you stop early.

        Raises:
            JobNotFoundError: no job has this id (raised on the first iteration).
            InvalidSpecError: neither stream is selected.
        """
        async with contextlib.aclosing(
            self.output_batches(job_id, stdout=stdout, stderr=stderr, follow=follow)
        ) as batches:
            async for batch in batches:
                for chunk in batch:
                    yield chunk

    def output_batches(
        self,
        job_id: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        follow: bool = False,
    ) -> AsyncGenerator[Batch, None]:
        """As :meth:`output`, in batches: each holds what one read of the log found.

        Raises:
            JobNotFoundError: no job has this id.
            InvalidSpecError: neither stream is selected.
        """
        job = self._get(job_id)
        streams = frozenset(
            s for s, wanted in ((Stream.STDOUT, stdout), (Stream.STDERR, stderr)) if wanted
        )
        if not streams:
            raise InvalidSpecError("choose stdout, stderr or both")
        return read_log(
            os.path.join(job.dir, LOG),
            streams,
            follow=follow,
            has_ended=lambda: job.state.is_final,
            subscribe=lambda event: self._subscribe(job, event),
            executor=self._readers,
        )

    @contextlib.contextmanager
    def _subscribe(self, job: Job, event: asyncio.Event) -> Iterator[None]:
        job.add_waiter(event)
        try:
            with self._notifier.subscribe(job.dir, event):
                yield
        finally:
            job.remove_waiter(event)

    @property
    def notifier(self) -> DirNotifier:
        return self._notifier


def _make_job_dir(directory: str, meta: dict[str, Any]) -> None:
    os.mkdir(directory, 0o700)
    _write_record(directory, SPEC, meta)


def _launch_progress(directory: str) -> tuple[Found | None, bool]:
    """(the job's records if its supervisor has recorded a start or an end, whether its
    supervisor has bound its control socket)."""
    found = read_job_dir(directory)
    if found is not None and (found.run or found.exit):
        return found, True
    return None, os.path.exists(os.path.join(directory, CONTROL))


def _write_record(
    directory: str, name: str, data: dict[str, Any], *, durable: bool = False
) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_json_atomic(dir_fd, name, data, durable=durable)
    finally:
        os.close(dir_fd)


def _write_exit_if_missing(directory: str, record: ExitRecord) -> None:
    """exit.json for a job that has no supervisor to write it; durable, as the supervisor's."""
    if not os.path.exists(os.path.join(directory, EXIT)):
        _write_record(directory, EXIT, record.to_json(), durable=True)


def _ended_s(job: Job) -> float:
    ended_at = job.status.ended_at
    return ended_at.timestamp() if ended_at is not None else job.status.created_at.timestamp()


def _dir_bytes(directory: str) -> int:
    """Disk taken by a job's directory (its files are all at the top level)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total
