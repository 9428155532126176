"""jobctl's command line: every command and flag. Light: parsing imports nothing heavy."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from .. import __version__
from .._units import UsageError, parse_duration, parse_size

__all__ = [
    "DESCRIPTION",
    "EPILOG",
    "GLOBAL_FLAGS",
    "SHELLS",
    "check_not_fleet_only",
    "keeper_takes_stdin",
    "names_target",
    "parse",
    "parser",
]

DESCRIPTION = "jobctl: run and manage jobs on a jobworker host, like docker or kubectl."

EPILOG = """\
exit status:
  0    success
  1    an error (the line on stderr says what to fix)
  2    bad usage (a wrong flag or value)
  run, wait and exec exit like docker run (exec: with its command's status):
  125  jobctl itself failed (connection, TLS, a refused request)
  126  the command could not be executed (permission, working directory, sandbox)
  127  the command was not found
  130  detached (Ctrl+C, or stdout closed) while the job keeps running
  N    the job's own exit code; 128+N when signal N killed it

Global flags may come before or after the command. A job is named by its id, a unique
prefix of its id (4 or more characters), or its name; when an id (or prefix) and a name
both match, the id wins."""

STATES = ("created", "running", "exited", "stopped", "failed")
# Flags every command takes, before or after it (as kubectl's): the name each sets.
# As docker's (cli/_attach.py parses it; kept here so parsing imports nothing more).
DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"
GLOBAL_FLAGS = (
    "server",
    "ca",
    "cert",
    "key",
    "context",
    "request_timeout",
    "fleet",
    "max_parallel",
    "max_failures",
)
# The shells `jobctl completion` writes a script for (_completion.py).
SHELLS = ("bash", "fish", "zsh")
# How long completing a job name may wait for the server: a shell's Tab must not hang.
COMPLETION_TIMEOUT_S = 2.0


def _whole(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least`` (a bad one is a usage
    error, exit 2)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if not least <= value < 1 << 31:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least {least}")
        return value

    convert.__name__ = "whole number"
    return convert


_positive_int = _whole(1)
_count = _whole(0)


def _positive_float(text: str) -> float:
    """argparse type: a number above 0, e.g. 0.5 (a bad one is a usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0, e.g. 0.5")
    return value


def _checked(parse: Callable[[str, str], object], what: str) -> Callable[[str], object]:
    """An argparse type from one of ``_units``' parsers (its error becomes a usage error)."""

    def convert(text: str) -> object:
        try:
            return parse(text, what)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = what
    return convert


_size = _checked(parse_size, "size")
_duration = _checked(parse_duration, "duration")


def _pair(text: str) -> str:
    """argparse type: KEY=VALUE with a non-empty KEY."""
    key, sep, _value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return text


def _env_item(text: str) -> str:
    """argparse type: NAME=VALUE, or NAME (its value taken from jobctl's environment)."""
    key = text.partition("=")[0]
    if not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE or NAME")
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2 with the usage of the (sub)command that was given."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _globals(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Below the command, SUPPRESS leaves a flag not given there to the top level's value.
    default = None if top else argparse.SUPPRESS
    group = p.add_argument_group("connection (before or after the command)")
    group.add_argument("--server", default=default, help="HOST:PORT (env JOBWORKER_SERVER)")
    group.add_argument("--ca", default=default, help="CA certificate file (env JOBWORKER_CA)")
    group.add_argument(
        "--cert", default=default, help="client certificate file (env JOBWORKER_CERT)"
    )
    group.add_argument("--key", default=default, help="client key file (env JOBWORKER_KEY)")
    group.add_argument(
        "--context", default=default, help="context in ~/.config/jobworker/config.toml"
    )
    fleet = p.add_argument_group("many servers (before or after the command)")
    fleet.add_argument(
        "--fleet",
        default=default,
        metavar="NAME",
        help="every server of [fleets.NAME] in the config file at once",
    )
    fleet.add_argument(
        "--max-parallel",
        type=_positive_int,
        default=default,
        metavar="N",
        help="with --fleet: at most N servers at a time",
    )
    fleet.add_argument(
        "--max-failures",
        type=_positive_int,
        default=default,
        metavar="N",
        help="with --fleet: after N servers failed, start no more (the rest: skipped)",
    )
    group.add_argument(
        "--request-timeout",
        type=_duration,
        default=30.0 if top else argparse.SUPPRESS,
        metavar="DURATION",
        help="for the server to answer (default 30s)",
    )


def _job_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="give the job a stdin that reads input (run: jobctl's own stdin; start: "
        "whatever jobctl attach sends)",
    )
    p.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="give the job a terminal (with -i: yours, in raw mode, as ssh -t)",
    )
    p.add_argument("--name", help="a name for the job, unique among yours (use it as an id)")
    p.add_argument(
        "--label",
        "-l",
        action="append",
        default=[],
        type=_pair,
        metavar="KEY=VALUE",
        help="a label (repeatable), in Kubernetes syntax",
    )
    p.add_argument(
        "--timeout",
        type=_duration,
        metavar="DURATION",
        help="stop the job once it has run this long, e.g. 90s or 2h (default: the server's)",
    )
    p.add_argument("--cpus", type=_positive_float, help="CPU quota, e.g. 0.5")
    p.add_argument("--memory", type=_size, help="memory limit, e.g. 256M")
    p.add_argument("--pids", type=_positive_int, help="maximum number of processes")
    p.add_argument(
        "--tmp-size",
        type=_size,
        help="private /tmp, /var/tmp, /dev/shm and /job together, e.g. 512M",
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
    _command_flags(p, workdir="absolute working directory (default: private /job)")
    p.add_argument("--network", choices=["none", "host"], default="none")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")


def _command_flags(p: argparse.ArgumentParser, *, workdir: str) -> None:
    """The flags `run`, `start` and `exec` share: environment and working directory."""
    p.add_argument(
        "--env",
        "-e",
        action="append",
        default=[],
        type=_env_item,
        metavar="NAME[=VALUE]",
        help="set a variable; NAME alone takes its value from jobctl's environment",
    )
    p.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="FILE",
        help="read NAME=VALUE lines from FILE ('#' starts a comment), as docker does",
    )
    p.add_argument("--workdir", "-w", default="", help=workdir)


