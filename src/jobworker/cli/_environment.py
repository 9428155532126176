"""A job's environment from ``-e`` and ``--env-file``, resolved where the user runs jobctl.

Resolved in the jobctl process itself, before a command may be handed to a connection
keeper: ``-e NAME`` takes NAME's value from the user's environment and ``--env-file`` names a
file relative to the user's directory, neither of which the keeper shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .._units import UsageError

__all__ = ["job_env"]

# An env file bigger than this is not a list of variables.
MAX_ENV_FILE = 1 << 20


def _read(path: str) -> str:
    """Raises UsageError: the file cannot be read, or is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENV_FILE + 1)
    except OSError as e:
        raise UsageError(f"--env-file {path}: {e.strerror}") from None
    if len(data) > MAX_ENV_FILE:
        raise UsageError(f"--env-file {path} is over 1 MiB; is it the right file?")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"--env-file {path} is not UTF-8 text") from None


def job_env(
    items: Sequence[str], files: Sequence[str], environ: Mapping[str, str]
) -> dict[str, str]:
    """The variables ``--env-file`` files and ``-e`` items set, later ones winning (files
    first, as docker reads them). In a file, each line is NAME=VALUE or NAME (from
    ``environ``, skipped if unset there); blank lines and lines starting with '#' are
    ignored; values are taken as they are, quotes included, as docker does.

    ``-e NAME`` with NAME unset in ``environ`` sets nothing, as in docker.

    Raises:
        UsageError: a file cannot be read, or one of its lines has no name.
    """
    env: dict[str, str] = {}
    for path in files:
        for number, raw in enumerate(_read(path).splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            if not name or name != name.strip() or " " in name:
                raise UsageError(
                    f"--env-file {path}, line {number}: {line[:40]!r} is not NAME=VALUE"
                )
            if sep:
                env[name] = value
            elif name in environ:
                env[name] = environ[name]
    for item in items:
        name, sep, value = item.partition("=")
        if sep:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env
