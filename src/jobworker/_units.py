"""Parsing human units (jobctl flags, the server config): sizes, rates, durations, signals."""

from __future__ import annotations

import re
import signal

__all__ = ["UsageError", "parse_duration", "parse_signal", "parse_size"]

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class UsageError(Exception):
    """A bad command line; exit status 2 and a one-line message."""


def parse_size(text: str, what: str) -> int:
    """ "256M", "1G", "512k", "1048576" -> bytes (binary multiples, as docker does)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError(f"{what} {text!r} is not a size; use e.g. 256M, 1G or 1048576")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** _POWERS[unit.lower()])


def parse_duration(text: str, what: str) -> float:
    """ "10s", "1m", "500ms", "7d", "2.5" (seconds) -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise UsageError(f"{what} {text!r} is not a duration; use e.g. 10s, 500ms or 2m")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_signal(text: str) -> int:
    """ "TERM", "SIGTERM", "15" -> 15."""
    name = text.strip().upper()
    if name.isdigit():
        number = int(name)
        if number in {int(s) for s in signal.valid_signals()} and number > 0:
            return number
    else:
        member = signal.Signals.__members__.get(name if name.startswith("SIG") else f"SIG{name}")
        if member is not None:
            return int(member)
    raise UsageError(f"unknown signal {text!r}; use a name like TERM or KILL, or a number")
