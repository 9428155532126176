"""jobctl's commands: what each does once its arguments are parsed, over one connection.

Loaded only after parsing (by ``__main__``, or by a connection keeper), so it imports gRPC and
asyncio at the top: ``jobctl --help`` never pays for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .._allocator import keep_large_buffers
from .._labels import LabelError, check_labels, check_name, parse_selector
from .._text import escape
from .._units import UsageError, parse_duration, parse_signal, parse_size
from ..api.client import OutputPiece, RunningJob, pb, start_run, stream_output
from ._attach import DETACHED, attach, exec_in, first_done, parse_detach_keys, window_of
from ._client import CliError, Session, explain, no_answer, session
from ._config import Target
from ._io import Io
from ._render import (
    JOBCTL_FAILED,
    event_text,
    exit_status_of,
    info_json,
    job_json,
    json_text,
    outcome,
    rfc3339,
    status_text,
    table_text,
)
from ._top import top

__all__ = ["guarded", "job_spec", "listed", "run_command", "run_here", "run_in_process"]

# How long a follower keeps trying to reach a restarting server before giving up.
RECONNECT_FOR_S = 60.0
_FINAL_STATES = frozenset({"exited", "stopped", "failed"})


def _command(args: argparse.Namespace, example: str) -> list[str]:
    """Raises UsageError: no command given."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError(f"give the command to run, e.g. {example}")
    return cmd


def job_spec(args: argparse.Namespace) -> pb.JobSpec:
    """Raises UsageError: no command, or a malformed name or label."""
    cmd = _command(args, "jobctl run -- ls -l")
    labels = dict(item.split("=", 1) for item in args.label)
    try:
        if args.name is not None:
            check_name(args.name)
        check_labels(labels)
    except LabelError as e:
        raise UsageError(str(e)) from None
    spec = pb.JobSpec(
        argv=cmd,
        env=args.job_env,
        workdir=args.workdir,
        limits=_limits(args),
        host_network=args.network == "host",
        image=args.image or "",
        seccomp_unconfined=args.seccomp == "unconfined",
        name=args.name or "",
        labels=labels,
        stdin=_stdin_mode(args),
    )
    if args.tty:
        spec.window.CopyFrom(window_of(0) or pb.WindowSize(rows=24, cols=80))
        spec.term = os.environ.get("TERM") or "xterm"
    if args.timeout is not None:
        spec.timeout_seconds = args.timeout
    return spec


def _exec_start(args: argparse.Namespace, job_id: str) -> pb.ExecStart:
    """Raises UsageError: no command, or `-it` whose stdin is not a terminal."""
    start = pb.ExecStart(
        id=job_id,
        argv=_command(args, "jobctl exec JOB -- ps -ef"),
        env=args.job_env,
        workdir=args.workdir,
        stdin=args.interactive,
        tty=args.tty,
    )
    if args.tty:
        _check_terminal(args)
        start.window.CopyFrom(window_of(0) or pb.WindowSize(rows=24, cols=80))
        start.term = os.environ.get("TERM") or "xterm"
    return start


def _check_terminal(args: argparse.Namespace) -> None:
    """Raises UsageError: -it whose stdin is not a terminal (`start -it` reads none)."""
    if args.command != "start" and args.interactive and not os.isatty(0):
        raise UsageError(
            f"the input device is not a TTY: drop -t to pipe input (jobctl {args.command} "
            "-i), or run jobctl from a terminal"
        )


def _stdin_mode(args: argparse.Namespace) -> pb.StdinMode.ValueType:
    """Raises UsageError: `run -it` whose stdin is not a terminal."""
    if args.tty:
        _check_terminal(args)
        return pb.STDIN_MODE_TTY
    return pb.STDIN_MODE_PIPE if args.interactive else pb.STDIN_MODE_NONE


