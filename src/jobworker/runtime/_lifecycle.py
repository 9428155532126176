"""Launch and end bookkeeping: a job's directory and cgroup from its creation to its removal.

The runtime facade decides *whether* (state, permissions); this module does the work:
records, cgroups, the launch through the launcher, the watch on a running supervisor, and
what a job's end leaves to do (final usage, final.json, cgroup removal, retention).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import NamedTuple, TypeVar

from ._config import DEFAULT_TMP_BYTES, RuntimeConfig
from ._errors import (
    JobAlreadyStartedError,
    JobNotFoundError,
    LaunchError,
    NameTakenError,
    QuotaError,
    StateDirError,
)
from ._job import Job
from ._jobdir import (
    FINAL,
    LOG,
    SPEC,
    ExitRecord,
    FinalRecord,
    SandboxRecord,
    SpecRecord,
    dir_bytes,
    read_exit,
    write_exit_if_missing,
    write_record,
)
from ._launch import Launched, Launcher, SupervisorHandle
from ._logformat import MAGIC
from ._notify import DirNotifier
from ._observer import JobObserver
from ._protocol import LaunchOrder, NextJob
from ._registry import Registry
from ._spec import JobSpec, Limits
from ._states import State
from ._uids import UidAllocator
from .cgroups import CgroupDriver, CgroupError, JobCgroup

__all__ = ["Lifecycle"]

log = logging.getLogger("jobworker.runtime")

T = TypeVar("T")

_REMOVE_THREADS = 4
# Between tries to remove a job's cgroup: doubling from the first delay to the cap.
_REMOVE_FIRST_S = 0.005
# A job's cgroup is removed once no job's end has begun for _REMOVE_QUIET_S, or after
# _REMOVE_DEFER_S at most. Removal costs the kernel much (rmdir under the global cgroup
# mutex, then offlining the memory cgroup, which walks every superblock's LRU lists):
# in a storm of ends, done at once it slowed the ends still coming. 1,000 StopJob at once,
# same sitting, three pairs: 4.13 / 3.58 / 4.43 s removing at once, 2.82 / 3.31 / 4.00 s
# removing 2 s later (docs/benchmarks.md (s)).
_REMOVE_QUIET_S = 0.05
_REMOVE_DEFER_S = 2.0
_REMOVE_CAP_S = 0.25
# The next job is made once the job just launched has settled: its first output, or its
# end, or after _SETTLE_S at most (a job that says nothing). Made at once, it and the
# launcher's refill it sets off (a standby forked, its command forked ahead, a spare root
# built) competed with the launched job for both CPUs while its first output was on its
# way (docs/benchmarks.md, the fourteenth session).
_SETTLE_S = 0.03


class _Next(NamedTuple):
    """The next job created with its start: its id, and its cgroup (None: no cgroups),
    made ahead and named to the launcher, which forks its command's process there."""

    job_id: str
    cgroup: JobCgroup | None


def _failed(error: str, reason: str) -> ExitRecord:
    return ExitRecord(
        State.FAILED, None, None, error, time.time_ns(), output_truncated=False, reason=reason
    )


