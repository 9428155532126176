"""Where jobctl connects: flags, then environment, then the config file's context.

~/.config/jobworker/config.toml, like kubectl's contexts:

    current-context = "prod"

    [contexts.prod]
    server = "worker1.example:50051"
    ca = "~/.config/jobworker/prod/ca.pem"
    cert = "~/.config/jobworker/prod/alice.pem"
    key = "~/.config/jobworker/prod/alice.key"

and fleets, many servers addressed as one (`jobctl --fleet web ...`):

    [fleets.web]
    servers = ["web1.example:50051", "web2.example:50051"]
    srv = "_jobworker._tcp.web.example.internal"   # and/or DNS SRV records
    ca = "ca.pem"
    cert = "alice.pem"
    key = "alice.key"
    max-parallel = 10
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .._units import UsageError, parse_duration

__all__ = ["Fleet", "Target", "config_command", "config_path", "resolve_fleet", "resolve_target"]

DEFAULT_SERVER = "127.0.0.1:50051"
_TOP_KEYS = ("current-context", "contexts", "fleets")
_CONTEXT_KEYS = ("server", "ca", "cert", "key", "control-persist")
_FLEET_KEYS = (
    "servers",
    "srv",
    "resolver",
    "ca",
    "cert",
    "key",
    "max-parallel",
    "timeout",
    "connect-timeout",
)
# How long a fleet waits for each server to answer its first call (unreachable hosts must
# not hold the others up for the whole request timeout).
DEFAULT_CONNECT_TIMEOUT = 5.0


# A NamedTuple, not the frozen dataclass values are elsewhere: importing dataclasses (which
# imports inspect) costs 4 ms of every jobctl command, a tenth of one through the keeper.
class Fleet(NamedTuple):
    """Many servers addressed as one: listed, and/or found through DNS SRV records
    (``srv``, asked of ``resolver`` "HOST:PORT", None: the system's), reached as one
    identity. ``max_parallel`` and ``timeout`` are defaults for the rollout flags."""

    name: str
    servers: tuple[str, ...]
    srv: str | None
    resolver: str | None
    ca: Path
    cert: Path
    key: Path
    max_parallel: int | None = None
    timeout: float | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float = 30.0

    def target(self, server: str) -> Target:
        """One of its servers, as a single-server command connects to it."""
        return Target(server, self.ca, self.cert, self.key, self.request_timeout)


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
        loaded = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    _validate(loaded, path)
    return loaded


def _unknown(key: str, known: tuple[str, ...], where: str, path: Path) -> UsageError:
    import difflib  # noqa: PLC0415 - only for a config file with a mistake in it

    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    return UsageError(f"{path}: unknown key {key!r} in {where}{hint}")


def _validate(data: dict[str, Any], path: Path) -> None:
    """The file's keys and types, as the server checks its own (one line per mistake).

    Raises:
        UsageError: an unknown key (with the closest known one) or a value of the wrong type.
    """
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown(key, _TOP_KEYS, "the top level", path)
    if not isinstance(data.get("current-context", ""), str):
        raise UsageError(f'{path}: current-context must be a string, e.g. "prod"')
    contexts = data.get("contexts", {})
    if not isinstance(contexts, dict):
        raise UsageError(f"{path}: contexts must be tables, e.g. [contexts.prod]")
    _validate_fleets(data.get("fleets", {}), path)
    for name, ctx in contexts.items():
        if not isinstance(ctx, dict):
            raise UsageError(f"{path}: contexts.{name} must be a table ([contexts.{name}])")
        for key, value in ctx.items():
            if key not in _CONTEXT_KEYS:
                raise _unknown(key, _CONTEXT_KEYS, f"[contexts.{name}]", path)
            if not isinstance(value, str) and not (
                key == "control-persist" and isinstance(value, int | float)
            ):
                raise UsageError(
                    f"{path}: contexts.{name}.{key} must be a string, got {type(value).__name__}"
                )


def _is_duration(value: object) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


# A fleet key -> what its value must be, and how to say it.
_FLEET_VALUES: dict[str, tuple[Callable[[object], bool], str]] = {
    "servers": (
        lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
        'a list such as ["web1:50051"]',
    ),
    "max-parallel": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "a whole number above 0",
    ),
    "timeout": (_is_duration, 'a duration such as "5m"'),
    "connect-timeout": (_is_duration, 'a duration such as "5s"'),
}


def _validate_fleets(fleets: object, path: Path) -> None:
    """Raises UsageError: a fleet's table has an unknown key, a value of the wrong type, or
    no servers."""
    if not isinstance(fleets, dict):
        raise UsageError(f"{path}: fleets must be tables, e.g. [fleets.web]")
    for name, fleet in fleets.items():
        where = f"fleets.{name}"
        if not isinstance(fleet, dict):
            raise UsageError(f"{path}: {where} must be a table ([{where}])")
        for key, value in fleet.items():
            if key not in _FLEET_KEYS:
                raise _unknown(key, _FLEET_KEYS, f"[{where}]", path)
            ok, shape = _FLEET_VALUES.get(key, (lambda v: isinstance(v, str) and v, "a string"))
            if not ok(value):
                raise UsageError(f"{path}: {where}.{key} must be {shape}")
        if not fleet.get("servers") and not fleet.get("srv"):
            raise UsageError(
                f"{path}: [{where}] lists no servers: give servers = [...] or srv = ..."
            )


def resolve_fleet(
    name: str,
    *,
    ca: str | None,
    cert: str | None,
    key: str | None,
    timeout: float = 30.0,
) -> Fleet:
    """The fleet ``name`` of the config file; its certificate files from its own keys, else
    the flags and JOBWORKER_*. The resolver from JOBWORKER_DNS_RESOLVER, else its key.

    Raises:
        UsageError: no such fleet, a bad value, or no certificate configured anywhere.
    """
    path = config_path()
    fleets = _load(path).get("fleets", {})
    if name not in fleets:
        known = ", ".join(sorted(fleets)) or "none"
        raise UsageError(f"no fleet {name!r} in {path} (known: {known}); add [fleets.{name}]")
    fleet = fleets[name]

    def file(field: str, flag: str | None, env: str) -> Path:
        value = fleet.get(field)
        if value:
            return path.absolute().parent / os.path.expanduser(str(value))
        given = flag or os.environ.get(env)
        if not given:
            raise UsageError(
                f"fleet {name!r} has no {field}: add {field} = ... to [fleets.{name}] in {path}, "
                f"or pass --{field}"
            )
        return Path(os.path.expanduser(given)).absolute()

    def duration(field: str) -> float | None:
        value = fleet.get(field)
        if value is None:
            return None
        try:
            return parse_duration(str(value), f"fleets.{name}.{field}")
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None

    return Fleet(
        name=name,
        servers=tuple(fleet.get("servers", ())),
        srv=fleet.get("srv"),
        resolver=os.environ.get("JOBWORKER_DNS_RESOLVER") or fleet.get("resolver"),
        ca=file("ca", ca, "JOBWORKER_CA"),
        cert=file("cert", cert, "JOBWORKER_CERT"),
        key=file("key", key, "JOBWORKER_KEY"),
        max_parallel=fleet.get("max-parallel"),
        timeout=duration("timeout"),
        connect_timeout=duration("connect-timeout") or DEFAULT_CONNECT_TIMEOUT,
        request_timeout=timeout,
    )


def config_command(verb: str, name: str | None) -> str:
    """What `jobctl config VERB` prints: get-contexts, current-context, use-context NAME.

    Raises:
        UsageError: an unknown context, no current one, or the file cannot be written.
    """
    path = config_path()
    data = _load(path)
    contexts = data.get("contexts", {})
    current = os.environ.get("JOBWORKER_CONTEXT") or data.get("current-context")
    if verb == "get-contexts":
        rows = [("CURRENT", "NAME", "SERVER")] + [
            ("*" if n == current else "", n, str(c.get("server", DEFAULT_SERVER)))
            for n, c in sorted(contexts.items())
        ]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        return "".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}\n" for a, b, c in rows)
    if verb == "current-context":
        if not current:
            raise UsageError(f"no current context is set (jobctl config use-context NAME; {path})")
        return f"{current}\n"
    if name not in contexts:
        known = ", ".join(sorted(contexts)) or "none"
        raise UsageError(f"no context {name!r} in {path} (known: {known})")
    # tomlkit, not tomllib plus a writer: it keeps the user's comments and layout.
    import tomlkit  # noqa: PLC0415 - only this command writes the file

    document = tomlkit.parse(path.read_text())
    document["current-context"] = name
    try:
        path.write_text(tomlkit.dumps(document))
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    return f"switched to context {name!r}\n"


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
