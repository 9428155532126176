"""jobctl: run and manage jobs on a jobworker host, like docker or kubectl.

Exit status: 0 success, 1 error, 2 usage; `run` and `wait` exit with the job's own status
(128+N if signal N killed it, 127 if it could not start).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from .._units import UsageError, parse_duration, parse_signal, parse_size
from ._completion import SCRIPTS

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


async def _follow(session: Any, job_id: str, *, detach_hint: bool, stop_on_interrupt: bool) -> int:
    """Stream the job's output to ours until it ends; the first Ctrl+C detaches (or stops)."""
    import asyncio  # noqa: PLC0415

    from ..api.client import pb, stream_output  # noqa: PLC0415
    from ._render import exit_status_of  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    out, err = sys.stdout.buffer, sys.stderr.buffer

    async def pump() -> None:
        request = pb.OutputRequest(id=job_id, follow=True)
        async for stream, data, _ts in stream_output(session.channel, request):
            target = err if stream == pb.STREAM_STDERR else out
            if stream == pb.STREAM_SYSTEM:
                target = err
            target.write(data)
            target.flush()

    pumping = asyncio.ensure_future(pump())
    waiting = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({pumping, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if pumping.done():
        waiting.cancel()
        pumping.result()
        final = await session.call("WaitJob", pb.JobRequest(id=job_id), waits=True)
        return exit_status_of(final)
    pumping.cancel()
    if stop_on_interrupt:
        sys.stderr.write(f"stopping job {job_id}\n")
        final = await session.call("StopJob", pb.StopJobRequest(id=job_id), waits=True)
        return exit_status_of(final)
    if detach_hint:
        sys.stderr.write(
            f"\ndetached from job {job_id}; it keeps running. Reattach with: "
            f"jobctl logs -f {job_id[:12]}\n"
        )
    return 0


async def _dispatch(args: argparse.Namespace, target: Target) -> int:  # noqa: C901, PLR0911, PLR0912
    from ..api.client import pb  # noqa: PLC0415
    from ._client import session  # noqa: PLC0415
    from ._render import exit_status_of, job_json, print_json, print_status  # noqa: PLC0415

    async with session(target) as s:
        if args.command in ("run", "start"):
            job = await s.call("CreateJob", pb.CreateJobRequest(spec=_spec(args), start=True))
            if job.state == pb.JOB_STATE_FAILED:
                sys.stderr.write(f"jobctl: job {job.id} failed to start: {job.error}\n")
                return exit_status_of(job)  # 127, like a shell's "command not found"
            if args.command == "run" or args.follow:
                remove = getattr(args, "rm", False)
                status = await _follow(s, job.id, detach_hint=True, stop_on_interrupt=remove)
                if remove:
                    await s.call("RemoveJob", pb.JobRequest(id=job.id))
                return status
            if args.json:
                print_json(job_json(job))
            else:
                sys.stdout.write(f"{job.id}\n")
            return 0
        if args.command == "status":
            ids = [await s.resolve(ref) for ref in args.jobs]
            jobs = [job_json(await s.call("GetJob", pb.JobRequest(id=i))) for i in ids]
            if args.json:
                print_json(jobs[0] if len(jobs) == 1 else jobs)
            else:
                for i, job in enumerate(jobs):
                    if i:
                        sys.stdout.write("\n")
                    print_status(job)
            return 0
        if args.command == "logs":
            return await _logs(s, args)
        if args.command == "stop":
            grace = parse_duration(args.grace, "--grace") if args.grace else None
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                request = pb.StopJobRequest(id=job_id, grace_seconds=grace)
                final = await s.call("StopJob", request, waits=True)
                sys.stdout.write(f"{final.id}\n")
            return 0
        if args.command == "kill":
            signum = parse_signal(args.signal)
            job_id = await s.resolve(args.job)
            await s.call("SignalJob", pb.SignalJobRequest(id=job_id, signal=signum))
            return 0
        if args.command == "ls":
            return await _ls(s, args)
        if args.command == "rm":
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                await s.call("RemoveJob", pb.JobRequest(id=job_id))
                sys.stdout.write(f"{job_id}\n")
            return 0
        if args.command == "wait":
            status = 0
            for ref in args.jobs:
                job_id = await s.resolve(ref)
                final = await s.call("WaitJob", pb.JobRequest(id=job_id), waits=True)
                status = exit_status_of(final)
            return status
    raise UsageError(f"unknown command {args.command}")


async def _ls(s: Any, args: argparse.Namespace) -> int:
    from ..api.client import pb  # noqa: PLC0415
    from ._render import job_json, print_json, print_table  # noqa: PLC0415

    reply = await s.call("ListJobs", pb.ListJobsRequest(owner=args.owner or ""))
    jobs = [job_json(j) for j in reply.jobs]
    if args.state:
        jobs = [j for j in jobs if j["state"] == args.state]
    elif not args.all:
        jobs = [j for j in jobs if j["state"] in ("created", "running")]
    if args.json:
        print_json(jobs)
    else:
        print_table(jobs)
    return 0


async def _logs(s: Any, args: argparse.Namespace) -> int:
    from ..api.client import pb, stream_output  # noqa: PLC0415

    job_id = await s.resolve(args.job)
    selector = (
        pb.OUTPUT_SELECTOR_STDOUT
        if args.stdout
        else pb.OUTPUT_SELECTOR_STDERR
        if args.stderr
        else pb.OUTPUT_SELECTOR_BOTH
    )
    request = pb.OutputRequest(id=job_id, streams=selector, follow=args.follow)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    import grpc  # noqa: PLC0415

    from ._client import explain  # noqa: PLC0415

    try:
        async for stream, data, ts in stream_output(s.channel, request):
            target = err if stream in (pb.STREAM_STDERR, pb.STREAM_SYSTEM) else out
            if args.timestamps:
                stamp = _rfc3339(ts)
                for line in bytes(data).splitlines(keepends=True):
                    target.write(stamp.encode() + b" " + line)
            else:
                target.write(data)
            target.flush()
    except grpc.aio.AioRpcError as e:
        raise explain(e, s.target) from None
    return 0


def _rfc3339(ns: int) -> str:
    import datetime as dt  # noqa: PLC0415

    when = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _fail(message: str, status: int) -> NoReturn:
    sys.stderr.write(f"jobctl: {message}\n")
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "completion":
        sys.stdout.write(SCRIPTS[args.shell])
        return
    import asyncio  # noqa: PLC0415

    from .._allocator import keep_large_buffers  # noqa: PLC0415
    from ._config import resolve_target  # noqa: PLC0415

    keep_large_buffers()

    try:
        target = resolve_target(
            server=args.server,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            context=args.context,
            timeout=parse_duration(args.timeout, "--timeout"),
        )
        status = asyncio.run(_dispatch(args, target))
    except UsageError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        # The reader went away (jobctl logs JOB | head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as e:
        from ._client import CliError  # noqa: PLC0415

        if isinstance(e, CliError):
            _fail(str(e), 1)
        raise
    sys.exit(status)


if __name__ == "__main__":
    main()
