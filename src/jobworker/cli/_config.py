"""Where jobctl connects: flags, then environment, then the config file's context.

~/.config/jobworker/config.toml, like kubectl's contexts:

    current-context = "prod"

    [contexts.prod]
    server = "worker1.example:50051"
    ca = "~/.config/jobworker/prod/ca.pem"
    cert = "~/.config/jobworker/prod/alice.pem"
    key = "~/.config/jobworker/prod/alice.key"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from .._units import UsageError, parse_duration

__all__ = ["Target", "config_path", "resolve_target"]

DEFAULT_SERVER = "127.0.0.1:50051"


# A NamedTuple, not the frozen dataclass values are elsewhere: importing dataclasses (which
# imports inspect) costs 4 ms of every jobctl command, a tenth of one through the keeper.
class Target(NamedTuple):
    """Where and as whom jobctl connects."""

    server: str
    ca: Path
    cert: Path
    key: Path
    timeout: float = 30.0
    # Seconds a connection keeper stays after its last command (see _control); 0: none.
    control_persist: float = 0.0


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "jobworker" / "config.toml"


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    import tomllib  # noqa: PLC0415 - only with a file: 2 ms of every command (measured)

    try:
        return tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e


def resolve_target(  # noqa: PLR0913 - one keyword per setting
    *,
    server: str | None,
    ca: str | None,
    cert: str | None,
    key: str | None,
    context: str | None,
    timeout: float = 30.0,
) -> Target:
    """Each setting from its flag, else JOBWORKER_*, else the context in the config file.

    Raises:
        UsageError: an unknown context, or no certificate configured anywhere.
    """
    path = config_path()
    data = _load(path)
    name = context or os.environ.get("JOBWORKER_CONTEXT") or data.get("current-context")
    ctx: dict[str, Any] = {}
    if name:
        contexts = data.get("contexts", {})
        if name not in contexts:
            known = ", ".join(sorted(contexts)) or "none"
            raise UsageError(f"no context {name!r} in {path} (known: {known})")
        ctx = contexts[name]

    def pick(flag: str | None, env: str, field: str) -> str | None:
        value = flag or os.environ.get(env) or ctx.get(field)
        return str(value) if value else None

    def file(flag: str | None, env: str, field: str) -> Path | None:
        # Absolute from here on, so the name means the same file to a connection keeper
        # (which runs in /). Relative names in the config file are relative to the file, as
        # in a kubeconfig; on the command line and in the environment, to the current dir.
        given = flag or os.environ.get(env)
        if given:
            return Path(os.path.expanduser(given)).absolute()
        value = ctx.get(field)
        return path.absolute().parent / os.path.expanduser(str(value)) if value else None

    chosen = {
        "ca": file(ca, "JOBWORKER_CA", "ca"),
        "cert": file(cert, "JOBWORKER_CERT", "cert"),
        "key": file(key, "JOBWORKER_KEY", "key"),
    }
    missing = [k for k, v in chosen.items() if v is None]
    if missing:
        raise UsageError(
            f"no {', '.join(missing)} configured: pass --{missing[0]}, set "
            f"JOBWORKER_{missing[0].upper()}, or add a context to {path}"
        )
    return Target(
        server=pick(server, "JOBWORKER_SERVER", "server") or DEFAULT_SERVER,
        ca=chosen["ca"] or Path(),
        cert=chosen["cert"] or Path(),
        key=chosen["key"] or Path(),
        timeout=timeout,
        control_persist=_persist(
            os.environ.get("JOBWORKER_CONTROL_PERSIST") or ctx.get("control-persist"), path
        ),
    )


def _persist(value: object, path: Path) -> float:
    if not value or value == "no":
        return 0.0
    try:
        return parse_duration(str(value), "control-persist")
    except UsageError as e:
        raise UsageError(f"{e} (JOBWORKER_CONTROL_PERSIST or control-persist in {path})") from None