def _limits(args: argparse.Namespace) -> pb.Limits:
    limits = pb.Limits()
    if args.cpus is not None:
        limits.cpus = args.cpus
    if args.memory is not None:
        limits.memory_bytes = args.memory
    if args.pids is not None:
        limits.pids = args.pids
    if args.tmp_size is not None:
        limits.tmp_bytes = args.tmp_size
    for option, field in ((args.io_read_bps, "read_bps"), (args.io_write_bps, "write_bps")):
        for item in option:
            device, sep, rate = item.rpartition("=")
            io = limits.io.add(device=device if sep else "")
            setattr(io, field, parse_size(rate, f"IO rate in {item!r}"))
    return limits


class _Pump:
    """Copies a job's output stream to ours, and picks it up again after the offset it
    reached if the server goes away for a while (a restart): nothing is written twice."""

    def __init__(self, s: Session, request: pb.OutputRequest, io: Io, *, stamps: bool) -> None:
        self.s = s
        self.request = request
        self.io = io
        self.offset = 0
        # A RunJob whose output to copy first (StreamOutput after it only if it breaks
        # off), and which keeps the job's final status it ends with.
        self.running: RunningJob | None = None
        # With --timestamps: whether each stream is at the start of a line.
        self.stamps = stamps
        self._line_start: dict[int, bool] = {}
        # Set when stdout has gone: what follows goes only to stderr.
        self.discard_stdout = False

    def _stamped(self, stream: int, data: memoryview, ns: int) -> bytes | memoryview:
        """``data`` with a timestamp at the start of each line: a chunk that ends mid-line
        is continued by the next chunk of its stream, with no stamp in between."""
        if not self.stamps:
            return data
        stamp = rfc3339(ns).encode() + b" "
        out = []
        for line in bytes(data).splitlines(keepends=True):
            if self._line_start.get(stream, True):
                out.append(stamp)
            out.append(line)
            self._line_start[stream] = line.endswith(b"\n")
        return b"".join(out)

    async def _deliver(self, piece: OutputPiece) -> None:
        data = self._stamped(piece.stream, piece.data, piece.time_unix_nano)
        if piece.stream != pb.STREAM_STDOUT:
            await self.io.err(data)
        elif not self.discard_stdout:
            await self.io.out(data)
        if piece.last:
            # Its message is written out whole: a resume goes on after it.
            self.offset = piece.offset
            self.io.progress(self.request.id, piece.offset)

    async def run(self) -> None:
        """Raises CliError: the stream failed (and kept failing for RECONNECT_FOR_S);
        BrokenPipeError: our stdout was closed."""
        give_up = time.monotonic() + RECONNECT_FOR_S
        delay = 0.1
        while True:
            request = pb.OutputRequest()
            request.CopyFrom(self.request)
            if self.offset:
                request.ClearField("tail_lines")
                request.offset = self.offset
            try:
                async for piece in self._pieces(request):
                    await self._deliver(piece)
            except grpc.aio.AioRpcError as e:
                if e.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                    raise await explain(e, self.s.target) from None
            else:
                return
            # A retry's back-off, not a synchronisation: the server is restarting.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _pieces(self, request: pb.OutputRequest) -> AsyncIterator[OutputPiece]:
        # A RunJob is read once: after it, only StreamOutput (see RunningJob).
        running, self.running = self.running, None
        if running is None:
            return stream_output(self.s.channel, request)
        return running.pieces()


