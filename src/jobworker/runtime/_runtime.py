"""The runtime: create, start, stop, signal, watch and read jobs, with an asyncio API."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal as signal_module
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from ._errors import (
    InvalidSpecError,
    JobEndedError,
    JobNotFoundError,
    JobNotRunningError,
    LaunchError,
    NotPermittedError,
    RuntimeClosedError,
)
from ._job import Job
from ._launch import Launched, Launcher, SupervisorHandle
from ._logformat import Stream
from ._notify import DirNotifier
from ._output import Batch, Chunk, read_log
from ._records import EXIT, LOG, SPEC, ExitRecord, read_json, write_json_atomic
from ._spec import JobSpec, Limits
from ._states import State
from ._status import JobStatus, Usage
from .cgroups import CgroupDriver, CgroupError, open_driver, resolve_io

__all__ = ["NOBODY", "RunAs", "Runtime", "RuntimeConfig"]

# A supervisor that has not ended the job this long after the grace period is presumed hung;
# it is then SIGKILLed, which makes the kernel kill the job's whole PID namespace.
_STOP_SLACK_S = 10.0


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

    def __post_init__(self) -> None:
        if self.output_limit < 1:
            raise InvalidSpecError("output_limit must be at least 1 byte")
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
    with their output and exit status still recorded in the state dir.
    """

    def __init__(
        self, config: RuntimeConfig, launcher: Launcher, cgroups: CgroupDriver | None
    ) -> None:
        self._config = config
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
        self._closed = False

    @classmethod
    async def open(cls, config: RuntimeConfig) -> Runtime:
        """Prepare the state dir and the cgroup subtree, then start the launcher process.

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
            await asyncio.to_thread(cgroups.prune, set())
        return cls(config, Launcher.spawn(), cgroups)

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
            await asyncio.to_thread(self._cgroups.close)
        self._readers.shutdown(wait=True)

    @property
    def cgroup_kind(self) -> str | None:
        """ "v2", "hybrid" or "v1"; None when cgroups are off and limits not enforced."""
        return self._cgroups.kind if self._cgroups is not None else None

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
        }
        await asyncio.to_thread(_make_job_dir, directory, meta)
        job = Job(job_id, spec, directory, created_ns, limits=limits, meta=meta)
        if self._cgroups is None:
            job.limits_not_enforced()
        self._jobs[job_id] = job
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
                    await asyncio.to_thread(_write_meta, job.dir, job.meta)
                result = await self._launcher.launch(job.dir, self._config.launch_timeout)
            except (LaunchError, CgroupError, OSError) as e:
                job.mark_failed_to_start(str(e), time.time_ns())
                self._background(self._remove_cgroup(job), self._cleanups)
                if isinstance(e, CgroupError | OSError):
                    raise LaunchError(f"cannot start job {job.id}: {e}") from e
                raise
            if isinstance(result, Launched):
                job.mark_running(result.run, result.supervisor)
                self._background(self._watch_supervisor(job, result.supervisor), self._tasks)
            else:
                job.mark_failed_to_start(
                    result.error, result.exit.ended_ns if result.exit else time.time_ns()
                )
                self._background(self._remove_cgroup(job), self._cleanups)
        return job.status

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
            record = ExitRecord(
                state=State.FAILED,
                exit_code=None,
                signal=None,
                error="the job's supervisor was killed; the job's processes were killed with it",
                ended_ns=time.time_ns(),
                output_truncated=False,
            )
        else:
            record = ExitRecord.from_json(data)
        usage, oom = None, False
        if self._cgroups is not None:
            driver = self._cgroups
            usage, oom = await asyncio.to_thread(
                lambda: (driver.usage(job.id), driver.oom_killed(job.id))
            )
        job.mark_ended(record, usage, oom_killed=oom)
        self._background(self._remove_cgroup(job), self._cleanups)

    async def _remove_cgroup(self, job: Job) -> None:
        if self._cgroups is None or not job.meta["cgroup_procs"]:
            return
        try:
            await asyncio.to_thread(
                self._cgroups.remove, job.id, self._config.cgroup_remove_timeout
            )
        except CgroupError:
            # Left for prune() at the next start-up; the job itself has ended either way.
            return

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


def _write_meta(directory: str, meta: dict[str, Any]) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_json_atomic(dir_fd, SPEC, meta, durable=False)
    finally:
        os.close(dir_fd)


def _make_job_dir(directory: str, meta: dict[str, Any]) -> None:
    os.mkdir(directory, 0o700)
    _write_meta(directory, meta)
