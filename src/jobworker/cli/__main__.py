"""jobctl: run and manage jobs on a jobworker host, like docker or kubectl.

Exit status: 0 success, 1 error, 2 usage; `run` and `wait` exit with the job's own status
(128+N if signal N killed it, 127 if it could not start).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from .._units import UsageError, parse_duration, parse_signal, parse_size
from ._completion import SCRIPTS
from ._io import Io

if TYPE_CHECKING:
    from ._config import Target

# asyncio (with ssl), tomllib, gRPC and rich load only once a command runs: `jobctl --help`
# then costs little more than the interpreter (docs/benchmarks.md (l)).

__all__ = ["main"]

STATES = ("created", "running", "exited", "stopped", "failed")


def _limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=float, help="CPU quota, e.g. 0.5")
    p.add_argument("--memory", help="memory limit, e.g. 256M")
    p.add_argument("--pids", type=int, help="maximum number of processes")
    p.add_argument("--io-read-bps", action="append", default=[], metavar="DEV=RATE")
    p.add_argument("--io-write-bps", action="append", default=[], metavar="DEV=RATE")
    p.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", "-w", default="/", help="absolute working directory")
    p.add_argument("--network", choices=["none", "host"], default="none")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobctl", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--server", help="HOST:PORT (env JOBWORKER_SERVER)")
    p.add_argument("--ca", help="CA certificate file (env JOBWORKER_CA)")
    p.add_argument("--cert", help="client certificate file (env JOBWORKER_CERT)")
    p.add_argument("--key", help="client key file (env JOBWORKER_KEY)")
    p.add_argument("--context", help="context in ~/.config/jobworker/config.toml")
    p.add_argument("--timeout", default="30s", help="for the server to answer (default 30s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a job and stream its output; exit with its status")
    run.add_argument(
        "--rm",
        action="store_true",
        help="delete the job once it has ended, and stop it on Ctrl+C instead of detaching",
    )
    _limits(run)
    start = sub.add_parser("start", help="start a job and print its id")
    start.add_argument("-f", "--follow", action="store_true", help="stream output like run")
    start.add_argument("-q", "--quiet", action="store_true", help="print only the id")
    start.add_argument("--json", action="store_true")
    _limits(start)
    status = sub.add_parser("status", help="show jobs' status")
    status.add_argument("jobs", nargs="+", metavar="JOB")
    status.add_argument("--json", action="store_true")
    logs = sub.add_parser("logs", help="print a job's output from the start")
    logs.add_argument("job", metavar="JOB")
    logs.add_argument("-f", "--follow", action="store_true")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only stdout")
    which.add_argument("--stderr", action="store_true", help="only stderr")
    logs.add_argument("--timestamps", "-t", action="store_true")
    stop = sub.add_parser("stop", help="SIGTERM, wait the grace period, SIGKILL")
    stop.add_argument("jobs", nargs="+", metavar="JOB")
    stop.add_argument("--grace", help="e.g. 10s (default: the server's)")
    kill = sub.add_parser("kill", help="send a signal (default KILL)")
    kill.add_argument("job", metavar="JOB")
    kill.add_argument("-s", "--signal", default="KILL")
    ls = sub.add_parser("ls", help="list jobs")
    ls.add_argument("--all", "-a", action="store_true", help="include ended jobs")
    ls.add_argument("--owner", help="only this owner's jobs (admins)")
    ls.add_argument("--state", choices=STATES)
    ls.add_argument("--json", action="store_true")
    wait = sub.add_parser("wait", help="wait for jobs to end; exit with the last one's status")
    wait.add_argument("jobs", nargs="+", metavar="JOB")
    rm = sub.add_parser("rm", help="delete ended jobs and their output")
    rm.add_argument("jobs", nargs="+", metavar="JOB")
    completion = sub.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=sorted(SCRIPTS))
    return p


def _spec(args: argparse.Namespace) -> Any:
    from ..api.client import pb  # noqa: PLC0415 - gRPC code loads only when a command needs it

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
    limits = pb.Limits()
    if args.cpus is not None:
        limits.cpus = args.cpus
    if args.memory is not None:
        limits.memory_bytes = parse_size(args.memory, "--memory")
    if args.pids is not None:
        limits.pids = args.pids
    for option, field in ((args.io_read_bps, "read_bps"), (args.io_write_bps, "write_bps")):
        for item in option:
            device, sep, rate = item.rpartition("=")
            io = limits.io.add(device=device if sep else "")
            setattr(io, field, parse_size(rate, f"IO rate in {item!r}"))
    return pb.JobSpec(
        argv=cmd,
        env=env,
        workdir=args.workdir,
        limits=limits,
        host_network=args.network == "host",
    )


async def _follow(
    session: Any, job_id: str, io: Io, *, detach_hint: bool, stop_on_interrupt: bool
) -> int:
    """Stream the job's output to ours until it ends; the first Ctrl+C detaches (or stops)."""
    import asyncio  # noqa: PLC0415

    from ..api.client import pb, stream_output  # noqa: PLC0415
    from ._render import exit_status_of  # noqa: PLC0415

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
        final = await session.call("WaitJob", pb.JobRequest(id=job_id), waits=True)
        return exit_status_of(final)
    with contextlib.suppress(asyncio.CancelledError):
        await pumping
    if stop_on_interrupt:
        await io.say(f"stopping job {job_id}\n")
        final = await session.call("StopJob", pb.StopJobRequest(id=job_id), waits=True)
        return exit_status_of(final)
    if detach_hint:
        await io.say(
            f"\ndetached from job {job_id}; it keeps running. Reattach with: "
            f"jobctl logs -f {job_id[:12]}\n"
        )
    return 0


