"""jobctl's commands: what each does once its arguments are parsed, over one connection.

Loaded only after parsing (by ``__main__``, or by a connection keeper), so it imports gRPC and
asyncio at the top: ``jobctl --help`` never pays for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import grpc

from .._allocator import keep_large_buffers
from .._text import escape
from .._units import UsageError, parse_duration, parse_signal, parse_size
from ..api.client import pb, stream_output
from ._client import CliError, Session, explain, session
from ._config import Target
from ._io import Io
from ._render import exit_status_of, job_json, json_text, rfc3339, status_text, table_text

__all__ = ["run_command", "run_in_process"]


def _spec(args: argparse.Namespace) -> pb.JobSpec:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("give the command to run, e.g. jobctl run -- ls -l")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    return pb.JobSpec(
        argv=cmd,
        env=env,
        workdir=args.workdir,
        limits=_limits(args),
        host_network=args.network == "host",
        image=args.image or "",
        seccomp_unconfined=args.seccomp == "unconfined",
    )


def _limits(args: argparse.Namespace) -> pb.Limits:
    limits = pb.Limits()
    if args.cpus is not None:
        limits.cpus = args.cpus
    if args.memory is not None:
        limits.memory_bytes = parse_size(args.memory, "--memory")
    if args.pids is not None:
        limits.pids = args.pids
    if args.tmp_size is not None:
        limits.tmp_bytes = parse_size(args.tmp_size, "--tmp-size")
    for option, field in ((args.io_read_bps, "read_bps"), (args.io_write_bps, "write_bps")):
        for item in option:
            device, sep, rate = item.rpartition("=")
            io = limits.io.add(device=device if sep else "")
            setattr(io, field, parse_size(rate, f"IO rate in {item!r}"))
    return limits


async def _follow(
    session: Session, job_id: str, io: Io, *, detach_hint: bool, stop_on_interrupt: bool
) -> int:
    """Stream the job's output to ours until it ends; the first Ctrl+C detaches (or stops)."""

    interrupted = asyncio.Event()

    async def pump() -> None:
        request = pb.OutputRequest(id=job_id, follow=True)
        async for stream, data, _ts in stream_output(session.channel, request):
            await (io.out(data) if stream == pb.STREAM_STDOUT else io.err(data))

    pumping = asyncio.ensure_future(pump())
    waiting = asyncio.ensure_future(interrupted.wait())
    with io.interrupts_to(interrupted.set):
        try:
            await asyncio.wait({pumping, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, waiting):
                if not task.done():
                    task.cancel()
    if not waiting.done() or waiting.cancelled():
        pumping.result()
        final = await session.call("WaitJob", pb.Job, pb.JobRequest(id=job_id), waits=True)
        return exit_status_of(final)
    with contextlib.suppress(asyncio.CancelledError):
        await pumping
    if stop_on_interrupt:
        await io.say(f"stopping job {job_id}\n")
        final = await session.call("StopJob", pb.Job, pb.StopJobRequest(id=job_id), waits=True)
        return exit_status_of(final)
    if detach_hint:
        await io.say(
            f"\ndetached from job {job_id}; it keeps running. Reattach with: "
            f"jobctl logs -f {job_id[:12]}\n"
        )
    return 0


async def _dispatch(  # noqa: C901, PLR0911, PLR0912 - one branch per command, as argparse gives them
    args: argparse.Namespace, target: Target, io: Io, channel: grpc.aio.Channel | None
) -> int:

    shared = contextlib.nullcontext(Session(channel, target)) if channel is not None else None
    async with shared or session(target) as s:
        if args.command in ("run", "start"):
            job = await s.call(
                "CreateJob", pb.Job, pb.CreateJobRequest(spec=_spec(args), start=True)
            )
            if job.state == pb.JOB_STATE_FAILED:
                await io.say(f"jobctl: job {job.id} failed to start: {escape(job.error)}\n")
                return exit_status_of(job)  # 127, like a shell's "command not found"
            if args.command == "run" or args.follow:
                remove = getattr(args, "rm", False)
                status = await _follow(s, job.id, io, detach_hint=True, stop_on_interrupt=remove)
                if remove:
                    await s.call("RemoveJob", pb.Job, pb.JobRequest(id=job.id))
                return status
            await io.out((json_text(job_json(job)) if args.json else f"{job.id}\n").encode())
            return 0
        if args.command == "status":
            ids = [await s.resolve(ref) for ref in args.jobs]
            jobs = [job_json(await s.call("GetJob", pb.Job, pb.JobRequest(id=i))) for i in ids]
            if args.json:
                await io.out(json_text(jobs[0] if len(jobs) == 1 else jobs).encode())
            else:
                await io.out("\n".join(status_text(job) for job in jobs).encode())
            return 0
        if args.command == "logs":
            return await _logs(s, args, io)
        if args.command == "stop":
            grace = parse_duration(args.grace, "--grace") if args.grace else None
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                request = pb.StopJobRequest(id=job_id, grace_seconds=grace)
                final = await s.call("StopJob", pb.Job, request, waits=True)
                await io.out(f"{final.id}\n".encode())
            return 0
        if args.command == "kill":
            signum = parse_signal(args.signal)
            job_id = await s.resolve(args.job)
            await s.call("SignalJob", pb.Job, pb.SignalJobRequest(id=job_id, signal=signum))
            return 0
        if args.command == "ls":
            return await _ls(s, args, io)
        if args.command == "rm":
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                await s.call("RemoveJob", pb.Job, pb.JobRequest(id=job_id))
                await io.out(f"{job_id}\n".encode())
            return 0
        if args.command == "wait":
            status = 0
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                final = await s.call("WaitJob", pb.Job, pb.JobRequest(id=job_id), waits=True)
                status = exit_status_of(final)
            return status
    raise UsageError(f"unknown command {args.command}")


async def _ls(s: Session, args: argparse.Namespace, io: Io) -> int:

    reply = await s.call(
        "ListJobs", pb.ListJobsResponse, pb.ListJobsRequest(owner=args.owner or "")
    )
    jobs = [job_json(j) for j in reply.jobs]
    if args.state:
        jobs = [j for j in jobs if j["state"] == args.state]
    elif not args.all:
        jobs = [j for j in jobs if j["state"] in ("created", "running")]
    await io.out((json_text(jobs) if args.json else table_text(jobs, io)).encode())
    return 0


async def _logs(s: Session, args: argparse.Namespace, io: Io) -> int:

    job_id = await s.resolve(args.job)
    selector = (
        pb.OUTPUT_SELECTOR_STDOUT
        if args.stdout
        else pb.OUTPUT_SELECTOR_STDERR
        if args.stderr
        else pb.OUTPUT_SELECTOR_BOTH
    )
    request = pb.OutputRequest(id=job_id, streams=selector, follow=args.follow)
    try:
        async for stream, data, ts in stream_output(s.channel, request):
            text = bytes(data) if args.timestamps else data
            if args.timestamps:
                stamp = rfc3339(ts).encode() + b" "
                text = b"".join(stamp + line for line in bytes(data).splitlines(keepends=True))
            await (io.out(text) if stream == pb.STREAM_STDOUT else io.err(text))
    except grpc.aio.AioRpcError as e:
        raise await explain(e, s.target) from None
    return 0


async def run_command(
    args: argparse.Namespace, target: Target, io: Io, channel: grpc.aio.Channel | None = None
) -> int:
    """Run one parsed command over ``channel`` (None: a connection of its own); errors
    become one line on ``io``'s stderr. Returns the exit status (0, 1 error, 2 usage,
    130 interrupted, or the job's)."""

    task = asyncio.ensure_future(_dispatch(args, target, io, channel))
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    try:
        with io.interrupts_to(interrupt):
            return await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
        await io.say("jobctl: interrupted\n")
        return 130
    except UsageError as e:
        await io.say(f"jobctl: {escape(str(e))}\n")
        return 2
    except CliError as e:
        await io.say(f"jobctl: {escape(str(e))}\n")
        return 1
    except BrokenPipeError:
        # The reader went away (jobctl logs JOB | head): not an error of ours.
        return 0


async def _run_here(args: argparse.Namespace, target: Target) -> int:
    io = Io.here()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, io.interrupt)
    return await run_command(args, target, io)


def run_in_process(args: argparse.Namespace, target: Target) -> int:
    """Run one parsed command in this process, on jobctl's own stdout and stderr; its exit
    status."""
    keep_large_buffers()
    try:
        return asyncio.run(_run_here(args, target))
    except KeyboardInterrupt:
        sys.stderr.write("jobctl: interrupted\n")
        return 130