async def _follow(  # noqa: PLR0913 - the job, and how it is followed
    s: Session,
    job_id: str,
    io: Io,
    *,
    remove: bool,
    offset: int = 0,
    running: RunningJob | None = None,
) -> int:
    """Stream the job's output to ours until it ends; exit with its status.

    Ctrl+C, or our stdout closing (``| head``), detaches: the job keeps running and we exit
    130. With ``remove`` (--rm) it stops the job instead, drains its output to the end (its
    SIGTERM handler's last lines included), and exits 130 too: an interrupted run never
    looks like a success to ``&&``.
    """
    pump = _Pump(s, pb.OutputRequest(id=job_id, follow=True), io, stamps=False)
    pump.offset = offset
    pump.running = running
    interrupted = asyncio.Event()
    with io.interrupts_to(interrupted.set):
        pumping = asyncio.ensure_future(pump.run())
        done, (_, _, closed) = await first_done(
            asyncio.shield(pumping), interrupted.wait(), io.out_closed()
        )
    stdout_gone = closed in done or (
        pumping.done() and isinstance(pumping.exception(), BrokenPipeError)
    )
    if pumping.done() and not stdout_gone:
        pumping.result()
        final = (running and running.final) or await s.call(
            "WaitJob", pb.Job, pb.JobRequest(id=job_id), waits=True
        )
        return exit_status_of(final)
    if not remove:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError, BrokenPipeError, CliError):
            await pumping
        await io.say(f"detached; job {job_id} keeps running (jobctl logs -f {job_id[:12]})\n")
        return DETACHED
    if stdout_gone:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError, BrokenPipeError):
            await pumping
        pump.discard_stdout = True
        pumping = asyncio.ensure_future(pump.run())
    await io.say(f"stopping job {job_id}\n")
    try:
        await s.call("StopJob", pb.Job, pb.StopJobRequest(id=job_id), waits=True)
    except CliError:
        # It may have ended on its own meanwhile (then there is nothing to stop); if not,
        # the error stands.
        job = await s.call("GetJob", pb.Job, pb.JobRequest(id=job_id))
        if job.state in (pb.JOB_STATE_CREATED, pb.JOB_STATE_RUNNING):
            raise
    # The follow stream ends once the job has ended and all its output was sent.
    await pumping
    return DETACHED


class _Each:
    """Runs one action per job a command names, reports each failure on its own line,
    and remembers whether any failed (exit 1, as docker stop does)."""

    def __init__(self, io: Io) -> None:
        self.io = io
        self.failed = False

    async def __call__(self, refs: list[str], action: Callable[[str], Awaitable[str]]) -> list[str]:
        async def one(ref: str) -> str | None:
            try:
                return await action(ref)
            except CliError as e:
                self.failed = True
                await self.io.say(f"jobctl: {escape(ref)}: {escape(str(e))}\n")
                return None

        results = await asyncio.gather(*(one(ref) for ref in refs))
        return [r for r in results if r is not None]

    @property
    def status(self) -> int:
        return 1 if self.failed else 0


def _single_or_each(refs: list[str], ref: str, text: str) -> str:
    return f"{text}\n" if len(refs) == 1 else f"{escape(ref)}: {text}\n"


async def _dispatch(  # noqa: C901, PLR0911, PLR0912 - one branch per command, as argparse gives them
    args: argparse.Namespace, target: Target, io: Io, channel: grpc.aio.Channel | None
) -> int:

    shared = contextlib.nullcontext(Session(channel, target)) if channel is not None else None
    async with shared or session(target) as s:
        command = args.command
        if command in ("run", "start"):
            return await _run(s, args, io)
        if command == "status":
            ids = [await s.resolve(ref) for ref in args.jobs]
            jobs = [job_json(await s.call("GetJob", pb.Job, pb.JobRequest(id=i))) for i in ids]
            if args.json:
                await io.out(json_text(jobs[0] if len(jobs) == 1 else jobs).encode())
            else:
                await io.out("\n".join(status_text(job) for job in jobs).encode())
            return 0
        if command == "logs":
            return await _logs(s, args, io)
        each = _Each(io)
        if command == "stop":

            async def stop(ref: str) -> str:
                job_id = await s.resolve(ref)
                request = pb.StopJobRequest(id=job_id, grace_seconds=args.grace)
                await s.call("StopJob", pb.Job, request, waits=True)
                return f"{job_id}\n"

            await io.out("".join(await each(args.jobs, stop)).encode())
            return each.status
        if command == "kill":
            signum = parse_signal(args.signal)

            async def kill(ref: str) -> str:
                job_id = await s.resolve(ref)
                await s.call("SignalJob", pb.Job, pb.SignalJobRequest(id=job_id, signal=signum))
                return _single_or_each(args.jobs, ref, f"signal {signum} sent")

            await io.out("".join(await each(args.jobs, kill)).encode())
            return each.status
        if command == "ls":
            return await _ls(s, args, io)
        if command in ("rm", "prune"):
            return await _remove(s, args, io, each)
        if command == "wait":
            return await _wait(s, args, io)
        if command == "events":
            return await _events(s, args, io)
        if command == "top":
            return await top(s, args, io)
        if command == "attach":
            keys = parse_detach_keys(args.detach_keys)
            job_id = await s.resolve(args.job)
            return await attach(
                s, job_id, io, stdin=not args.no_stdin, from_start=False, detach_keys=keys
            )
        if command == "exec":
            return await exec_in(s, _exec_start(args, await s.resolve(args.job)), io)
        if command == "info":
            return await _info(s, args, io)
        if command == "__jobs":
            listed = await _listing(s, "", "")
            words = [j.id[:12] for j in listed] + [j.name for j in listed if j.name]
            await io.out("".join(f"{w}\n" for w in words).encode())
            return 0
    raise UsageError(f"unknown command {args.command}")


