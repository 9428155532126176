"""The runtime: create, start, stop, signal, watch and read jobs, with an asyncio API.

A facade: it checks what each call may do and hands the work to the lifecycle
(``_lifecycle``), restart (``_restore``) and retention (``_retention``) modules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import os
import signal as signal_module
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import replace
from typing import Self

from .._allocator import release_free_memory
from ._changes import Change, ChangeFeed
from ._config import ALL_OWNERS, RuntimeConfig
from ._errors import (
    InvalidSpecError,
    JobEndedError,
    JobNotFoundError,
    JobNotRunningError,
    JobRunningError,
    NoStdinError,
    NotPermittedError,
    RuntimeClosedError,
    StateDirError,
)
from ._exec import ExecProcess
from ._job import Job
from ._jobdir import LOCK_FILE, LOG, SPARE_ROOT
from ._launch import Launcher, SupervisorHandle
from ._lifecycle import Lifecycle
from ._locks import LockHeldError, lock_exclusive
from ._logformat import Stream
from ._notify import DirNotifier
from ._observer import JobObserver, NullObserver
from ._output import Batch, Chunk, ReadBudget, SharedReads, Window, log_end, read_log
from ._protocol import Control, ExecOrder, Outcome, Verb
from ._registry import Registry
from ._restore import boot_id, restore
from ._retention import prune_ended, retention_loop
from ._rootfs import PRIVATE_DIRS, WORKDIR
from ._sampler import Sampler
from ._seccomp import build_filter
from ._spec import ExecSpec, JobSpec, check_signal, check_window
from ._states import State
from ._status import JobStatus
from ._stdin import StdinPipe
from ._usage import Sample, UsageHistory, thin
from .cgroups import CgroupDriver, CgroupError, open_driver, resolve_io

__all__ = ["Runtime"]

# A supervisor that has not ended the job this long after the grace period is presumed hung;
# it is then SIGKILLed, which makes the kernel kill the job's whole PID namespace.
_STOP_SLACK_S = 10.0
# When the heap is handed back once more after the last output reader has gone: gRPC has
# finished the calls that carried the readers' last messages by then (docs/benchmarks.md
# (q), "The ninth session").
_RELEASE_AGAIN_S = 2.0


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
        self._launcher = launcher
        self._cgroups = cgroups
        self._registry = Registry()
        self._notifier = DirNotifier()
        self._changes = ChangeFeed(observer)
        self._life = Lifecycle(
            config,
            registry=self._registry,
            launcher=launcher,
            cgroups=cgroups,
            observer=self._changes,
            notifier=self._notifier,
            boot_id=boot_id(),
        )
        self._life.after_end = functools.partial(prune_ended, self._life, measure_live=False)
        self._sampler = Sampler(self._life, config.usage_interval)
        # Log reads go to their own small pool, so many followers cannot starve other work.
        self._readers = concurrent.futures.ThreadPoolExecutor(4, "jobworker-log")
        self._read_budget = ReadBudget(config.output_buffer_bytes, self._readers_gone)
        self._shared_reads = SharedReads()
        self._release_again: asyncio.TimerHandle | None = None
        # The flock on the state dir, held while open (see _lock_state_dir).
        self._state_lock = -1

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
        lock = _lock_state_dir(config)
        cgroups = None
        try:
            if config.cgroups:
                # Before the launcher exists: on cgroup v2 the server may move itself into a
                # leaf, and the launcher (and every supervisor) must start there too.
                cgroups = await asyncio.to_thread(
                    open_driver, config.cgroup_subtree, config.cgroup_parent
                )
            bpf = await _check_startable(config)
        except BaseException:
            if cgroups is not None:
                cgroups.release()
            os.close(lock)
            raise
        spare = None
        # Paths shown to every owner: no job could take a spare (it shows none).
        if bpf and config.spare_roots and not config.owner_paths.get(ALL_OWNERS):
            at = config.state_dir / SPARE_ROOT
            await asyncio.to_thread(at.mkdir, mode=0o700, exist_ok=True)
            spare = (str(at), config.hidden_paths)
        runtime = cls(config, Launcher.spawn(bpf, spare), cgroups, observer or NullObserver())
        runtime._state_lock = lock
        life = runtime._life
        try:
            await restore(life)
        except BaseException:
            await runtime.close()
            raise
        if cgroups is not None:
            # A cgroup of no running job was left by a crash or a deleted job: take it down.
            keep = {j.id for j in runtime._registry if not j.state.is_final}
            await asyncio.to_thread(cgroups.prune, keep | life.ending)
        life.prepare_next()
        life.background(retention_loop(life), life.tasks)
        life.background(runtime._sampler.run(), life.tasks)
        return runtime

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watching jobs and release the launcher; running jobs keep running."""
        life = self._life
        if life.closed:
            return
        life.begin_close()
        await asyncio.gather(*life.launches, return_exceptions=True)
        for task in life.tasks:
            task.cancel()
        await asyncio.gather(*life.tasks, return_exceptions=True)
        await asyncio.gather(*life.cleanups, return_exceptions=True)
        # After a tick that was under way in its thread: it holds the sampler's lock.
        await asyncio.to_thread(self._sampler.close)
        if self._release_again is not None:
            self._release_again.cancel()
        running = False
        for job in self._registry:
            if job.stdin_pipe is not None:
                job.stdin_pipe.release()  # the supervisor keeps its own end: the job reads on
            if job.supervisor is not None:
                running = running or not job.state.is_final
                job.supervisor.close()
        await self._notifier.close()
        await self._launcher.close(jobs_running=running)
        if self._cgroups is not None:
            if not running:
                await asyncio.to_thread(self._cgroups.close, self._config.cgroup_remove_timeout)
            else:
                await life.drop_next()
            self._cgroups.release()
        self._readers.shutdown(wait=True)
        life.shutdown()
        if self._state_lock >= 0:
            os.close(self._state_lock)
            self._state_lock = -1

    @property
    def cgroup_kind(self) -> str | None:
        """ "v2", "hybrid" or "v1"; None when cgroups are off and limits not enforced."""
        return self._cgroups.kind if self._cgroups is not None else None

    @property
    def notifier(self) -> DirNotifier:
        return self._notifier

    # ---------------------------------------------------------------- lookups
    def _get(self, job_id: str) -> Job:
        return self._registry.get(job_id)

    def _check_open(self) -> None:
        if self._life.closed:
            raise RuntimeClosedError("the runtime is closed")

    def owner_of(self, job_id: str) -> str | None:
        """The owner of job ``job_id``, or None if there is no such job. From memory: costs
        the same for every id, known, foreign or malformed."""
        return self._registry.owner_of(job_id)

    async def status(self, job_id: str) -> JobStatus:
        """The job's current status, with its resource usage (live while it runs).

        Raises:
            JobNotFoundError: no job has this id.
        """
        job = self._get(job_id)
        cgroup = job.cgroup
        if job.state is State.RUNNING and cgroup is not None:
            try:
                usage = await asyncio.to_thread(cgroup.usage)
            except OSError:
                # The job ended and its cgroup is going away under us: its final status,
                # with final usage, follows in a moment; this one simply has none.
                return job.status
            if job.state is State.RUNNING:  # it may have ended while we read
                return job.status.with_usage(usage)
        return job.status

    async def jobs(self, owner: str | None = None) -> list[JobStatus]:
        """All jobs, or those of ``owner``, oldest first.

        A running job's live usage is not read here (:meth:`status` reads it): reading the
        cgroups of 1,000 running jobs made one listing take 141-241 ms (issue 15), as
        ``docker ps`` leaves usage to ``docker stats``. Ended jobs carry their final usage.
        """
        return [j.status for j in self._registry.of(owner)]

    # ---------------------------------------------------------------- lifecycle
    async def create(
        self, spec: JobSpec, *, start: bool = False, max_active: int | None = None
    ) -> JobStatus:
        """Create a job (state ``created``); with ``start``, start it too.

        The server's default limits fill what ``spec`` leaves unset. ``max_active`` caps the
        owner's jobs created or running, checked and reserved in one step.

        Raises:
            InvalidSpecError: ``spec`` is not a JobSpec, or asks for a limit above the
                server's maximum or for an IO device that does not exist.
            NotPermittedError: the owner may not use the host network.
            QuotaError: the owner already has ``max_active`` jobs created or running.
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
        spec = replace(spec, timeout_s=self._timeout(spec))
        if self.sandboxed:
            # Checked against the sandbox's own places, not the host's directories: no
            # blocking call, so no hop to a thread (0.4 ms of a start, more under load).
            spec = self._place(spec)
        else:
            spec = await asyncio.to_thread(self._place, spec)
        limits = spec.limits.resolve(config.default_limits, config.max_limits)
        if limits.io and self._cgroups is not None:
            try:
                io = await asyncio.to_thread(resolve_io, limits, self._io_path(spec))
            except CgroupError as e:
                raise InvalidSpecError(str(e)) from e
            limits = replace(limits, io=io)
        job = await self._life.create(spec, limits, start=start, max_active=max_active)
        if start:
            await self._life.start(job)
        return job.status

    def _timeout(self, spec: JobSpec) -> float | None:
        """The job's run-time limit: its own, else the server's default, never above the
        server's maximum.

        Raises:
            InvalidSpecError: it asks for more than the maximum.
        """
        config = self._config
        timeout = spec.timeout_s if spec.timeout_s is not None else config.default_timeout
        cap = config.max_timeout
        if cap is None:
            return timeout
        if timeout is None:
            return cap
        if timeout > cap:
            raise InvalidSpecError(
                f"timeout {timeout:g}s is above the server maximum of {cap:g}s; ask for at "
                "most that"
            )
        return timeout

    @property
    def default_grace(self) -> float:
        """Seconds between SIGTERM and SIGKILL when a stop names none."""
        return self._config.default_grace

    @property
    def timeouts(self) -> tuple[float | None, float | None]:
        """The server's default and maximum job timeout, in seconds (None: none)."""
        return self._config.default_timeout, self._config.max_timeout

    @property
    def sandboxed(self) -> bool:
        return self._config.sandbox and self._config.namespaces

    @property
    def features(self) -> tuple[str, ...]:
        """The isolation every job gets: "cgroups" (limits enforced), "namespaces",
        "sandbox" (a uid, root and seccomp filter of its own)."""
        return tuple(
            name
            for name, on in (
                ("cgroups", self.cgroup_kind is not None),
                ("namespaces", self._config.namespaces),
                ("sandbox", self.sandboxed),
            )
            if on
        )

    def _visible(self, spec: JobSpec, path: str) -> bool:
        """Whether ``path`` lies in a place a sandboxed job of ``spec.owner`` can see."""
        places = [WORKDIR, *PRIVATE_DIRS, *(b.path for b in self._config.binds_for(spec.owner))]
        return any(_within(path, p) for p in places)

    def _io_path(self, spec: JobSpec) -> str:
        """Where an IO limit without a device applies: the working directory's disk, or for
        one in the job's private tmpfs, the root disk."""
        cwd = spec.cwd or "/"
        if self.sandboxed and not any(
            cwd == b.path or cwd.startswith(b.path + "/")
            for b in self._config.binds_for(spec.owner)
        ):
            return "/"
        return cwd

    def _place(self, spec: JobSpec) -> JobSpec:
        """``spec`` with its image, seccomp choice and working directory checked, and the
        working directory decided (blocks when the sandbox is off: checks the host's
        directories).

        Raises:
            InvalidSpecError: an unknown image, or a working directory the job cannot see.
            NotPermittedError: the owner may not turn the seccomp filter off.
        """
        config = self._config
        if spec.image is not None and spec.image not in config.images:
            known = ", ".join(sorted(config.images)) or "none are configured"
            raise InvalidSpecError(f"unknown image {spec.image!r}; the server's images: {known}")
        if not spec.seccomp and spec.owner not in config.seccomp_optional_owners:
            raise NotPermittedError(
                f"owner {spec.owner!r} may not run jobs without the seccomp filter (server "
                "configuration: [sandbox] seccomp_optional)"
            )
        if not self.sandboxed:
            if spec.image is not None:
                raise InvalidSpecError("images need the sandbox, which this server has off")
            cwd = spec.cwd or "/"
            if not os.path.isdir(cwd):
                raise InvalidSpecError(f"working directory {cwd!r} does not exist on the server")
            return replace(spec, cwd=cwd)
        cwd = spec.cwd or WORKDIR
        if not self._visible(spec, cwd):
            raise InvalidSpecError(
                f"working directory {cwd!r} does not exist inside the job; use {WORKDIR} (the "
                "default, private), /tmp, or a path the server shows your jobs"
            )
        return replace(spec, cwd=cwd)

    async def run(self, spec: JobSpec) -> JobStatus:
        """Create and start a job in one call; see :meth:`create`."""
        return await self.create(spec, start=True)

    async def start(self, job_id: str) -> JobStatus:
        """Start a created job; return its status (``running``, or ``failed`` with the reason).

        Raises:
            JobNotFoundError: no job has this id.
            JobAlreadyStartedError: the job has already been started (and maybe ended).
            LaunchError: the launcher failed.
        """
        self._check_open()
        job = self._get(job_id)
        await self._life.start(job)
        return job.status

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
        await supervisor.command(Control(Verb.STOP, grace))
        try:
            async with asyncio.timeout(grace + _STOP_SLACK_S):
                await job.ended_event.wait()
        except TimeoutError:
            supervisor.kill()  # the kernel then kills the job's whole PID namespace
            await job.ended_event.wait()
        return job.status

    async def signal(self, job_id: str, signum: int) -> None:
        """Send ``signum`` to every process of the job.

        Raises:
            JobNotFoundError: no job has this id.
            JobNotRunningError: the job has not been started.
            JobEndedError: the job has ended.
            InvalidSpecError: ``signum`` is not a valid signal number.
        """
        check_signal(signum)
        job = self._get(job_id)
        supervisor = self._running(job, "signal")
        if signum == signal_module.SIGKILL and job.cgroup is not None:
            # One atomic kernel operation for every process of the job, where available.
            try:
                if await asyncio.to_thread(job.cgroup.kill):
                    return
            except CgroupError:
                pass  # e.g. the job just ended and its cgroup is going; ask the supervisor
        reply = await supervisor.command(Control(Verb.SIGNAL, signum))
        if reply.outcome is Outcome.ENDED:
            raise JobEndedError(f"cannot signal job {job.id}: it has ended")
        if reply.outcome is not Outcome.OK:
            raise JobEndedError(f"cannot signal job {job.id}: {reply.detail}")

    def input_mode(self, job_id: str) -> str:
        """The job's stdin mode ("pipe" or "tty"), once it is known to take input now.

        Raises:
            JobNotFoundError: no job has this id.
            NoStdinError: the job's stdin is /dev/null.
            JobNotRunningError, JobEndedError: it has not started, or has ended.
        """
        job = self._get(job_id)
        self._taking_input(job)
        return job.spec.stdin

    def _taking_input(self, job: Job) -> SupervisorHandle:
        """Raises NoStdinError (stdin "none"), JobNotRunningError (not started) or
        JobEndedError (ended)."""
        if job.spec.stdin == "none":
            raise NoStdinError(
                f"job {job.id} reads no input (it was started with stdin none); start a job "
                "that reads input with stdin pipe (jobctl run -i)"
            )
        return self._running(job, "send input to")

    def _stdin_of(self, job: Job) -> tuple[StdinPipe, SupervisorHandle]:
        """Raises as :meth:`_taking_input`."""
        supervisor = self._taking_input(job)
        if job.stdin_pipe is None:
            job.stdin_pipe = StdinPipe()
        return job.stdin_pipe, supervisor

    async def write_stdin(self, job_id: str, data: bytes) -> bool:
        """Write ``data`` to the job's stdin (stdin "pipe"), after any input from other
        callers that came first; waits while the job has not read what came before. False
        when the job no longer reads its stdin (closed it, or ended): the data is dropped.

        Raises:
            JobNotFoundError: no job has this id.
            NoStdinError: the job's stdin is /dev/null.
            JobNotRunningError, JobEndedError: it has not started, has ended, or its stdin
                was closed.
        """
        pipe, supervisor = self._stdin_of(self._get(job_id))
        return await pipe.write(supervisor, data)

    async def close_stdin(self, job_id: str) -> None:
        """Send EOF to the job's stdin, for good (every caller's).

        Raises:
            as :meth:`write_stdin`.
        """
        job = self._get(job_id)
        pipe, supervisor = self._stdin_of(job)
        if job.spec.stdin == "pipe":  # a terminal has no EOF to send: Ctrl+D is a keystroke
            await pipe.close(supervisor)

    async def resize(self, job_id: str, rows: int, cols: int, *, redraw: bool = False) -> None:
        """Set a terminal job's window size (``redraw``: so that a program that redraws on
        SIGWINCH does, even at the same size).

        Raises:
            JobNotFoundError: no job has this id.
            NoStdinError: the job has no terminal.
            InvalidSpecError: a size out of range.
            JobNotRunningError, JobEndedError: it has not started, or has ended.
        """
        job = self._get(job_id)
        if job.spec.stdin != "tty":
            raise NoStdinError(f"job {job.id} has no terminal to resize (start it with a tty)")
        check_window(rows, cols)
        pipe, supervisor = self._stdin_of(job)
        await pipe.resize(supervisor, rows, cols, redraw=redraw)

    async def exec(self, job_id: str, spec: ExecSpec) -> ExecProcess:
        """Start a process inside the running job (``docker exec``): in its namespaces,
        root, cgroups (so its limits), as its user, under its seccomp filter; it ends when
        the job does. The caller owns the result and must :meth:`ExecProcess.close` it.

        Raises:
            JobNotFoundError: no job has this id.
            JobNotRunningError, JobEndedError: it has not started, or has ended.
            ExecFailedError: the process could not start (e.g. its command is not found).
            LaunchError: the job's supervisor did not answer.
        """
        job = self._get(job_id)
        supervisor = self._running(job, "run a process inside")
        order = ExecOrder(
            argv=tuple(spec.argv),
            env=dict(spec.env),
            cwd=spec.cwd,
            stdin=spec.stdin,
            tty=spec.tty,
            window=spec.window,
            term=spec.term,
        )
        try:
            return await supervisor.exec(order)
        except JobEndedError:
            raise JobEndedError(f"cannot run a process inside job {job.id}: it has ended") from None

    async def wait(self, job_id: str) -> JobStatus:
        """Return the job's final status once it has ended (at once if it has).

        Raises:
            JobNotFoundError: no job has this id, or it was deleted while we waited.
        """
        job = self._get(job_id)
        await job.ended_event.wait()
        if job.gone and not job.state.is_final:
            raise JobNotFoundError(job_id)
        return job.status

    async def watch(self, job_id: str) -> AsyncGenerator[JobStatus, None]:
        """Yield the job's status now and after every state change, ending at a final state
        (or when the job is deleted).

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
                if job.gone:
                    return
                await changed.wait()
        finally:
            job.remove_waiter(changed)

    async def usage(self, job_id: str, since_ns: int = 0, step_ns: int = 0) -> list[Sample]:
        """The job's usage history after ``since_ns``, at most one sample per ``step_ns``
        (0: every one kept); each carries the largest memory and pids of those it stands
        for, so a peak is never lost. [] before its first sample (or with sampling off).

        Raises:
            JobNotFoundError: no job has this id.
            InvalidSpecError: a negative since or step.
        """
        if since_ns < 0 or step_ns < 0:
            raise InvalidSpecError("since and step must not be negative")
        history = UsageHistory(self._get(job_id).dir)
        samples = await asyncio.get_running_loop().run_in_executor(self._readers, history.samples)
        return thin(samples, since_ns, step_ns)

    def watch_usage(self, job_id: str, since_ns: int = 0) -> AsyncGenerator[list[Sample], None]:
        """The job's samples after ``since_ns``, then each new one as it is taken; ends
        once the job has ended.

        Raises:
            JobNotFoundError: no job has this id.
        """
        return self._sampler.watch(self._get(job_id), since_ns)

    def recent_usage(self, owner: str | None = None) -> dict[str, tuple[Sample, ...]]:
        """Every running job's latest two samples (one after its first), by id, of
        ``owner`` (None: every owner's); from memory, as of the last tick."""
        recent = self._sampler.recent
        if owner is None:
            return dict(recent)
        return {i: s for i, s in recent.items() if self._registry.owner_of(i) == owner}

    @property
    def sampler(self) -> Sampler:
        return self._sampler

    def changes(
        self, wants: Callable[[JobStatus], bool], *, existing: bool = False
    ) -> AsyncGenerator[list[Change], None]:
        """Every change from now on to a job ``wants`` accepts (created, changed state,
        deleted), in the order they happened, in batches of what came meanwhile; the
        iterator never ends by itself. With ``existing``, the first batch is every job
        ``wants`` accepts as the watch begins (oldest first), with no gap before the
        changes that follow.

        Raises:
            WatcherBehindError: (while iterating) the caller fell far behind.
        """
        self._check_open()

        def now() -> list[JobStatus]:
            return [j.status for j in self._registry.of(None) if wants(j.status)]

        return self._changes.watch(wants, now if existing else None)

    async def settled(self) -> None:
        """Return once every job end seen so far has been dealt with: cgroups removed,
        uids given back, retention applied."""
        while self._life.cleanups:
            await asyncio.gather(*list(self._life.cleanups), return_exceptions=True)

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
            if job.state is State.RUNNING or (job.state is State.CREATED and job.record.launching):
                raise JobRunningError(
                    f"job {job.id} is {job.state}; stop it first (jobctl stop {job.id[:12]})"
                )
            await self._life.delete(job)

    async def prune_ended(self, now: float | None = None) -> list[str]:
        """Apply the retention settings now (``now``: seconds since the epoch, for tests);
        return the ids of the jobs deleted, oldest first."""
        return await prune_ended(self._life, now)

    # ---------------------------------------------------------------- output
    async def output(
        self,
        job_id: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        follow: bool = False,
        window: Window | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """The job's output from its first byte, as chunks tagged with stream and time.

        With ``follow``, waits for new output until the job has ended and all of it has been
        delivered. Notes from jobworker itself (e.g. truncation) come as ``Stream.SYSTEM``
        chunks in every view. ``window`` picks a part of the log (an offset to resume from,
        the last lines, a time span). Close the iterator (``contextlib.aclosing``) if you
        stop early.

        Raises:
            JobNotFoundError: no job has this id (raised on the first iteration).
            InvalidSpecError: neither stream is selected, or the window's offset is not one
                this job's output gave.
        """
        async with contextlib.aclosing(
            self.output_batches(job_id, stdout=stdout, stderr=stderr, follow=follow, window=window)
        ) as batches:
            async for batch in batches:
                for chunk in batch.chunks:
                    yield chunk

    def output_batches(
        self,
        job_id: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        follow: bool = False,
        window: Window | None = None,
    ) -> AsyncGenerator[Batch, None]:
        """As :meth:`output`, in batches: each holds what one read of the log found, and
        the offset it read up to.

        Raises:
            JobNotFoundError: no job has this id.
            InvalidSpecError: neither stream is selected; (first iteration) the window's
                offset is not one this job's output gave.
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
            has_ended=lambda: job.state.is_final or job.gone,
            subscribe=lambda event: self._subscribe(job, event),
            executor=self._readers,
            budget=self._read_budget,
            shared=self._shared_reads,
            window=window,
        )

    async def output_end(self, job_id: str) -> int:
        """The offset where the job's output written from now on begins (a
        :class:`Window` offset): "only new output", fixed before anything else happens.

        Raises:
            JobNotFoundError: no job has this id.
        """
        job = self._get(job_id)
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, log_end, os.path.join(job.dir, LOG)
        )

    @property
    def output_readers(self) -> int:
        """How many output readers (followers or not) are open now."""
        return self._read_budget.readers

    async def no_output_readers(self) -> None:
        """Return once no output reader is open (e.g. every stream a client cancelled has
        ended on the server's side too)."""
        await self._read_budget.idle.wait()

    def _readers_gone(self) -> None:
        # What the readers' batches, and the messages made of them, took: back to the
        # kernel (docs/architecture.md, "Many followers"), now and once more a little
        # later. gRPC finishes the calls that carried the last messages after their
        # readers have gone, and only then frees what those held: 30 s after 1,000
        # followers the heap held 23-75 MiB without the second pass, 11 MiB with it.
        self._release_memory()
        if self._release_again is not None:
            self._release_again.cancel()
        self._release_again = asyncio.get_running_loop().call_later(
            _RELEASE_AGAIN_S, self._release_memory
        )

    def _release_memory(self) -> None:
        # Collected first: a finished stream's objects sit in reference cycles (gRPC's
        # call state, its tasks), holding their last messages, until the collector runs.
        gc.collect()
        with contextlib.suppress(RuntimeError):  # the pool is shut down: the runtime closed
            self._readers.submit(release_free_memory)

    @contextlib.contextmanager
    def _subscribe(self, job: Job, event: asyncio.Event) -> Iterator[None]:
        job.add_waiter(event)
        try:
            with self._notifier.subscribe(job.dir, event):
                yield
        finally:
            job.remove_waiter(event)


def _lock_state_dir(config: RuntimeConfig) -> int:
    """An exclusive lock on the state dir: two servers on one would both serve, steer and
    stop the same jobs.

    Raises:
        StateDirError: another process holds it (the message names its pid).
    """
    try:
        return lock_exclusive(str(config.state_dir / LOCK_FILE))
    except LockHeldError as e:
        raise StateDirError(
            f"another {e.holder} is using the state dir {config.state_dir}; stop it, or give "
            "this server a state dir of its own (--state-dir)"
        ) from None


async def _check_startable(config: RuntimeConfig) -> bytes:
    """What the configuration asks of this host, checked with a clear error at start-up;
    returns the jobs' seccomp program (empty without the sandbox).

    Raises:
        InvalidSpecError: an image directory is missing, or no seccomp filter can be built.
    """
    for name, path in config.images.items():
        if not await asyncio.to_thread(os.path.isdir, path):
            raise InvalidSpecError(f"[images] {name}: {path} is not a directory")
    if not (config.sandbox and config.namespaces):
        return b""
    # Here, with a clear error: the launcher gets the program ready-made.
    try:
        return await asyncio.to_thread(build_filter)
    except (OSError, ValueError, RuntimeError) as e:
        raise InvalidSpecError(
            f"cannot build the seccomp filter ({e}); install libseccomp2, or set "
            "[sandbox] enabled = false"
        ) from e


def _within(path: str, place: str) -> bool:
    return path == place or path.startswith(place.rstrip("/") + "/")
