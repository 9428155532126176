"""jobctl: run and manage jobs on a jobworker host, like docker or kubectl.

Exit status: 0 success, 1 error, 2 usage; `run` and `wait` exit like `docker run`: the job's
own status (128+N if signal N killed it), 125 if jobctl failed, 126 if the command could not
be executed, 127 if it was not found, 130 when detached (the table is in `jobctl --help`).

This module first offers the argv, unparsed, to a connection keeper that took the same
settings before (``_quick``: builtin modules only). Failing that it parses: the command
itself (``_commands``, with gRPC and asyncio) loads after parsing, in this process or in a
keeper (``_keeper``), so ``jobctl --help`` costs about what the interpreter does
(docs/benchmarks.md (l)).
"""

from __future__ import annotations

import os
import sys

from ._quick import inputs, try_quick

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quick = try_quick(argv)
    if isinstance(quick, int):
        # The keeper wrote the output; this process wrote nothing but maybe one line to
        # stderr. Skipping the interpreter's teardown saves 2 ms a command (measured).
        sys.stderr.flush()
        os._exit(quick)
    # Parsing and the rest load only now (see the module's docstring).
    from .._units import UsageError  # noqa: PLC0415 - after the quick way, by design
    from ._parser import check_not_fleet_only, keeper_takes_stdin, names_target, parse  # noqa: PLC0415 - as above

    args = parse(argv)
    if args.command == "completion":
        from ._completion import script  # noqa: PLC0415 - builds from the parser, on demand

        sys.stdout.write(script(args.shell))
        return
    # What every command needs, loaded only once parsing is over: `jobctl --help` never
    # pays for it (measured: 41 -> 57 ms when these were imported first).
    from ._config import config_command, resolve_target  # noqa: PLC0415 - after parsing, by design
    from ._control import forward  # noqa: PLC0415 - after parsing, by design

    extra: dict[str, object] = {}
    try:
        if args.command == "config":
            sys.stdout.write(config_command(args.verb, getattr(args, "name", None)))
            return
        if args.command in ("run", "start", "exec"):
            from ._environment import job_env  # noqa: PLC0415 - only these commands set one

            args.job_env = extra["env"] = job_env(args.env, args.env_file, os.environ)
        if args.fleet:
            from ._config import resolve_fleet  # noqa: PLC0415 - only a fleet needs it

            fleet = resolve_fleet(
                args.fleet,
                ca=args.ca,
                cert=args.cert,
                key=args.key,
                timeout=args.request_timeout,
            )
            from ._fleet import run_fleet  # noqa: PLC0415 - after parsing, by design

            sys.exit(run_fleet(args, fleet))
        check_not_fleet_only(args)
        target = resolve_target(
            server=args.server,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            context=args.context,
            timeout=args.request_timeout,
        )
    except UsageError as e:
        sys.stderr.write(f"jobctl: {e}\n")
        sys.exit(2)
    # A command that reads jobctl's terminal runs here (see keeper_takes_stdin).
    if quick is None and target.control_persist and keeper_takes_stdin(args, 0):
        # The settings alone chose this target: later commands with the same may take the
        # quick way to this keeper.
        alias = None if names_target(args) else inputs()
        quick = forward(argv, target, extra, alias=alias)
        if isinstance(quick, int):
            sys.exit(quick)
    if quick is not None:
        # The keeper went away while following a job: follow on from here, from the
        # offset it had got to (nothing is shown twice).
        sys.stderr.write("jobctl: the connection keeper went away; following on\n")
        args.resume = quick
    # Parsed, and no keeper took it: now load what running a command takes.
    from ._commands import run_in_process  # noqa: PLC0415 - after parsing, by design (see above)

    sys.exit(run_in_process(args, target))


if __name__ == "__main__":
    main()