async def _dispatch(  # noqa: C901, PLR0911, PLR0912
    args: argparse.Namespace, target: Target, io: Io, channel: Any
) -> int:
    from ..api.client import pb  # noqa: PLC0415
    from ._client import Session, session  # noqa: PLC0415
    from ._render import exit_status_of, job_json, json_text, status_text  # noqa: PLC0415

    shared = contextlib.nullcontext(Session(channel, target)) if channel is not None else None
    async with shared or session(target) as s:
        if args.command in ("run", "start"):
            job = await s.call("CreateJob", pb.CreateJobRequest(spec=_spec(args), start=True))
            if job.state == pb.JOB_STATE_FAILED:
                await io.say(f"jobctl: job {job.id} failed to start: {job.error}\n")
                return exit_status_of(job)  # 127, like a shell's "command not found"
            if args.command == "run" or args.follow:
                remove = getattr(args, "rm", False)
                status = await _follow(s, job.id, io, detach_hint=True, stop_on_interrupt=remove)
                if remove:
                    await s.call("RemoveJob", pb.JobRequest(id=job.id))
                return status
            await io.out((json_text(job_json(job)) if args.json else f"{job.id}\n").encode())
            return 0
        if args.command == "status":
            ids = [await s.resolve(ref) for ref in args.jobs]
            jobs = [job_json(await s.call("GetJob", pb.JobRequest(id=i))) for i in ids]
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
                final = await s.call("StopJob", request, waits=True)
                await io.out(f"{final.id}\n".encode())
            return 0
        if args.command == "kill":
            signum = parse_signal(args.signal)
            job_id = await s.resolve(args.job)
            await s.call("SignalJob", pb.SignalJobRequest(id=job_id, signal=signum))
            return 0
        if args.command == "ls":
            return await _ls(s, args, io)
        if args.command == "rm":
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                await s.call("RemoveJob", pb.JobRequest(id=job_id))
                await io.out(f"{job_id}\n".encode())
            return 0
        if args.command == "wait":
            status = 0
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                final = await s.call("WaitJob", pb.JobRequest(id=job_id), waits=True)
                status = exit_status_of(final)
            return status
    raise UsageError(f"unknown command {args.command}")


async def _ls(s: Any, args: argparse.Namespace, io: Io) -> int:
    from ..api.client import pb  # noqa: PLC0415
    from ._render import job_json, json_text, table_text  # noqa: PLC0415

    reply = await s.call("ListJobs", pb.ListJobsRequest(owner=args.owner or ""))
    jobs = [job_json(j) for j in reply.jobs]
    if args.state:
        jobs = [j for j in jobs if j["state"] == args.state]
    elif not args.all:
        jobs = [j for j in jobs if j["state"] in ("created", "running")]
    await io.out((json_text(jobs) if args.json else table_text(jobs, io)).encode())
    return 0


async def _logs(s: Any, args: argparse.Namespace, io: Io) -> int:
    import grpc  # noqa: PLC0415

    from ..api.client import pb, stream_output  # noqa: PLC0415
    from ._client import explain  # noqa: PLC0415

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
                stamp = _rfc3339(ts).encode() + b" "
                text = b"".join(stamp + line for line in bytes(data).splitlines(keepends=True))
            await (io.out(text) if stream == pb.STREAM_STDOUT else io.err(text))
    except grpc.aio.AioRpcError as e:
        raise explain(e, s.target) from None
    return 0


def _rfc3339(ns: int) -> str:
    import datetime as dt  # noqa: PLC0415

    when = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


async def run_command(args: argparse.Namespace, target: Target, io: Io, channel: Any = None) -> int:
    """Run one parsed command over ``channel`` (None: a connection of its own); errors
    become one line on ``io``'s stderr. Returns the exit status (0, 1 error, 2 usage,
    130 interrupted, or the job's)."""
    import asyncio  # noqa: PLC0415

    from ._client import CliError  # noqa: PLC0415

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
        await io.say(f"jobctl: {e}\n")
        return 2
    except CliError as e:
        await io.say(f"jobctl: {e}\n")
        return 1
    except BrokenPipeError:
        # The reader went away (jobctl logs JOB | head): not an error of ours.
        return 0


def _fail(message: str, status: int) -> NoReturn:
    sys.stderr.write(f"jobctl: {message}\n")
    sys.exit(status)


async def _run_here(args: argparse.Namespace, target: Target) -> int:
    import asyncio  # noqa: PLC0415

    io = Io.here()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, io.interrupt)
    return await run_command(args, target, io)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "completion":
        sys.stdout.write(SCRIPTS[args.shell])
        return
    from ._config import resolve_target  # noqa: PLC0415

    try:
        target = resolve_target(
            server=args.server,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            context=args.context,
            timeout=parse_duration(args.timeout, "--timeout"),
        )
    except UsageError as e:
        _fail(str(e), 2)
    if target.control_persist:
        from ._control import forward  # noqa: PLC0415

        forwarded = forward(argv, target)
        if forwarded is not None:
            sys.exit(forwarded)
    import asyncio  # noqa: PLC0415

    from .._allocator import keep_large_buffers  # noqa: PLC0415

    keep_large_buffers()
    try:
        status = asyncio.run(_run_here(args, target))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    sys.exit(status)


if __name__ == "__main__":
    main()