async def _run(s: Session, args: argparse.Namespace, io: Io) -> int:
    resume = getattr(args, "resume", None)
    if resume is not None:
        # The keeper that ran this went away mid-follow: on from where it had got.
        remove = getattr(args, "rm", False)
        status = await _follow(s, resume.job, io, remove=remove, offset=resume.offset)
        if remove:
            await s.call("RemoveJob", pb.Job, pb.JobRequest(id=resume.job))
        return status
    job, running = await _started(s, args)
    if job.state == pb.JOB_STATE_FAILED:
        if args.command == "start" and not args.follow:
            await io.out((json_text(job_json(job)) if args.json else f"{job.id}\n").encode())
        await io.say(f"jobctl: job {job.id} failed to start: {escape(job.error)}\n")
        return exit_status_of(job)  # 127 not found, 126 cannot be executed
    if args.command == "run" and (args.interactive or args.tty):
        status = await attach(
            s,
            job.id,
            io,
            stdin=args.interactive,
            from_start=True,
            remove=args.rm,
            detach_keys=parse_detach_keys(args.detach_keys) if args.tty else None,
        )
        if args.rm:
            await s.call("RemoveJob", pb.Job, pb.JobRequest(id=job.id))
        return status
    if args.command == "run" or args.follow:
        remove = getattr(args, "rm", False)
        status = await _follow(s, job.id, io, remove=remove, running=running)
        if remove:
            await s.call("RemoveJob", pb.Job, pb.JobRequest(id=job.id))
        return status
    await io.out((json_text(job_json(job)) if args.json else f"{job.id}\n").encode())
    return 0


async def _started(s: Session, args: argparse.Namespace) -> tuple[pb.Job, RunningJob | None]:
    """The job ``args`` starts, and the RunJob its output and end come on for a plain
    ``run`` (None for the rest, and from a server without RunJob: those take CreateJob).

    Raises:
        CliError: as :func:`_start_run`, or CreateJob failed.
    """
    if args.command == "run" and not (args.interactive or args.tty):
        running = await _start_run(s, job_spec(args))
        if running is not None:
            return running.job, running
    request = pb.CreateJobRequest(spec=job_spec(args), start=True)
    return await s.call("CreateJob", pb.Job, request), None


async def _start_run(s: Session, spec: pb.JobSpec) -> RunningJob | None:
    """``spec`` started with RunJob, its output and end to come on it (read by _Pump); None
    from a server without RunJob (then CreateJob).

    Raises:
        CliError: the job could not be created (what the server said), or the server did
            not answer in time.
    """
    try:
        return await start_run(s.channel, pb.RunJobRequest(spec=spec), timeout=s.target.timeout)
    except TimeoutError:
        raise no_answer(s.target) from None
    except grpc.aio.AioRpcError as e:
        raise await explain(e, s.target) from None
    except ValueError as e:
        raise CliError(str(e)) from None