def _exec(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB")
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="send jobctl's stdin to the command (EOF closes its stdin)",
    )
    p.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="give the command a terminal (with -i: yours, in raw mode, as ssh -t)",
    )
    _command_flags(p, workdir="absolute working directory (default: the job's)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")


def _output_window(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tail", "-n", type=_count, metavar="N", help="only the last N lines")
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only output since then: a duration ago (10m) or a time (2026-12-02T15:04:05Z)",
    )
    p.add_argument("--until", metavar="WHEN", help="only output before then (as --since)")


def parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one statement per flag
    p = _Parser(
        prog="jobctl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"jobctl {__version__}")
    _globals(p, top=True)
    # Before the command only: after it, -l is the command's own (a job's labels).
    p.add_argument(
        "-l",
        "--selector",
        dest="host_selector",
        default="",
        metavar="SELECTOR",
        help="with --fleet, before the command: only servers whose labels match, e.g. "
        "role=web,zone!=b",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        _globals(c, top=False)
        return c

    run = command("run", "run a job and stream its output; exit with its status")
    run.add_argument(
        "--detach-keys",
        default=DEFAULT_DETACH_KEYS,
        metavar="KEYS",
        help="under -it, the keys that detach (default ctrl-p,ctrl-q)",
    )
    run.add_argument(
        "--no-prefix", action="store_true", help="with --fleet: no server name before each line"
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="with --fleet: one JSON object per server (its job, output and result)",
    )
    run.add_argument(
        "--rm",
        action="store_true",
        help="delete the job once it has ended, and stop it on Ctrl+C instead of detaching",
    )
    _job_spec(run)
    start = command("start", "start a job and print its id")
    start.add_argument("-f", "--follow", action="store_true", help="stream output like run")
    start.add_argument("-q", "--quiet", action="store_true", help="print only the id")
    start.add_argument("--json", action="store_true")
    _job_spec(start)
    status = command("status", "show jobs' status")
    status.add_argument("jobs", nargs="+", metavar="JOB")
    status.add_argument("--json", action="store_true")
    logs = command("logs", "print a job's output")
    logs.add_argument("job", metavar="JOB")
    logs.add_argument("-f", "--follow", action="store_true")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only stdout")
    which.add_argument("--stderr", action="store_true", help="only stderr")
    logs.add_argument("--timestamps", "-t", action="store_true", help="a time before each line")
    _output_window(logs)
    stop = command("stop", "SIGTERM, wait the grace period, SIGKILL")
    stop.add_argument("jobs", nargs="+", metavar="JOB")
    stop.add_argument("--grace", type=_duration, help="e.g. 10s (default: the server's)")
    kill = command("kill", "send a signal (default KILL)")
    kill.add_argument("jobs", nargs="+", metavar="JOB")
    kill.add_argument("-s", "--signal", default="KILL")
    ls = command("ls", "list jobs")
    ls.add_argument("--all", "-a", action="store_true", help="include ended jobs")
    ls.add_argument("--owner", help="only this owner's jobs (admins)")
    ls.add_argument("--state", choices=STATES)
    ls.add_argument("--selector", "-l", metavar="SELECTOR", help="e.g. app=web,tier!=db")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only ids")
    ls.add_argument("--json", action="store_true")
    wait = command("wait", "wait for jobs to end; exit with the last one's status")
    wait.add_argument("jobs", nargs="+", metavar="JOB")
    wait.add_argument("--json", action="store_true", help="print each final status")
    rm = command("rm", "delete ended jobs and their output")
    rm.add_argument("jobs", nargs="*", metavar="JOB")
    rm.add_argument("--selector", "-l", metavar="SELECTOR", help="every ended job it matches")
    prune = command("prune", "delete ended jobs (all, or those ended before --older-than)")
    prune.add_argument("--older-than", type=_duration, metavar="DURATION", help="e.g. 2h")
    prune.add_argument("--selector", "-l", metavar="SELECTOR", help="only jobs it matches")
    attach = command("attach", "join a running job: its output, and your input (jobs started -i)")
    attach.add_argument("job", metavar="JOB")
    attach.add_argument(
        "--no-stdin", action="store_true", help="only watch: send no input, even to a -i job"
    )
    attach.add_argument(
        "--detach-keys",
        default=DEFAULT_DETACH_KEYS,
        metavar="KEYS",
        help="the keys that detach, leaving the job running (default ctrl-p,ctrl-q)",
    )
    _exec(
        command(
            "exec",
            "run a command inside a running job (its namespaces, files, limits and user), "
            "as docker exec; exit with its status",
        )
    )
    top = command("top", "a live table of running jobs' CPU, memory, IO and pids (docker stats)")
    top.add_argument("jobs", nargs="*", metavar="JOB", help="only these (default: all running)")
    top.add_argument("--no-stream", action="store_true", help="print one table and exit")
    top.add_argument("--json", action="store_true", help="the samples, as JSON")
    top.add_argument(
        "--interval", type=_duration, default=1.0, metavar="DURATION", help="between refreshes"
    )
    events = command("events", "stream changes to jobs as they happen")
    events.add_argument("--owner", help="only this owner's jobs (admins)")
    events.add_argument("--selector", "-l", metavar="SELECTOR")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    info = command("info", "show the server's version and who you are to it")
    info.add_argument("--json", action="store_true")
    config = command("config", "show or choose contexts in the client configuration")
    verbs = config.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    verbs.add_parser("get-contexts", help="list the contexts (* marks the current one)")
    verbs.add_parser("current-context", help="print the current context's name")
    use = verbs.add_parser("use-context", help="make a context the current one")
    use.add_argument("name", metavar="NAME")
    completion = command("completion", "print a shell completion script")
    completion.add_argument("shell", choices=SHELLS)
    # For completion scripts (not listed in the help): the ids and names of your jobs.
    _globals(sub.add_parser("__jobs"), top=False)
    return p


@functools.cache
def _built() -> argparse.ArgumentParser:
    # Built once per process: a connection keeper parses every command it is handed
    # (building takes 4-7 ms; parsing with a built one, well under 1).
    return parser()


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; a flag the command does not know is reported with that command's
    usage (exit 2), not the top level's."""
    p = _built()
    args, extra = p.parse_known_args(argv)
    if extra:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001 - argparse offers no public way to reach a subparser
        chosen = action.choices[args.command]
        chosen.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "__jobs":
        args.request_timeout = min(args.request_timeout, COMPLETION_TIMEOUT_S)
    return args


def check_not_fleet_only(args: argparse.Namespace) -> None:
    """Raises UsageError: a flag given that only means something with --fleet."""
    for flag, given in (
        ("-l/--selector before the command", getattr(args, "host_selector", "")),
        ("--max-parallel", getattr(args, "max_parallel", None)),
        ("--max-failures", getattr(args, "max_failures", None)),
        ("--no-prefix", getattr(args, "no_prefix", False)),
        ("run --json", getattr(args, "command", "") == "run" and getattr(args, "json", False)),
    ):
        if given:
            raise UsageError(
                f"{flag} works across a fleet only: add --fleet NAME (a fleet of the config file)"
            )


def names_target(args: argparse.Namespace) -> bool:
    """A flag names where to connect, or as whom (not the settings alone)."""
    return any(getattr(args, flag, None) for flag in ("server", "ca", "cert", "key", "context"))


def reads_stdin(args: argparse.Namespace) -> bool:
    """The command reads jobctl's own stdin."""
    command = getattr(args, "command", "")
    if command in ("run", "exec"):
        return bool(getattr(args, "interactive", False) or getattr(args, "tty", False))
    return command == "attach" and not getattr(args, "no_stdin", False)


def keeper_takes_stdin(args: argparse.Namespace, stdin_fd: int) -> bool:
    """Whether a connection keeper may run this command with ``stdin_fd`` for its input:
    it reads none, or copies it to the job as bytes (``run -i`` and ``exec -i`` without
    ``-t``) from something that is not a terminal. A terminal stays jobctl's own: raw
    mode, window sizes and its keystrokes after the command must not reach a keeper."""
    if not reads_stdin(args):
        return True
    return (
        stdin_fd >= 0
        and getattr(args, "command", "") in ("run", "exec")
        and not getattr(args, "tty", False)
        and not os.isatty(stdin_fd)
    )
