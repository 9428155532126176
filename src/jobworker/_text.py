"""Showing text a client chose (argv, ids, names, error messages) to a person or a log."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["command_text", "escape"]


def escape(text: str) -> str:
    """``text`` with every character that is not printable (control characters, NUL, line
    breaks, terminal escape sequences) written as a Python escape, so a value a client
    chose can neither split a log record nor drive the terminal of whoever reads it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def command_text(argv: Iterable[str]) -> str:
    """argv for a person (jobctl's tables, the web console): joined by spaces, every
    control character escaped (an argv may carry terminal sequences meant for whoever lists
    it, an admin included)."""
    return " ".join(escape(arg) for arg in argv)