async def _wait(s: Session, args: argparse.Namespace, io: Io) -> int:
    status = 0
    finals = []
    for ref in args.jobs:
        job_id = await s.resolve(ref)
        final = await s.call("WaitJob", pb.Job, pb.JobRequest(id=job_id), waits=True)
        status = exit_status_of(final)
        finals.append(job_json(final))
        if not args.json:
            await io.out(_single_or_each(args.jobs, ref, outcome(finals[-1])).encode())
    if args.json:
        await io.out(json_text(finals[0] if len(finals) == 1 else finals).encode())
    return status


async def _listing(s: Session, owner: str, selector: str) -> list[pb.Job]:
    request = pb.ListJobsRequest(owner=owner, selector=selector)
    return list((await s.call("ListJobs", pb.ListJobsResponse, request)).jobs)


def _check_selector(text: str | None) -> str:
    """Raises UsageError: the selector does not parse (said before asking the server)."""
    if not text:
        return ""
    try:
        parse_selector(text)
    except LabelError as e:
        raise UsageError(str(e)) from None
    return text


async def listed(s: Session, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The jobs `ls` shows, as JSON objects.

    Raises:
        UsageError: a malformed selector. CliError: the listing failed.
    """
    selector = _check_selector(args.selector)
    jobs = [job_json(j) for j in await _listing(s, args.owner or "", selector)]
    if args.state:
        return [j for j in jobs if j["state"] == args.state]
    if not args.all:
        return [j for j in jobs if j["state"] in ("created", "running")]
    return jobs


async def _ls(s: Session, args: argparse.Namespace, io: Io) -> int:
    jobs = await listed(s, args)
    if args.quiet:
        await io.out("".join(f"{j['id']}\n" for j in jobs).encode())
    else:
        await io.out((json_text(jobs) if args.json else table_text(jobs, io)).encode())
    return 0


async def _remove(s: Session, args: argparse.Namespace, io: Io, each: _Each) -> int:
    """rm JOB..., rm --selector S, prune [--older-than D] [--selector S]."""
    selector = _check_selector(args.selector)
    refs = list(getattr(args, "jobs", []))
    if args.command == "rm" and not refs and not selector:
        raise UsageError("name the jobs to delete, or give --selector")
    if args.command == "prune" or selector:
        horizon = None
        if getattr(args, "older_than", None) is not None:
            horizon = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=args.older_than)
        for job in map(job_json, await _listing(s, "", selector)):
            ended = job["ended_at"] or job["created_at"]
            if job["state"] in _FINAL_STATES and (
                horizon is None or dt.datetime.fromisoformat(ended) < horizon
            ):
                refs.append(job["id"])

    async def remove(ref: str) -> str:
        job_id = await s.resolve(ref)
        await s.call("RemoveJob", pb.Job, pb.JobRequest(id=job_id))
        return f"{job_id}\n"

    removed = await each(refs, remove)
    await io.out("".join(removed).encode())
    if args.command == "prune":
        await io.say(f"deleted {len(removed)} ended job{'s' if len(removed) != 1 else ''}\n")
    return each.status


def _when(text: str | None, what: str) -> int | None:
    """--since/--until: a duration ago (10m) or an RFC 3339 time, in ns since the epoch.

    Raises:
        UsageError: neither.
    """
    if text is None:
        return None
    try:
        return time.time_ns() - int(parse_duration(text, what) * 1e9)
    except UsageError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{what} {text!r} is neither a duration (10m) nor a time (2026-12-02T15:04:05Z)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without a zone is the user's local time
    return int(when.timestamp() * 1e9)


async def _logs(s: Session, args: argparse.Namespace, io: Io) -> int:
    since, until = _when(args.since, "--since"), _when(args.until, "--until")
    job_id = await s.resolve(args.job)
    selector = (
        pb.OUTPUT_SELECTOR_STDOUT
        if args.stdout
        else pb.OUTPUT_SELECTOR_STDERR
        if args.stderr
        else pb.OUTPUT_SELECTOR_BOTH
    )
    request = pb.OutputRequest(
        id=job_id,
        streams=selector,
        follow=args.follow,
        tail_lines=args.tail,
        since_unix_nano=since,
        until_unix_nano=until,
    )
    pump = _Pump(s, request, io, stamps=args.timestamps)
    resume = getattr(args, "resume", None)
    if resume is not None:
        pump.offset = resume.offset  # the keeper that ran this went away mid-follow
    await pump.run()
    return 0


async def _events(s: Session, args: argparse.Namespace, io: Io) -> int:
    request = pb.WatchJobsRequest(owner=args.owner or "", selector=_check_selector(args.selector))
    try:
        async for event in s.stub.WatchJobs(request):
            job = job_json(event.job)
            now = time.time_ns()
            if args.json:
                line = json_text({"time": rfc3339(now), "deleted": event.deleted, "job": job})
                await io.out(line.replace("\n", "").encode() + b"\n")
            else:
                await io.out(event_text(job, now, deleted=event.deleted).encode())
    except grpc.aio.AioRpcError as e:
        raise await explain(e, s.target) from None
    return 0


async def _info(s: Session, args: argparse.Namespace, io: Io) -> int:
    info = await s.call("GetServerInfo", pb.ServerInfo, pb.ServerInfoRequest())
    data = info_json(info, s.target.server)
    if args.json:
        await io.out(json_text(data).encode())
        return 0
    width = max(map(len, data))
    text = "".join(
        f"{key.replace('_', ' '):<{width}}  {_shown(value)}\n" for key, value in data.items()
    )
    await io.out(text.encode())
    return 0


def _shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return escape(",".join(f"{k}={v}" for k, v in sorted(value.items()))) or "-"
    if isinstance(value, list):
        return escape(",".join(map(str, value))) or "-"
    return escape(str(value))


# Commands that exit like `docker run`: 125 when jobctl itself failed.
_JOB_STATUS_COMMANDS = frozenset({"run", "wait"})


async def run_command(
    args: argparse.Namespace, target: Target, io: Io, channel: grpc.aio.Channel | None = None
) -> int:
    """Run one parsed command over ``channel`` (None: a connection of its own); errors
    become one line on ``io``'s stderr. Returns the exit status (0, 1 error, 2 usage,
    130 interrupted; for run and wait the job's, or 125 when jobctl failed)."""
    failed = JOBCTL_FAILED if args.command in _JOB_STATUS_COMMANDS else 1
    return await guarded(_dispatch(args, target, io, channel), io, failed=failed)


async def guarded(
    work: Awaitable[int], io: Io, *, failed: int = 1, interrupted: str = "interrupted"
) -> int:
    """``work``'s exit status, with Ctrl+C (or SIGTERM) cancelling it (130, saying
    ``interrupted``), and a UsageError (2) or CliError (``failed``) said in one line."""
    task = asyncio.ensure_future(work)
    stopped = False

    def interrupt() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    try:
        with io.interrupts_to(interrupt):
            return await task
    except asyncio.CancelledError:
        if not stopped:
            raise
        await io.say(f"jobctl: {interrupted}\n")
        return DETACHED
    except UsageError as e:
        await io.say(f"jobctl: {escape(str(e))}\n")
        return 2
    except CliError as e:
        await io.say(f"jobctl: {escape(str(e))}\n")
        return failed
    except BrokenPipeError:
        # The reader went away (jobctl logs JOB | head): not an error of ours.
        return 0


def run_in_process(args: argparse.Namespace, target: Target) -> int:
    """Run one parsed command in this process, on jobctl's own stdout and stderr; its exit
    status."""
    return run_here(lambda io: run_command(args, target, io))


def run_here(work: Callable[[Io], Awaitable[int]]) -> int:
    """``work`` on jobctl's own stdout and stderr, in an event loop of its own; its exit
    status. SIGTERM interrupts it as Ctrl+C does: whatever was changed (a terminal in raw
    mode) is put back on the way out."""
    keep_large_buffers()

    async def here() -> int:
        io = Io.here()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, io.interrupt)
        return await work(io)

    try:
        return asyncio.run(here())
    except KeyboardInterrupt:
        sys.stderr.write("jobctl: interrupted\n")
        return DETACHED
