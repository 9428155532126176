"""jobctl: run and manage jobs on a jobworker host, like docker or kubectl.

Exit status: 0 success, 1 error, 2 usage; `run` and `wait` exit with the job's own status
(128+N if signal N killed it, 127 if it could not start).

This module only parses: the command itself (``_commands``, with gRPC, asyncio and rich)
loads after parsing, in this process or in a connection keeper (``_keeper``), so
``jobctl --help`` costs about what the interpreter does (docs/benchmarks.md (l)).
"""

from __future__ import annotations

import sys
from typing import NoReturn

from .._units import UsageError, parse_duration
from ._completion import SCRIPTS
from ._parser import parser

__all__ = ["main"]


def _fail(message: str, status: int) -> NoReturn:
    sys.stderr.write(f"jobctl: {message}\n")
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "completion":
        sys.stdout.write(SCRIPTS[args.shell])
        return
    # What every command needs, loaded only once parsing is over: `jobctl --help` never
    # pays for it (measured: 41 -> 57 ms when these were imported first).
    from ._config import resolve_target  # noqa: PLC0415 - after parsing, by design
    from ._control import forward  # noqa: PLC0415 - after parsing, by design

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
        forwarded = forward(argv, target)
        if forwarded is not None:
            sys.exit(forwarded)
    # Parsed, and no keeper took it: now load what running a command takes.
    from ._commands import run_in_process  # noqa: PLC0415 - after parsing, by design (see above)

    sys.exit(run_in_process(args, target))


if __name__ == "__main__":
    main()
