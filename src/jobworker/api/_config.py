"""jobworkerd's settings: the TOML configuration file, every key with its default and its
checks, and the command-line flags that override it.

One frozen dataclass per section (:class:`FileConfig`), each field carrying its parser,
default and doc line, is the single source: the loader walks it (:data:`SCHEMA` is its
view by table and key), ``jobworkerd --print-default-config`` prints it as a commented file,
and a test keeps docs/config.toml, the documented reference, equal to that output.
"""

from __future__ import annotations

import difflib
import os
import pwd
import socket
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from .._labels import LabelError, check_labels, check_name
from .._units import UsageError, parse_duration, parse_size
from ..runtime import Bind, InvalidSpecError, IOLimit, Limits, RunAs, RuntimeConfig
from ._auth import CertPool
from ._tls import TlsFiles, check_server_material

__all__ = [
    "DEFAULT_PATH",
    "FLAG_KEYS",
    "SCHEMA",
    "SECTIONS",
    "ConfigError",
    "FileConfig",
    "ServerConfig",
    "ServerIdentity",
    "ServiceLimits",
    "check_files",
    "default_config_text",
    "load_config",
    "split_address",
]

DEFAULT_PATH = Path("/etc/jobworker/config.toml")


class ConfigError(Exception):
    """The settings are unusable. ``problems`` holds one line per problem, each naming the
    key, what is wrong and what to write instead."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__("\n".join(f"{source}: {p}" for p in problems))
        self.source = source
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """Per-user caps; past them a call gets RESOURCE_EXHAUSTED."""

    max_active_jobs_per_user: int = 100
    max_streams_per_user: int = 64
    max_batch: int = 100


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """How the server describes itself to clients (GetServerInfo): its name and labels,
    which fleets select servers by."""

    name: str = field(default_factory=socket.gethostname)
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    tls: TlsFiles
    runtime: RuntimeConfig
    identity: ServerIdentity = field(default_factory=ServerIdentity)
    listen: tuple[str, ...] = ("127.0.0.1:50051",)
    pool: CertPool = field(default_factory=CertPool)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    max_message_bytes: int = 4 * 1024 * 1024
    shutdown_grace: float = 5.0
    log_format: str = "text"
    # HOST:PORT of the Prometheus endpoint; None: no endpoint.
    metrics_listen: str | None = None
    # HOST:PORT of the web console (HTTPS, the same TLS and authorization); None: off.
    web_listen: str | None = None
    handshake_timeout: float = 5.0
    max_connections: int = 1000


class _BadValueError(Exception):
    """One value is wrong; the message says how (the caller adds which key)."""


def split_address(address: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[::1]:PORT" -> (host, port).

    Raises:
        ValueError: not that shape, or the port is out of range.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT; write e.g. 127.0.0.1:50051 or [::1]:50051")
    return host.removeprefix("[").removesuffix("]"), int(port)


# ------------------------------------------------------------------ value parsers
# Each takes the TOML value and the directory relative paths are taken from.
Parse = Callable[[Any, Path], Any]


def _string(value: Any, _: Path) -> str:
    if not isinstance(value, str) or not value:
        raise _BadValueError(f"expected a non-empty string, got {value!r}")
    return value


def _path(value: Any, base: Path) -> Path:
    return base / _string(value, base)


def _optional_path(value: Any, base: Path) -> Path | None:
    return None if value == "" else _path(value, base)


def _address(value: Any, base: Path) -> str:
    text = _string(value, base)
    try:
        split_address(text)
    except ValueError as e:
        raise _BadValueError(str(e)) from None
    return text


def _optional_address(value: Any, base: Path) -> str | None:
    return None if value == "" else _address(value, base)


def _addresses(value: Any, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _BadValueError(
            f'expected a non-empty list such as ["127.0.0.1:50051"], got {value!r}'
        )
    return tuple(_address(v, base) for v in value)


def _server_name(value: Any, base: Path) -> str:
    text = _string(value, base)
    try:
        return check_name(text)
    except LabelError as e:
        raise _BadValueError(str(e).replace("name ", "server name ", 1)) from None


def _server_labels(value: Any, _: Path) -> dict[str, str]:
    """A table of labels ({ role = "web" }), or from flags a list of KEY=VALUE texts."""
    if isinstance(value, list):
        pairs = [str(v).partition("=") for v in value]
        bad = [k for k, sep, _v in pairs if not sep or not k]
        if bad:
            raise _BadValueError(f"{bad[0]!r} is not KEY=VALUE, e.g. role=web")
        value = {k: v for k, _sep, v in pairs}
    if not isinstance(value, dict):
        raise _BadValueError(f'expected a table such as {{ role = "web" }}, got {value!r}')
    try:
        return check_labels(value)
    except LabelError as e:
        raise _BadValueError(str(e)) from None


def _choice(*choices: str) -> Parse:
    def parse(value: Any, _: Path) -> str:
        if value not in choices:
            raise _BadValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return str(value)

    return parse


def _positive_int(value: Any, _: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _bool(value: Any, _: Path) -> bool:
    if not isinstance(value, bool):
        raise _BadValueError(f"expected true or false, got {value!r}")
    return value


def _size(value: Any, _: Path) -> int:
    """ "10G", "512M" or a number of bytes."""
    if isinstance(value, bool):
        raise _BadValueError(f"expected a size such as 512M or 10G, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise _BadValueError(f"expected a size of at least 0, got {value}")
        return value
    if not isinstance(value, str):
        raise _BadValueError(f"expected a size such as 512M or 10G, got {value!r}")
    try:
        return parse_size(value, "size")
    except UsageError as e:
        raise _BadValueError(str(e)) from None


def _duration(value: Any, _: Path) -> float:
    """ "7d", "12h", "5s" or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if not isinstance(value, str):
        raise _BadValueError(f"expected a duration such as 5s, 12h or 7d, got {value!r}")
    try:
        return parse_duration(value, "duration")
    except UsageError as e:
        raise _BadValueError(str(e)) from None


