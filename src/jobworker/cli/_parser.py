"""jobctl's command line: every command and flag. Light: parsing imports nothing heavy."""

from __future__ import annotations

import argparse

from ._completion import SCRIPTS

__all__ = ["DESCRIPTION", "parser"]

DESCRIPTION = "jobctl: run and manage jobs on a jobworker host, like docker or kubectl."

STATES = ("created", "running", "exited", "stopped", "failed")


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a bad one is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value < 1 << 31:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a number above 0, e.g. 0.5 (a bad one is a usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0, e.g. 0.5")
    return value


def _limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=_positive_float, help="CPU quota, e.g. 0.5")
    p.add_argument("--memory", help="memory limit, e.g. 256M")
    p.add_argument("--pids", type=_positive_int, help="maximum number of processes")
    p.add_argument(
        "--tmp-size", help="private /tmp, /var/tmp, /dev/shm and /job together, e.g. 512M"
    )
    p.add_argument("--image", help="one of the server's root filesystems (default: the host's)")
    p.add_argument(
        "--seccomp",
        choices=["default", "unconfined"],
        default="default",
        help="unconfined: no seccomp filter (only where the server's configuration allows)",
    )
    p.add_argument("--io-read-bps", action="append", default=[], metavar="DEV=RATE")
    p.add_argument("--io-write-bps", action="append", default=[], metavar="DEV=RATE")
    p.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--workdir", "-w", default="", help="absolute working directory (default: private /job)"
    )
    p.add_argument("--network", choices=["none", "host"], default="none")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobctl", description=DESCRIPTION)
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