class Lifecycle:
    """The work behind creating, starting and ending jobs, and the tasks that do it."""

    def __init__(  # noqa: PLR0913 - the runtime's parts, each used here
        self,
        config: RuntimeConfig,
        *,
        registry: Registry,
        launcher: Launcher,
        cgroups: CgroupDriver | None,
        observer: JobObserver,
        notifier: DirNotifier,
        boot_id: str,
    ) -> None:
        self.config = config
        self.jobs_dir = config.state_dir / "jobs"
        self.registry = registry
        self.launcher = launcher
        self.cgroups = cgroups
        self.observer = observer
        self.notifier = notifier
        self.boot_id = boot_id
        self.uids = UidAllocator(*config.uid_range)
        # Watchers of running supervisors: cancelled at close (the jobs go on without us).
        self.tasks: set[asyncio.Task[None]] = set()
        # Removal of ended jobs' cgroups: awaited at close, so nothing is left half-done.
        self.cleanups: set[asyncio.Task[None]] = set()
        # Launches in flight: awaited first at close, as each may still start a watcher.
        self.launches: set[asyncio.Task[None]] = set()
        # Held while usage samples are written into jobs' directories: a directory is not
        # deleted under a write (which would leave it half-removed).
        self.sampling = asyncio.Lock()
        # Jobs whose end is being recorded: their cgroups are still needed (for usage).
        self.ending: set[str] = set()
        # Ended jobs' final records waiting to be written (job id: directory, record), and
        # those being written; the task writing them (see ``_record_final``).
        self._finals: dict[str, tuple[str, FinalRecord]] = {}
        self._writing: dict[str, tuple[str, FinalRecord]] = {}
        self._recording: asyncio.Task[None] | None = None
        self.closed = False
        # The next job created with its start (``prepare_next``); None while none is ready.
        self.next: _Next | None = None
        self._preparing = False
        # Set once no job's end has begun for _REMOVE_QUIET_S (and when the runtime
        # closes): deferred removals wait on it. One timer keeps it, rather than each
        # waiting removal polling (1,000 of them would wake 20,000 times a second).
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._quiet_timer: asyncio.TimerHandle | None = None
        # When the latest job's end began (event loop time).
        self._last_end = 0.0
        # Called after jobs' ends have been dealt with (the retention pass), coalesced: a
        # burst of ends (1,000 jobs stopped at once) runs it a few times, not once each.
        self.after_end: Callable[[], Awaitable[object]] | None = None
        self._after_end_again = False
        self._after_end_task: asyncio.Task[None] | None = None
        # Final records are written by one thread of their own, in batches (``_record_final``).
        # Cgroups are removed on a pool of their own: on asyncio's default pool (6 threads
        # here), 1,000 stops at once answered over 3.1 s though every supervisor had
        # recorded its end by 1.3 s, the ends' work queued behind cgroup removals (the
        # kernel takes a millisecond or more per rmdir, nine hierarchies a job).
        self.recorder = concurrent.futures.ThreadPoolExecutor(1, "jobworker-record")
        self.removers = concurrent.futures.ThreadPoolExecutor(
            _REMOVE_THREADS, "jobworker-cgroup-rm"
        )

    def begin_close(self) -> None:
        self.closed = True
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None
        self._quiet.set()

    def shutdown(self) -> None:
        """Stop the worker pools (once nothing can submit to them any more)."""
        self.recorder.shutdown(wait=True)
        self.removers.shutdown(wait=True)

    async def _on(self, pool: concurrent.futures.Executor, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def background(
        self, coro: Coroutine[object, object, None], tasks: set[asyncio.Task[None]]
    ) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # ---------------------------------------------------------------- creating
    def job_of(self, record: SpecRecord, directory: str) -> Job:
        """The job a spec record describes (validated again as runtime values).

        Raises:
            InvalidSpecError: the record holds a spec or limits this release refuses.
        """
        spec = JobSpec.from_json(record.spec)
        limits = Limits.from_json(record.limits)
        enforced = record.cgroup is not None or (self.cgroups is not None and not record.launching)
        job = Job(record, spec, limits, directory, self.observer, limits_enforced=enforced)
        if record.cgroup is not None and self.cgroups is not None:
            job.cgroup = self.cgroups.attach(record.cgroup)
        return job

    async def create(
        self, spec: JobSpec, limits: Limits, *, start: bool, max_active: int | None = None
    ) -> Job:
        """Record a new job (spec.json) and register it.

        The quota check and the reservation are one step (no await between them), so a
        burst of concurrent creates cannot overshoot ``max_active``.

        Raises:
            NameTakenError: another of the owner's jobs has the name ``spec`` asks for.
            QuotaError: the owner already has ``max_active`` jobs created or running.
            StateDirError: the job cannot be recorded.
        """
        config = self.config
        if spec.name is not None and (taken := self.registry.named(spec.owner, spec.name)):
            raise NameTakenError(
                f"{spec.owner} already has a job named {spec.name!r} ({taken.id[:12]}); "
                "choose another name, or remove that job first (jobctl rm)"
            )
        if max_active is not None:
            active = self.registry.active(spec.owner)
            if active >= max_active:
                raise QuotaError(
                    f"{spec.owner} already has {active} jobs created or running (the "
                    "server's limit); stop or wait for some first"
                )
        ahead, self.next = (self.next, None) if start else (None, self.next)
        job_id = ahead.job_id if ahead is not None else str(uuid.uuid4())
        directory = str(self.jobs_dir / job_id)
        user = config.user_for(spec.owner)
        record = SpecRecord(
            id=job_id,
            created_ns=time.time_ns(),
            spec=spec.to_json(),
            limits=limits.to_json(),
            output_limit=config.output_limit,
            # -1: a uid of the job's own, taken when it starts.
            uid=user.uid if user is not None else -1,
            gid=user.gid if user is not None else -1,
            hostname=f"job-{job_id[:8]}",
            namespaces=config.namespaces,
            boot_id=self.boot_id,
            # With ``start``, the start is on record from the first write: a server that
            # dies before launching leaves a failed job, not one that looks never started.
            launching=start,
            cgroup=None,
            stop_grace=config.default_grace,
        )
        job = Job(
            record,
            spec,
            limits,
            directory,
            self.observer,
            limits_enforced=self.cgroups is not None,
        )
        if ahead is not None:
            job.cgroup = ahead.cgroup  # its limits are written with the launch (_ready)
        # Registered before the first await: the reservation the quota check counts.
        self.registry.add(job)
        if start:
            # Its directory and its one spec.json are made with the launch (``_ready``), in
            # the hop that makes its cgroup: one write, not a first one the launch replaces.
            job.recorded = False
            return job
        try:
            await asyncio.to_thread(_make_job_dir, directory, record)
        except OSError as e:
            await self._forget_unrecorded(job)
            raise _unrecordable(e) from e
        job.appeared()
        return job

    async def _forget_unrecorded(self, job: Job) -> None:
        """A new job whose directory could not be made or written: it was never given to
        anyone, so it goes without a trace (its uid and cgroup, if taken, with it)."""
        self.registry.discard(job)
        await asyncio.to_thread(shutil.rmtree, job.dir, True)
        # An operator's user for its owner is no uid of the range: nothing to give back.
        if job.cgroup is not None or job.record.uid in self.uids:
            self.background(self.finish(job), self.cleanups)

    # ---------------------------------------------------------------- starting
    async def start(self, job: Job) -> None:
        """Launch ``job``; return once it runs or has failed to start.

        Raises:
            JobAlreadyStartedError: it has already been started.
            JobNotFoundError: it was deleted meanwhile.
            LaunchError: the launcher failed (the job is then failed).
        """
        # Once a launch begins it must be seen through: a caller that goes away mid-launch (a
        # client disconnecting during CreateJob) would otherwise leave a running supervisor
        # behind a job still marked "created", with nobody watching it. The launch runs as a
        # task of its own, which close() awaits, and the caller only waits for it.
        task = asyncio.get_running_loop().create_task(self._launch(job))
        self.launches.add(task)
        task.add_done_callback(self.launches.discard)
        task.add_done_callback(lambda _task: self._next_after(job))
        await asyncio.shield(task)

    async def _launch(self, job: Job) -> None:
        async with job.start_lock:
            if job.gone:
                raise JobNotFoundError(job.id)
            if job.state is not State.CREATED:
                raise JobAlreadyStartedError(
                    f"job {job.id} has already been started (it is {job.state})"
                )
            if job.record.uid < 0:
                uid = self.uids.take(job.id)
                # On the job at once: a launch that fails from here on gives it back at
                # the job's end (finish).
                job.record = job.record._replace(uid=uid, gid=uid)
            record = job.record
            try:
                # One hop to a thread for all: each hop is 0.3 ms of a start, more under load.
                job.record = await asyncio.to_thread(self._ready, job, record)
                self._recorded(job)
                order = LaunchOrder.of(job.dir, job.record)
                result = await self.launcher.launch(order, self.config.launch_timeout)
            except (LaunchError, CgroupError, OSError) as e:
                if not job.recorded:
                    if isinstance(e, OSError):
                        await self._forget_unrecorded(job)
                        raise _unrecordable(e) from e
                    self._recorded(job)  # a failed cgroup: _ready recorded the job anyway
                reason = _launch_failure(job, e)
                await self.start_failed(job, reason)
                if isinstance(e, CgroupError | OSError):
                    raise LaunchError(f"cannot start job {job.id}: {reason}") from e
                raise
            if isinstance(result, Launched):
                job.launched(result.run, result.supervisor)
                self.background(self.watch(job, result.supervisor), self.tasks)
            elif result.exit is not None:  # the supervisor recorded why (exit.json)
                job.start_failed(result.exit)
                self.background(self.finish(job), self.cleanups)
            else:
                await self.start_failed(job, result.error)

    def _next_after(self, job: Job) -> None:
        """Make the next job once ``job``, just launched (or not), has settled; nothing if
        it is made or being made (``job`` was not it): the start that takes it sees to the
        one after."""
        if not self._next_wanted():
            return
        if job.state is State.RUNNING:
            self.background(self._settled(job), self.tasks)
        else:
            self.prepare_next()

    async def _settled(self, job: Job) -> None:
        output = os.path.join(job.dir, LOG)
        changed = asyncio.Event()
        job.add_waiter(changed)
        try:
            # Woken by any change in its directory (a usage sample too): until its log
            # holds more than the magic, or its state changes.
            with self.notifier.subscribe(job.dir, changed):
                async with asyncio.timeout(_SETTLE_S):
                    while job.state is State.RUNNING and os.stat(output).st_size <= len(MAGIC):
                        changed.clear()
                        await changed.wait()
        except (TimeoutError, OSError):
            pass  # silent so far, or its directory cannot be watched: made now
        finally:
            job.remove_waiter(changed)
        self.prepare_next()

    def prepare_next(self) -> None:
        """Make the next job ahead, unless it is made or being made (:class:`_Next`)."""
        if self._next_wanted():
            self._preparing = True
            self.background(self._prepare_next(), self.cleanups)

    def _next_wanted(self) -> bool:
        return self.next is None and not self._preparing and not self.closed

    async def _prepare_next(self) -> None:
        job_id = str(uuid.uuid4())
        cgroup = None
        try:
            if self.cgroups is not None:
                cgroup = await asyncio.to_thread(self.cgroups.create, job_id, Limits())
            if not self.closed:
                await self.launcher.next_job(
                    NextJob(job_id, cgroup.paths if cgroup is not None else None)
                )
                self.next = _Next(job_id, cgroup)
                return
        except (CgroupError, OSError):
            pass  # none ahead: the next start makes its own (and reports what fails)
        finally:
            self._preparing = False
        await self._remove_next(cgroup)

    async def drop_next(self) -> None:
        """Remove the next job's cgroup (the launcher gone: the command's process forked
        ahead in it goes with its standby)."""
        if self.next is not None:
            await self._remove_next(self.next.cgroup)
            self.next = None

    async def _remove_next(self, cgroup: JobCgroup | None) -> None:
        if cgroup is not None:
            with contextlib.suppress(CgroupError):
                await asyncio.to_thread(cgroup.remove, self.config.cgroup_remove_timeout)

    def _recorded(self, job: Job) -> None:
        if not job.recorded:
            job.recorded = True
            job.appeared()

    def _ready(self, job: Job, record: SpecRecord) -> SpecRecord:
        """Make the job's cgroup and put the launch on record; return that record. A job
        created with its start (not ``job.recorded``) gets its directory first. Blocks: run
        it in a thread.

        Raises:
            CgroupError: the cgroup cannot be made (a new job is on record all the same,
                so that its failure is).
            OSError: the directory or the record cannot be written.
        """
        if not job.recorded:
            os.mkdir(job.dir, 0o700)
        if self.cgroups is not None:
            # The job's first process joins these before exec: no unlimited window. Set on
            # the job at once, so that a failed write below still has it removed.
            try:
                job.cgroup = self.cgroups.create(job.id, job.limits, made=job.cgroup is not None)
            except CgroupError:
                if not job.recorded:
                    write_record(job.dir, SPEC, record.to_json())
                raise
        # On record before the launch: a server that dies from here on finds, at its next
        # start, a job whose supervisor may be running (see _restore).
        ready = record._replace(
            launching=True,
            cgroup=job.cgroup.paths if job.cgroup is not None else None,
            sandbox=self._sandbox(job, record.uid),
        )
        write_record(job.dir, SPEC, ready.to_json())
        return ready

    def _sandbox(self, job: Job, uid: int) -> SandboxRecord | None:
        config = self.config
        if not (config.sandbox and config.namespaces):
            return None
        spec = job.spec
        return SandboxRecord(
            image=config.images[spec.image] if spec.image is not None else None,
            image_name=spec.image,
            tmp_bytes=job.limits.tmp_bytes or DEFAULT_TMP_BYTES,
            hide=config.hidden_paths,
            binds=config.binds_for(spec.owner),
            seccomp=spec.seccomp,
            cgroup2=self.cgroups is not None and self.cgroups.kind == "v2" and uid >= 0,
        )

    async def start_failed(self, job: Job, error: str) -> None:
        """Record (exit.json, unless the supervisor wrote one) and show a failed start."""
        record = _failed(error, "start_error")
        with contextlib.suppress(OSError):  # a full disk: the job is failed either way
            await asyncio.to_thread(write_exit_if_missing, job.dir, record)
        job.start_failed(record)
        self.background(self.finish(job), self.cleanups)

    # ---------------------------------------------------------------- ending
    async def watch(self, job: Job, supervisor: SupervisorHandle) -> None:
        """Wait for the job's supervisor to exit, then record the job's end."""
        await supervisor.wait()
        self._end_began()
        closing = supervisor.release()
        # Its cgroup is read for the final usage from here on (see ``ending``).
        self.ending.add(job.id)
        try:
            try:
                record, final = self._collect_end(job, closing)
            except ValueError as e:
                error = f"the job's exit record is unreadable: {e}"
                record, final = await self.record_lost(job, error), None
            if record is None:
                # The supervisor died without a record (killed from outside). Its PID
                # namespace died with it, so nothing of the job is left running.
                record = await self.record_lost(
                    job,
                    "the job's supervisor was killed; the job's processes were killed with it",
                )
        except BaseException:
            self.ending.discard(job.id)
            raise
        await self.end(job, record, final)

    def _collect_end(
        self, job: Job, closing: list[int]
    ) -> tuple[ExitRecord | None, FinalRecord | None]:
        """The job's exit record, and its final record measured now if there is one;
        closes ``closing`` (the ended supervisor's descriptors) first.

        On the event loop, not a worker thread: a few small reads of files the supervisor
        has just written and of cgroup files, which never wait for a disk. In a worker
        thread, each end had to win the interpreter's lock back from the busy event loop
        after every one of its dozen system calls: 1,000 StopJob at once answered in
        3.37 s on average, against 2.60 s this way (same server, alternating; the host's
        CPU time for the storm 6.1 against 4.8 core-seconds; docs/benchmarks.md (s)).

        Raises:
            ValueError: the exit record is unreadable.
        """
        for fd in closing:
            os.close(fd)
        record = read_exit(job.dir)
        return record, self._measure_final(job, record) if record is not None else None

    async def end(self, job: Job, record: ExitRecord, final: FinalRecord | None = None) -> None:
        """Show the job ended as ``record`` says, with its final usage and disk use (measured
        now unless ``final`` has them already); then record it (final.json) and remove its
        cgroup."""
        self.ending.add(job.id)
        try:
            if final is None:
                final = self._measure_final(job, record)
            job.ended(final)
        finally:
            self.ending.discard(job.id)
        self._record_final(job, final)
        self.background(self.finish(job), self.cleanups)

    def _measure_final(self, job: Job, record: ExitRecord) -> FinalRecord:
        """Final usage (from the job's cgroup) and disk use, with the run and exit records:
        everything a restart needs of an ended job, in one record (final.json)."""
        usage, oom, pids = None, False, False
        if job.cgroup is not None:
            with contextlib.suppress(OSError):  # already removed: usage is no longer known
                usage, oom = job.cgroup.usage().to_record(), job.cgroup.oom_killed()
                pids = job.cgroup.pids_limited()
        return FinalRecord(job.run, record, usage, oom, dir_bytes(job.dir), pids)

    def _record_final(self, job: Job, final: FinalRecord) -> None:
        """Write the job's final.json off the event loop (a write can wait for the disk),
        once no end has begun for a while, as cgroups are removed (``_after_the_ends``):
        one hop to the recorder thread then writes every record waiting. A thread doing
        file I/O while ends keep the event loop busy waits for the interpreter's lock after
        each system call, and takes it from the loop as often. Until it is written, a
        restart finds exit.json only and measures the end again (the job's cgroup is
        removed after)."""
        self._finals[job.id] = (job.dir, final)
        if self._recording is None:
            self._recording = asyncio.get_running_loop().create_task(self._write_finals())
            self.cleanups.add(self._recording)
            self._recording.add_done_callback(self.cleanups.discard)

    async def _write_finals(self) -> None:
        try:
            while self._finals:
                await self._after_the_ends()
                self._writing, self._finals = self._finals, {}
                await self._on(
                    self.recorder, functools.partial(_write_final_records, self._writing)
                )
        finally:
            self._writing = {}
            self._recording = None

    async def _final_written(self, job: Job) -> None:
        """Return once the job's final.json is written (or its write has failed, or it was
        dropped)."""
        while (job.id in self._finals or job.id in self._writing) and self._recording:
            await asyncio.shield(self._recording)

    async def record_lost(self, job: Job, error: str) -> ExitRecord:
        """Record that the job ended unseen, so every later start reports it the same way."""
        record = _failed(error, "lost")
        with contextlib.suppress(OSError):
            await asyncio.to_thread(write_exit_if_missing, job.dir, record)
        with contextlib.suppress(OSError, ValueError):
            return await asyncio.to_thread(read_exit, job.dir) or record
        return record

    async def finish(self, job: Job) -> None:
        """After a job's end: remove its cgroup, then apply the disk budget."""
        cgroup = job.cgroup
        if cgroup is None and self.cgroups is not None:
            # A server that died between creating the cgroup and recording it leaves one
            # that only its id finds.
            cgroup = self.cgroups.find(job.id)
        empty = True
        if cgroup is not None:
            await self._after_the_ends()
            # After final.json: a restart before it is written measures the end again,
            # from the cgroup.
            await self._final_written(job)
            empty = await self._remove_cgroup(cgroup)
        if empty:
            # Nothing the job started remains: its uid may serve another job.
            self.uids.give_back(job.record.uid)
        self._after_ends()

    def _end_began(self) -> None:
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        self._last_end = loop.time()
        self._quiet.clear()
        if self._quiet_timer is None:
            self._quiet_timer = loop.call_later(_REMOVE_QUIET_S, self._check_quiet)

    def _check_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        left = self._last_end + _REMOVE_QUIET_S - loop.time()
        if left > 0:
            self._quiet_timer = loop.call_later(left, self._check_quiet)
        else:
            self._quiet_timer = None
            self._quiet.set()

    async def _after_the_ends(self) -> None:
        """Return once no job's end has begun for _REMOVE_QUIET_S, after _REMOVE_DEFER_S
        at the most, or at once when the runtime closes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_REMOVE_DEFER_S):
                await self._quiet.wait()

    async def _remove_cgroup(self, cgroup: JobCgroup) -> bool:
        """Remove the job's cgroup once it has emptied, within ``cgroup_remove_timeout``;
        False if it would not go (left for prune() at the next start-up).

        Each try takes a worker thread for a moment only; the waits between tries are on
        the event loop. A blocking wait per job held a thread for as long as the kernel
        lagged (v1 hierarchies stay busy up to a second after their last task left), so
        1,000 stops at once queued behind a few removals (issue 15).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.cgroup_remove_timeout
        delay = _REMOVE_FIRST_S
        while True:
            with contextlib.suppress(CgroupError):  # still busy: try again
                if await self._on(self.removers, functools.partial(cgroup.remove, 0.0)):
                    return True
            if loop.time() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, _REMOVE_CAP_S)

    def _after_ends(self) -> None:
        """Run the after-end pass soon: now if none runs, else once more when it is done."""
        if self.closed or self.after_end is None:
            return
        if self._after_end_task is not None and not self._after_end_task.done():
            self._after_end_again = True
            return
        self._after_end_task = asyncio.get_running_loop().create_task(self._run_after_ends())
        self.cleanups.add(self._after_end_task)
        self._after_end_task.add_done_callback(self.cleanups.discard)

    async def _run_after_ends(self) -> None:
        while self.after_end is not None and not self.closed:
            self._after_end_again = False
            try:
                await self.after_end()
            except OSError as e:
                log.warning("retention pass failed: %s", e)
            if not self._after_end_again:
                return

    # ---------------------------------------------------------------- deleting
    async def delete(self, job: Job) -> None:
        """Forget the job and delete its directory (its cgroup goes with its end)."""
        if not self.registry.discard(job):
            return  # deleted meanwhile
        job.deleted()
        # Its final.json is not wanted any more (a RemoveJob right after the end, as
        # `jobctl run --rm` sends, must not wait for the ends to stop), and must not be
        # written into the directory as it goes.
        self._finals.pop(job.id, None)
        await self._final_written(job)
        async with self.sampling:
            await asyncio.to_thread(shutil.rmtree, job.dir, True)


def _write_final_records(finals: dict[str, tuple[str, FinalRecord]]) -> None:
    for directory, final in finals.values():
        with contextlib.suppress(OSError):  # its directory deleted meanwhile, or a full disk
            write_record(directory, FINAL, final.to_json())


def _launch_failure(job: Job, error: Exception) -> str:
    """What the caller and the job's status are told of a failed launch: the detail (a host
    cgroup path, an errno) goes to the server's log only."""
    log.error("cannot start job %s: %s", job.id, error, exc_info=error)
    if isinstance(error, CgroupError):
        return "the server could not set up the job's cgroup (see its log)"
    if isinstance(error, OSError):
        return f"the server could not record the job's start ({error.strerror})"
    return str(error)


def _unrecordable(error: OSError) -> StateDirError:
    return StateDirError(
        f"cannot record the job: {error.strerror}; the server's state disk is full or "
        "unwritable. Delete ended jobs (jobctl rm), or ask the operator to free space"
    )


def _make_job_dir(directory: str, record: SpecRecord) -> None:
    os.mkdir(directory, 0o700)
    write_record(directory, SPEC, record.to_json())