def _names(value: Any, _: Path) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _BadValueError(f'expected a list of user names such as ["alice"], got {value!r}')
    return frozenset(value)


def _user(value: Any, _: Path) -> RunAs:
    """A local user name, or "UID:GID"."""
    if not isinstance(value, str) or not value:
        raise _BadValueError(f'expected a local user name or "UID:GID", got {value!r}')
    uid, sep, gid = value.partition(":")
    if sep:
        if not (uid.isdigit() and gid.isdigit()):
            raise _BadValueError(f'{value!r} is not "UID:GID"; write e.g. "1001:1001"')
        return RunAs(int(uid), int(gid))
    try:
        entry = pwd.getpwnam(value)
    except KeyError:
        raise _BadValueError(
            f'there is no local user {value!r}; create it or write "UID:GID"'
        ) from None
    return RunAs(entry.pw_uid, entry.pw_gid)


def _optional_user(value: Any, base: Path) -> RunAs | None:
    return None if value == "" else _user(value, base)


def _uid_range(value: Any, _: Path) -> tuple[int, int]:
    first, sep, last = str(value).partition("-")
    if not (isinstance(value, str) and sep and first.isdigit() and last.isdigit()):
        raise _BadValueError(f'expected a range such as "1900000000-1900065535", got {value!r}')
    return int(first), int(last)


def _binds(value: Any, _: Path) -> Mapping[str, tuple[Bind, ...]]:
    shape = 'a table such as { "*" = ["/srv/data:ro"], alice = ["/srv/alice:rw"] }'
    if not isinstance(value, dict):
        raise _BadValueError(f"expected {shape}, got {value!r}")
    out: dict[str, tuple[Bind, ...]] = {}
    for owner, paths in value.items():
        if not isinstance(paths, list):
            raise _BadValueError(f"owner {owner!r}: expected a list of PATH:ro or PATH:rw")
        binds = []
        for item in paths:
            path, sep, mode = str(item).rpartition(":")
            if not isinstance(item, str) or not sep or mode not in ("ro", "rw"):
                raise _BadValueError(f"owner {owner!r}: {item!r} is not PATH:ro or PATH:rw")
            if not path.startswith("/") or path == "/":
                raise _BadValueError(f"owner {owner!r}: {path!r} must be an absolute path, not /")
            binds.append(Bind(os.path.normpath(path), mode == "rw"))
        out[owner] = tuple(binds)
    return types.MappingProxyType(out)


def _images(value: Any, _: Path) -> Mapping[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.startswith("/") for k, v in value.items()
    ):
        raise _BadValueError(f'expected a table of name = "/absolute/dir", got {value!r}')
    return types.MappingProxyType(dict(value))


