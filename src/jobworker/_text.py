"""Showing text a client chose (argv, ids, names, error messages) to a person or a log."""

from __future__ import annotations

__all__ = ["escape"]


def escape(text: str) -> str:
    """``text`` with every character that is not printable (control characters, NUL, line
    breaks, terminal escape sequences) written as a Python escape, so a value a client
    chose can neither split a log record nor drive the terminal of whoever reads it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