def _paths(value: Any, _: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.startswith("/") for v in value
    ):
        raise _BadValueError(f'expected a list of absolute paths such as ["/srv"], got {value!r}')
    return tuple(value)


def _owners(value: Any, base: Path) -> Mapping[str, RunAs]:
    if not isinstance(value, dict):
        raise _BadValueError(f'expected a table of owner = "local user", got {value!r}')
    out = {}
    for owner, user in value.items():
        try:
            out[owner] = _user(user, base)
        except _BadValueError as e:
            raise _BadValueError(f"owner {owner!r}: {e}") from None
    return types.MappingProxyType(out)


_IO_KEYS = {"device": _string, "read_bps": _size, "write_bps": _size}
_IO_COUNTS = ("read_iops", "write_iops")


def _io(value: Any, base: Path) -> tuple[IOLimit, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _BadValueError(
            f'expected a list of tables such as [{{device = "8:0", read_bps = "50M"}}], '
            f"got {value!r}"
        )
    limits = []
    for entry in value:
        unknown = set(entry) - set(_IO_KEYS) - set(_IO_COUNTS)
        if unknown:
            raise _BadValueError(
                f"unknown key {min(unknown)!r} in an io entry; use "
                f"{', '.join([*_IO_KEYS, *_IO_COUNTS])}"
            )
        fields: dict[str, Any] = {
            k: _IO_KEYS[k](v, base) for k, v in entry.items() if k in _IO_KEYS
        }
        fields.update({k: _positive_int(v, base) for k, v in entry.items() if k in _IO_COUNTS})
        try:
            limits.append(IOLimit(**fields))
        except InvalidSpecError as e:
            raise _BadValueError(str(e)) from None
    return tuple(limits)


def _dir_name(value: Any, base: Path) -> str:
    text = _string(value, base)
    if "/" in text or text in {".", ".."}:
        raise _BadValueError(f'expected a single directory name such as "jobworker", got {value!r}')
    return text


def _optional_cgroup(value: Any, base: Path) -> str | None:
    if value == "":
        return None
    text = _string(value, base)
    if not text.startswith("/"):
        raise _BadValueError(
            f'expected a path in the cgroup2 mount such as "/jobs.slice", got {value!r}'
        )
    return text


def _cpus(value: Any, _: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _BadValueError(f"expected a positive number of CPUs such as 0.5 or 2, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: how to read it, its default (TOML text; "" = unset), what it does, and
    for one unset by default, an example (TOML text)."""

    parse: Parse
    default: str
    doc: str
    example: str = ""


def _setting(parse: Parse, default: str, doc: str, example: str = "") -> Any:
    """A field of a section dataclass: its parser, its default (TOML text, parsed here) and
    its doc line, from which the loader, ``--print-default-config`` and docs/config.toml
    all come. Returns what ``dataclasses.field`` returns (typed Any by the stdlib, so the
    field keeps the type its annotation declares)."""
    value = parse(tomllib.loads(f"v = {default}")["v"], Path("/")) if default else None
    return field(default_factory=lambda: value, metadata={"key": Key(parse, default, doc, example)})


_CPUS = "CPUs (a fraction is a share of one CPU's time)"
_MEMORY = "memory; past it the job is OOM-killed"
_PIDS = "processes and threads"
_TMP = "private /tmp, /var/tmp, /dev/shm, /run/lock and /job together (counted as memory)"
_FOR_DEFAULT = ", for jobs that do not ask"
_FOR_MAX = ": the most a job may ask"


@dataclass(frozen=True, slots=True)
class ServerSection:
    name: str | None = _setting(
        _server_name,
        "",
        "how the server names itself to clients and fleets (unset: the host name)",
        '"web-1"',
    )
    labels: dict[str, str] | None = _setting(
        _server_labels,
        "",
        "labels fleets select servers by (jobctl --fleet NAME -l role=web), Kubernetes syntax",
        '{ role = "web", zone = "a" }',
    )
    listen: tuple[str, ...] = _setting(
        _addresses, '["127.0.0.1:50051"]', "gRPC addresses, HOST:PORT"
    )
    state_dir: Path = _setting(_path, '"/var/lib/jobworker"', "jobs' records and output")
    log_format: str = _setting(
        _choice("text", "json"), '"text"', 'stderr log lines: "text" or "json"'
    )
    max_message_size: int = _setting(_size, '"4M"', "largest gRPC message either way")
    shutdown_grace: float = _setting(
        _duration, '"5s"', "on SIGTERM, how long open calls get before they are cut"
    )
    handshake_timeout: float = _setting(
        _duration,
        '"5s"',
        "a connection that has not finished its TLS handshake by then is closed",
    )
    max_connections: int = _setting(
        _positive_int,
        "1000",
        "open connections at most (keep it below the fd limit, LimitNOFILE)",
    )


@dataclass(frozen=True, slots=True)
class TlsSection:
    ca: Path | None = _setting(
        _path, "", "CA certificate that signs clients (required, or --ca)", '"ca.pem"'
    )
    cert: Path | None = _setting(
        _path, "", "the server's certificate (required, or --cert)", '"server.pem"'
    )
    key: Path | None = _setting(
        _path, "", "the server's private key (required, or --key)", '"server.key"'
    )
    client_allowlist: Path | None = _setting(
        _optional_path,
        "",
        "client-certificate SHA-256 fingerprints admitted, one per line; unset: any",
        '"allowed.txt"',
    )
    client_revoked: Path | None = _setting(
        _optional_path,
        "",
        "client-certificate SHA-256 fingerprints refused, one per line (SIGHUP reloads)",
        '"revoked.txt"',
    )


@dataclass(frozen=True, slots=True)
class DefaultLimitsSection:
    cpus: float | None = _setting(
        _cpus, "", _CPUS + _FOR_DEFAULT + " (unset: half the host's, at least 1)", "0.5"
    )
    memory: int | None = _setting(
        _size, "", _MEMORY + _FOR_DEFAULT + " (unset: a quarter of the host's)", '"512M"'
    )
    pids: int | None = _setting(_positive_int, "", _PIDS + _FOR_DEFAULT + " (unset: 1024)", "256")
    tmp_size: int | None = _setting(_size, "", _TMP + _FOR_DEFAULT + " (unset: 256M)", '"512M"')
    cpu_weight: int | None = _setting(
        _positive_int, "", "CPU share against other jobs, 1-10000 (100: even)", "100"
    )
    io: tuple[IOLimit, ...] | None = _setting(
        _io,
        "",
        "disk bandwidth per device (MAJ:MIN, see lsblk), for jobs that do not ask",
        '[{ device = "8:0", read_bps = "50M", write_bps = "20M" }]',
    )
    timeout: float | None = _setting(
        _duration,
        "",
        "stop a job that asks for no timeout once it has run this long (unset: never)",
        '"12h"',
    )

    def limits(self) -> Limits:
        """Raises InvalidSpecError: a value is out of range."""
        return Limits(
            cpus=self.cpus,
            cpu_weight=self.cpu_weight,
            memory_bytes=self.memory,
            pids=self.pids,
            io=self.io or (),
            tmp_bytes=self.tmp_size,
        )


@dataclass(frozen=True, slots=True)
class MaxLimitsSection:
    cpus: float | None = _setting(_cpus, "", _CPUS + _FOR_MAX + " (unset: the host's)", "2")
    memory: int | None = _setting(_size, "", _MEMORY + _FOR_MAX + " (unset: the host's)", '"8G"')
    pids: int | None = _setting(_positive_int, "", _PIDS + _FOR_MAX + " (unset: 32768)", "4096")
    tmp_size: int | None = _setting(
        _size, "", _TMP + _FOR_MAX + " (unset: the host's memory)", '"4G"'
    )
    timeout: float | None = _setting(
        _duration, "", "the longest timeout a job may ask for (unset: no maximum)", '"7d"'
    )

    def limits(self) -> Limits:
        """Raises InvalidSpecError: a value is out of range."""
        return Limits(
            cpus=self.cpus, memory_bytes=self.memory, pids=self.pids, tmp_bytes=self.tmp_size
        )


@dataclass(frozen=True, slots=True)
class QuotasSection:
    max_jobs_per_user: int = _setting(_positive_int, "100", "created or running jobs per user")
    max_streams_per_user: int = _setting(
        _positive_int, "64", "open output and watch streams per user"
    )
    max_output_per_job: int = _setting(
        _size, '"1G"', 'output kept per job; past it: an "output truncated" note'
    )
    output_read_buffer: int = _setting(
        _size,
        '"128M"',
        "memory all output streams together read into at once (each its share, 64K to 4M)",
    )


@dataclass(frozen=True, slots=True)
class RetentionSection:
    max_age: float = _setting(_duration, '"7d"', "delete ended jobs this long after they ended")
    max_size: int = _setting(
        _size,
        '"10G"',
        "all jobs' output together; past it, the oldest ended job of the owner who takes the "
        "most goes first",
    )
    max_size_per_owner: int | None = _setting(
        _size, "", "one owner's jobs' output; past it, that owner's oldest ended jobs go", '"2G"'
    )


@dataclass(frozen=True, slots=True)
class RunAsSection:
    default: RunAs | None = _setting(
        _optional_user,
        "",
        'one local user for every job: a name or "UID:GID"; unset: a uid of its own per job',
        '"nobody"',
    )
    allow_root: bool = _setting(_bool, "false", "allow uid or gid 0 above")
    owners: Mapping[str, RunAs] = _setting(
        _owners, "{}", 'per job owner (client CN): { alice = "alice", ci = "1001:1001" }'
    )


@dataclass(frozen=True, slots=True)
class NetworkSection:
    host_network_users: frozenset[str] = _setting(
        _names, "[]", "owners who may run jobs in the host's network (others: only lo)"
    )


@dataclass(frozen=True, slots=True)
class CgroupsSection:
    enabled: bool = _setting(
        _bool, "true", "one cgroup per job with its limits; false: limits are not enforced"
    )
    subtree: str = _setting(
        _dir_name,
        '"jobworker"',
        "directory beneath the server's own cgroup that holds the jobs' cgroups",
    )
    parent: str | None = _setting(
        _optional_cgroup,
        "",
        "cgroup v2 only: the cgroup (path in the cgroup2 mount) to use instead of our own",
        '"/jobworker.slice"',
    )


@dataclass(frozen=True, slots=True)
class SandboxSection:
    enabled: bool = _setting(
        _bool,
        "true",
        "read-only host, private /tmp, /dev, /proc, no capabilities, seccomp (needs namespaces)",
    )
    uid_range: tuple[int, int] = _setting(
        _uid_range,
        '"1900000000-1900065535"',
        "uids (and gids) given to jobs, one per job; must hold no user of /etc/passwd",
    )
    paths: Mapping[str, tuple[Bind, ...]] = _setting(
        _binds,
        "{}",
        "host paths shown to an owner's jobs (\"*\": everyone's), PATH:ro or PATH:rw",
    )
    hide: tuple[str, ...] = _setting(
        _paths, "[]", "host paths shown empty (the state, config and TLS dirs always are)"
    )
    seccomp_optional: frozenset[str] = _setting(
        _names, "[]", "owners who may run jobs without the seccomp filter (--seccomp unconfined)"
    )


@dataclass(frozen=True, slots=True)
class ImagesSection:
    roots: Mapping[str, str] | None = _setting(
        _images,
        "",
        "root filesystems jobs may pick (--image NAME): name = directory of an unpacked distro",
        '{ alpine = "/var/lib/jobworker/images/alpine" }',
    )


@dataclass(frozen=True, slots=True)
class NamespacesSection:
    enabled: bool = _setting(
        _bool,
        "true",
        "mount, UTS, IPC, network and cgroup namespaces per job (the PID one always)",
    )


@dataclass(frozen=True, slots=True)
class MetricsSection:
    listen: str | None = _setting(
        _optional_address,
        "",
        "Prometheus endpoint HOST:PORT (plain HTTP: keep it on loopback); unset: off",
        '"127.0.0.1:9464"',
    )


@dataclass(frozen=True, slots=True)
class UsageSection:
    interval: float = _setting(
        _duration,
        '"1s"',
        "how often every running job's CPU, memory, IO and pids are sampled for its usage "
        "history (GetUsage, jobctl top); 0: never",
    )


@dataclass(frozen=True, slots=True)
class WebSection:
    listen: str | None = _setting(
        _optional_address,
        "",
        "the web console's HOST:PORT: HTTPS with the same TLS 1.3 certificates, client "
        "certificates and authorization as the gRPC API; unset: off",
        '"127.0.0.1:8443"',
    )


@dataclass(frozen=True, slots=True)
class FileConfig:
    """The configuration file, one typed section per table."""

    server: ServerSection = field(default_factory=ServerSection)
    tls: TlsSection = field(default_factory=TlsSection)
    limits_default: DefaultLimitsSection = field(default_factory=DefaultLimitsSection)
    limits_max: MaxLimitsSection = field(default_factory=MaxLimitsSection)
    quotas: QuotasSection = field(default_factory=QuotasSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    run_as: RunAsSection = field(default_factory=RunAsSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    cgroups: CgroupsSection = field(default_factory=CgroupsSection)
    namespaces: NamespacesSection = field(default_factory=NamespacesSection)
    sandbox: SandboxSection = field(default_factory=SandboxSection)
    images: ImagesSection = field(default_factory=ImagesSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    usage: UsageSection = field(default_factory=UsageSection)
    web: WebSection = field(default_factory=WebSection)


def _table(name: str) -> str:
    """A FileConfig field's TOML table: limits_default -> limits.default."""
    return name.replace("limits_", "limits.")


_HINTS = get_type_hints(FileConfig)
# Table -> its section class, in file order.
SECTIONS: dict[str, type[Any]] = {_table(f.name): _HINTS[f.name] for f in fields(FileConfig)}
# Table -> key -> how it is read and documented: what the loader walks and the reference
# file shows.
SCHEMA: dict[str, dict[str, Key]] = {
    table: {f.name: f.metadata["key"] for f in fields(cls)} for table, cls in SECTIONS.items()
}

# Command-line flag -> the key it overrides.
FLAG_KEYS = {
    "name": "server.name",
    "label": "server.labels",
    "listen": "server.listen",
    "state_dir": "server.state_dir",
    "log_format": "server.log_format",
    "ca": "tls.ca",
    "cert": "tls.cert",
    "key": "tls.key",
    "metrics_listen": "metrics.listen",
    "web_listen": "web.listen",
}


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


_FREE_TABLE = "images"


def _walk(data: Mapping[str, Any], base: Path) -> tuple[dict[str, Any], list[str]]:
    """Dotted key -> parsed value for each key present, and a line per problem."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    sections = list(SCHEMA)
    tops = sorted({s.split(".")[0] for s in sections})
    for top, table in data.items():
        if top not in tops:
            problems.append(
                f"unknown section [{top}]; {_suggest(top, tops)}known sections: {', '.join(tops)}"
            )
            continue
        if not isinstance(table, dict):
            problems.append(f"{top} must be a table ([{top}]), not a value")
            continue
        if top == _FREE_TABLE:
            # [images] is name = directory, any names: the whole table is its one value.
            try:
                values[f"{top}.roots"] = _images(table, base)
            except _BadValueError as e:
                problems.append(f"[{top}]: {e}")
            continue
        # [limits] holds only the [limits.default] and [limits.max] tables.
        subtables = [s.split(".", 1)[1] for s in sections if s.startswith(f"{top}.")]
        if subtables:
            for sub, inner in table.items():
                if sub not in subtables:
                    problems.append(
                        f"unknown section [{top}.{sub}]; use "
                        f"{' or '.join(f'[{top}.{s}]' for s in subtables)}"
                    )
                elif not isinstance(inner, dict):
                    problems.append(f"{top}.{sub} must be a table ([{top}.{sub}]), not a value")
                else:
                    _walk_section(f"{top}.{sub}", inner, base, values, problems)
        else:
            _walk_section(top, table, base, values, problems)
    return values, problems


def _walk_section(
    section: str, table: Mapping[str, Any], base: Path, values: dict[str, Any], problems: list[str]
) -> None:
    keys = SCHEMA[section]
    for name, raw in table.items():
        key = keys.get(name)
        if key is None:
            problems.append(
                f"unknown key {section}.{name}; {_suggest(name, list(keys))}"
                f"keys of [{section}]: {', '.join(keys)}"
            )
            continue
        try:
            values[f"{section}.{name}"] = key.parse(raw, base)
        except _BadValueError as e:
            problems.append(f"{section}.{name}: {e}")


def _sections(values: Mapping[str, Any]) -> FileConfig:
    """The typed file: each section built from the keys present, defaults for the rest."""
    built: dict[str, Any] = {}
    for f in fields(FileConfig):
        table = _table(f.name)
        present = {
            name: values[f"{table}.{name}"] for name in SCHEMA[table] if f"{table}.{name}" in values
        }
        built[f.name] = SECTIONS[table](**present)
    return FileConfig(**built)


def _private_dirs(file: FileConfig) -> tuple[str, ...]:
    """The server's own directories no job may see: its TLS files' and its config's."""
    dirs = {str(p.parent) for p in (file.tls.ca, file.tls.cert, file.tls.key) if p is not None}
    dirs.add(str(DEFAULT_PATH.parent))
    return tuple(sorted(d for d in dirs if d != "/"))


# Defaults that contain a careless or hostile job without hurting ordinary work, and maxima
# no request may pass, derived from the host where that makes sense (see docs/security.md).
_DEFAULT_PIDS = 1024
_MAX_PIDS = 32768


def host_limits() -> tuple[Limits, Limits]:
    """(defaults, maxima) for what the configuration leaves unset: by default a job gets
    1,024 tasks, a quarter of the host's memory and half its CPUs (at least one); no job may
    ask for more than the host has (CPUs, memory) or 32,768 tasks."""
    cpus = float(os.cpu_count() or 1)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    defaults = Limits(cpus=max(1.0, cpus / 2), memory_bytes=memory // 4, pids=_DEFAULT_PIDS)
    maxima = Limits(cpus=cpus, memory_bytes=memory, pids=_MAX_PIDS, tmp_bytes=memory)
    return defaults, maxima


def _filled(limits: Limits, host: Limits, cap: Limits | None = None) -> Limits:
    """``limits`` with what it leaves unset taken from ``host``, no more than ``cap``
    (a configured maximum below the host's share wins over the share)."""

    def pick(name: str) -> Any:
        value = getattr(limits, name)
        if value is not None:
            return value
        fallback = getattr(host, name)
        bound = getattr(cap, name) if cap is not None else None
        return fallback if fallback is None or bound is None else min(fallback, bound)

    return replace(
        limits,
        cpus=pick("cpus"),
        memory_bytes=pick("memory_bytes"),
        pids=pick("pids"),
        tmp_bytes=pick("tmp_bytes"),
    )


def _build(file: FileConfig, problems: list[str]) -> ServerConfig | None:
    tls = file.tls
    for name, value, flag in (
        ("tls.ca", tls.ca, "--ca"),
        ("tls.cert", tls.cert, "--cert"),
        ("tls.key", tls.key, "--key"),
    ):
        if value is None:
            problems.append(f"{name} is not set; set it in the config file or give {flag} FILE")
    limits: dict[str, Limits] = {}
    for table, section in (
        ("limits.default", file.limits_default),
        ("limits.max", file.limits_max),
    ):
        try:
            limits[table] = section.limits()
        except InvalidSpecError as e:
            problems.append(f"{table}: {e}")
    if len(limits) == 2:
        host_default, host_max = host_limits()
        maxima = _filled(limits["limits.max"], host_max)
        limits = {
            "limits.default": _filled(limits["limits.default"], host_default, maxima),
            "limits.max": maxima,
        }
        try:
            limits["limits.default"].resolve(Limits(), limits["limits.max"])
        except InvalidSpecError as e:
            problems.append(f"limits.default: {e}")
    try:
        runtime = RuntimeConfig(
            state_dir=file.server.state_dir,
            output_limit=file.quotas.max_output_per_job,
            output_buffer_bytes=file.quotas.output_read_buffer,
            default_limits=limits.get("limits.default", Limits()),
            max_limits=limits.get("limits.max", Limits()),
            default_timeout=file.limits_default.timeout,
            max_timeout=file.limits_max.timeout,
            run_as=file.run_as.default,
            owner_run_as=file.run_as.owners,
            allow_root=file.run_as.allow_root,
            host_network_owners=file.network.host_network_users,
            retention_seconds=file.retention.max_age,
            retention_bytes=file.retention.max_size,
            retention_bytes_per_owner=file.retention.max_size_per_owner,
            usage_interval=file.usage.interval or None,
            cgroups=file.cgroups.enabled,
            cgroup_subtree=file.cgroups.subtree,
            cgroup_parent=file.cgroups.parent,
            namespaces=file.namespaces.enabled,
            sandbox=file.sandbox.enabled,
            uid_range=file.sandbox.uid_range,
            owner_paths=file.sandbox.paths,
            hide_paths=(*file.sandbox.hide, *_private_dirs(file)),
            seccomp_optional_owners=file.sandbox.seccomp_optional,
            images=file.images.roots or {},
        )
    except InvalidSpecError as e:
        problems.append(f"run_as: {e}" if "run-as" in str(e) else str(e))
        return None
    if problems or tls.ca is None or tls.cert is None or tls.key is None:
        return None
    return ServerConfig(
        tls=TlsFiles(tls.ca, tls.cert, tls.key),
        runtime=runtime,
        identity=ServerIdentity(
            name=file.server.name or socket.gethostname(), labels=file.server.labels or {}
        ),
        listen=file.server.listen,
        pool=CertPool(tls.client_allowlist, tls.client_revoked),
        limits=ServiceLimits(
            max_active_jobs_per_user=file.quotas.max_jobs_per_user,
            max_streams_per_user=file.quotas.max_streams_per_user,
        ),
        max_message_bytes=file.server.max_message_size,
        shutdown_grace=file.server.shutdown_grace,
        log_format=file.server.log_format,
        metrics_listen=file.metrics.listen,
        web_listen=file.web.listen,
        handshake_timeout=file.server.handshake_timeout,
        max_connections=file.server.max_connections,
    )


def load_config(
    path: Path | None, flags: Mapping[str, Any] | None = None, *, cwd: Path | None = None
) -> ServerConfig:
    """The server's settings: defaults, then the file at ``path`` (None: the default path,
    if it exists), then ``flags`` (names of :data:`FLAG_KEYS` -> raw values; None = not
    given). Relative paths in the file are taken from the file's directory; in flags,
    from ``cwd``.

    Raises:
        ConfigError: the file is unreadable or not TOML, or has unknown keys or bad
            values; every problem found is listed.
    """
    source = str(path or DEFAULT_PATH)
    data: dict[str, Any] = {}
    if path is not None or DEFAULT_PATH.exists():
        target = path or DEFAULT_PATH
        try:
            with target.open("rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(source, [f"cannot read it: {e.strerror}; check the path"]) from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(source, [f"not valid TOML: {e}"]) from e
    base = (path or DEFAULT_PATH).absolute().parent
    values, problems = _walk(data, base)
    here = cwd or Path.cwd()
    for flag, raw in (flags or {}).items():
        if raw is None:
            continue
        section, _, name = FLAG_KEYS[flag].rpartition(".")
        try:
            values[FLAG_KEYS[flag]] = SCHEMA[section][name].parse(raw, here)
        except _BadValueError as e:
            problems.append(f"--{flag.replace('_', '-')}: {e}")
    config = _build(_sections(values), problems)
    if config is None:
        raise ConfigError(source if data or path else "jobworkerd", problems)
    return config


def check_files(config: ServerConfig) -> list[str]:
    """What ``--check-config`` adds to parsing: the files named must be readable, the
    fingerprint lists well formed, the state dir usable."""
    problems = []
    unreadable = False
    for what, file in (
        ("tls.ca", config.tls.ca),
        ("tls.cert", config.tls.cert),
        ("tls.key", config.tls.key),
    ):
        if not os.access(file, os.R_OK):
            unreadable = True
            problems.append(f"{what}: cannot read {file}; check the path and its permissions")
    if not unreadable:
        problems += check_server_material(config.tls)
    try:
        config.pool.load()
    except OSError as e:
        problems.append(f"tls: cannot read a fingerprint list: {e}")
    except ValueError as e:
        problems.append(f"tls: {e}")
    state = config.runtime.state_dir
    existing = next((p for p in (state, *state.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        problems.append(f"server.state_dir: {existing} is not a directory")
    return problems


def default_config_text() -> str:
    """Every key, commented, with its default: the reference configuration file."""
    lines = [
        "# jobworkerd configuration (TOML): every key, with its default.",
        "# Unknown keys are errors. Check a file with: jobworkerd --check-config --config FILE",
        "# Sizes: 512M, 10G or bytes. Durations: 500ms, 5s, 12h, 7d or seconds.",
        "# Relative paths are taken from this file's directory.",
        "# Command-line flags (--name, --label, --listen, --state-dir, --ca, --cert, --key,",
        "# --log-format, --metrics-listen, --web-listen) override what is set here.",
    ]
    for section, keys in SCHEMA.items():
        lines += ["", f"[{section}]"]
        if section == _FREE_TABLE:
            key = keys["roots"]
            lines += [f"# {key.doc}", '# alpine = "/var/lib/jobworker/images/alpine"']
            continue
        for name, key in keys.items():
            lines.append(f"# {key.doc}")
            lines.append(f"{name} = {key.default}" if key.default else f"# {name} = {key.example}")
    return "\n".join(lines) + "\n"
