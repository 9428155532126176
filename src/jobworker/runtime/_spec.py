"""What a job is asked to be: its command, environment, owner and resource limits.

Values here are validated once, at construction, so everything downstream can trust them; the
network boundary turns ``InvalidSpecError`` into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import signal
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._labels import LabelError, check_labels, check_name
from ._errors import InvalidSpecError

__all__ = ["ExecSpec", "IOLimit", "JobSpec", "Limits", "check_signal", "check_window"]

# Linux refuses a single argv/env string longer than MAX_ARG_STRLEN (32 pages) with E2BIG at
# exec time; checking here turns that into a clear error before anything is spawned.
MAX_ARG_BYTES = 128 * 1024
# Far below the kernel's limit (a quarter of the stack rlimit, 2 MiB by default) so a request
# that passes here cannot fail at exec for size.
MAX_ARGV_ENV_BYTES = 1024 * 1024
MAX_OWNER_CHARS = 256
MAX_TIMEOUT_S = 10 * 365 * 86400.0
STDIN_MODES = ("none", "pipe", "tty")
MAX_WINDOW = 10_000


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidSpecError(f"{what} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidSpecError(f"{what} contains a NUL byte; remove it")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_ARG_BYTES:
        raise InvalidSpecError(f"{what} is longer than {MAX_ARG_BYTES} bytes; shorten it")
    return value


def _check_env(env: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for key, value in dict(env).items():
        _check_text(key, "environment variable name")
        if not key or "=" in key:
            raise InvalidSpecError(f"environment variable name {key!r} is empty or contains '='")
        checked[key] = _check_text(value, f"environment variable {key}")
    return checked


@dataclass(frozen=True, slots=True)
class IOLimit:
    """Disk IO throttling for one block device ("MAJ:MIN"); ``None`` device = the workdir's."""

    device: str | None = None
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            major, sep, minor = self.device.partition(":")
            if not (sep and major.isdigit() and minor.isdigit()):
                raise InvalidSpecError(
                    f"IO device {self.device!r} is not MAJ:MIN; use e.g. 8:0 (see lsblk)"
                )
        for name in ("read_bps", "write_bps", "read_iops", "write_iops"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InvalidSpecError(f"IO limit {name} must be a positive integer")


def _amount(value: float, unit: str) -> str:
    if unit == "bytes" and value >= 1024:
        for power, suffix in ((3, "G"), (2, "M"), (1, "K")):
            if value >= 1024**power:
                return f"{value / 1024**power:.4g}{suffix}i ({value} bytes)"
    return f"{value} {unit}" if isinstance(value, int) else f"{value:g} {unit}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one job; ``None`` means "the server's default"."""

    cpus: float | None = None
    cpu_weight: int | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    io: tuple[IOLimit, ...] = ()
    # The job's private writable places (/tmp, /var/tmp, /dev/shm, /run/lock, /work) together.
    tmp_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.cpus is not None and not (
            isinstance(self.cpus, int | float) and math.isfinite(self.cpus) and self.cpus > 0
        ):
            raise InvalidSpecError("cpus must be a positive number of CPUs, e.g. 0.5")
        if self.cpu_weight is not None and not (1 <= self.cpu_weight <= 10000):
            raise InvalidSpecError("cpu_weight must be between 1 and 10000")
        if self.memory_bytes is not None and self.memory_bytes < 1024 * 1024:
            raise InvalidSpecError("memory limit must be at least 1 MiB")
        if self.pids is not None and self.pids < 1:
            raise InvalidSpecError("pids limit must be at least 1")
        if self.tmp_bytes is not None and self.tmp_bytes < 1024 * 1024:
            raise InvalidSpecError("tmp size must be at least 1 MiB")
        object.__setattr__(self, "io", tuple(self.io))

    def resolve(self, defaults: Limits, maxima: Limits) -> Limits:
        """These limits with the server's defaults filled in, checked against its maxima.

        A field left unset takes the default, or else the maximum, so no job escapes a limit
        the server caps. IO limits with no device name get the job's working-directory disk
        later, when the cgroup is made.

        Raises:
            InvalidSpecError: a requested limit is above the server's maximum.
        """
        values: dict[str, Any] = {}
        for name, unit in (
            ("cpus", "CPUs"),
            ("memory_bytes", "bytes"),
            ("pids", "tasks"),
            ("tmp_bytes", "bytes"),
        ):
            value = getattr(self, name)
            if value is None:
                value = getattr(defaults, name)
            cap = getattr(maxima, name)
            if cap is not None:
                if value is None:
                    value = cap
                elif value > cap:
                    label = {"memory_bytes": "memory", "tmp_bytes": "tmp size"}.get(name, name)
                    raise InvalidSpecError(
                        f"{label} limit {_amount(value, unit)} is above the server maximum of "
                        f"{_amount(cap, unit)}; ask for at most that"
                    )
            values[name] = value
        weight = self.cpu_weight if self.cpu_weight is not None else defaults.cpu_weight
        return Limits(cpu_weight=weight, io=self.io or defaults.io, **values)

    def to_json(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "cpu_weight": self.cpu_weight,
            "memory_bytes": self.memory_bytes,
            "pids": self.pids,
            "tmp_bytes": self.tmp_bytes,
            "io": [
                {
                    "device": io.device,
                    "read_bps": io.read_bps,
                    "write_bps": io.write_bps,
                    "read_iops": io.read_iops,
                    "write_iops": io.write_iops,
                }
                for io in self.io
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        return cls(
            cpus=data.get("cpus"),
            cpu_weight=data.get("cpu_weight"),
            memory_bytes=data.get("memory_bytes"),
            pids=data.get("pids"),
            io=tuple(IOLimit(**io) for io in data.get("io", ())),
            tmp_bytes=data.get("tmp_bytes"),
        )


def check_window(rows: int, cols: int) -> None:
    """Raises InvalidSpecError: a terminal size out of range."""
    if not (1 <= rows <= MAX_WINDOW and 1 <= cols <= MAX_WINDOW):
        raise InvalidSpecError(f"a terminal of {rows}x{cols}: rows and columns must be 1-10000")


def check_signal(signum: int) -> int:
    """``signum``, once known to be a signal a process can be sent.

    Raises:
        InvalidSpecError: it is not (0 and unknown numbers included).
    """
    valid = {int(s) for s in signal.valid_signals()}
    if not isinstance(signum, int) or signum not in valid or signum == 0:
        raise InvalidSpecError(f"{signum!r} is not a signal number; use e.g. 15 (SIGTERM)")
    return signum


def _check_terminal(window: tuple[int, int], term: str) -> None:
    """Raises InvalidSpecError: a window size out of range, or a TERM that is not a short
    printable word."""
    check_window(*window)
    if not term or len(term) > 64 or not term.isprintable() or " " in term:
        raise InvalidSpecError("TERM must be a short word such as xterm-256color")


def _check_argv(argv: object) -> tuple[str, ...]:
    """Raises InvalidSpecError: not a non-empty list whose first item names a command."""
    if isinstance(argv, str | bytes) or not isinstance(argv, Sequence):
        raise InvalidSpecError("argv must be a list of strings, e.g. ['ls', '-l']")
    checked = tuple(argv)
    if not checked:
        raise InvalidSpecError("argv is empty; give the command to run")
    if not checked[0]:
        raise InvalidSpecError("argv[0] is empty; give the command to run")
    return checked


def _check_command(
    argv: object, env: Mapping[str, str], cwd: str | None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The argv and environment, once they and the working directory are known to be valid.

    Raises:
        InvalidSpecError: one of them is not (empty, too long, a relative directory).
    """
    checked = _check_argv(argv)
    total = sum(len(_check_text(arg, f"argv[{i}]")) + 1 for i, arg in enumerate(checked))
    checked_env = _check_env(env)
    total += sum(len(k) + len(v) + 2 for k, v in checked_env.items())
    if total > MAX_ARGV_ENV_BYTES:
        raise InvalidSpecError(
            f"argv and env together exceed {MAX_ARGV_ENV_BYTES} bytes; pass data in a file"
        )
    if cwd is not None:
        text = _check_text(cwd, "working directory")
        if not text.startswith("/"):
            raise InvalidSpecError(f"working directory {text!r} is not absolute; start it with /")
    return checked, checked_env


def _check_tags(
    name: str | None, labels: Mapping[str, str], timeout: float | None
) -> dict[str, str]:
    """The labels, once the name, the labels and the timeout are known to be valid.

    Raises:
        InvalidSpecError: one of them is not.
    """
    try:
        if name is not None:
            check_name(name)
        checked = check_labels(labels)
    except LabelError as e:
        raise InvalidSpecError(str(e)) from None
    if timeout is not None and not (
        isinstance(timeout, int | float) and math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise InvalidSpecError(
            "timeout must be a number of seconds above 0 (at most ten years), e.g. 90"
        )
    return checked


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A command to run as a job.

    ``argv`` is executed directly (never through a shell); ``argv[0]`` is looked up in the job's
    PATH unless it contains a slash. ``env`` is added to a minimal default environment (PATH,
    HOME, LANG), never to the server's own. ``cwd`` must be absolute; None is the job's
    private working directory (/job) when it is sandboxed, else /. ``image`` names one of
    the server's root filesystems (None: the host's, read-only). ``seccomp`` False asks for
    no seccomp filter, which the server grants only to owners its configuration names.
    ``name`` is unique among the owner's jobs (checked when the job is created); ``labels``
    follow Kubernetes' syntax. ``timeout_s`` stops the job once it has run that long (None:
    the server's default). ``stdin`` is "none" (/dev/null) or "pipe" (what attached clients
    send, through :meth:`Runtime.write_stdin`).

    Raises:
        InvalidSpecError: on construction, naming the bad field.
    """

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    owner: str = "local"
    limits: Limits = field(default_factory=Limits)
    host_network: bool = False
    image: str | None = None
    seccomp: bool = True
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    stdin: str = "none"
    window: tuple[int, int] = (24, 80)
    term: str = "xterm"

    def __post_init__(self) -> None:
        argv, env = _check_command(self.argv, self.env, self.cwd)
        if self.image is not None and not _check_text(self.image, "image").isprintable():
            raise InvalidSpecError("image must be the name of one of the server's images")
        owner = _check_text(self.owner, "owner")
        if not owner or len(owner) > MAX_OWNER_CHARS or not owner.isprintable():
            raise InvalidSpecError("owner must be 1-256 printable characters")
        if not isinstance(self.limits, Limits):
            raise InvalidSpecError("limits must be a Limits value")
        labels = _check_tags(self.name, self.labels, self.timeout_s)
        if self.stdin not in STDIN_MODES:
            raise InvalidSpecError(f"stdin must be one of: {', '.join(STDIN_MODES)}")
        _check_terminal(self.window, self.term)
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "env", types.MappingProxyType(env))
        object.__setattr__(self, "labels", types.MappingProxyType(labels))

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": self.cwd,
            "owner": self.owner,
            "limits": self.limits.to_json(),
            "host_network": self.host_network,
            "image": self.image,
            "seccomp": self.seccomp,
            "name": self.name,
            "labels": dict(self.labels),
            "timeout_s": self.timeout_s,
            "stdin": self.stdin,
            "window": list(self.window),
            "term": self.term,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        return cls(
            argv=tuple(data["argv"]),
            env=data.get("env", {}),
            cwd=data.get("cwd", "/"),
            owner=data.get("owner", "local"),
            limits=Limits.from_json(data.get("limits", {})),
            host_network=bool(data.get("host_network", False)),
            image=data.get("image"),
            seccomp=bool(data.get("seccomp", True)),
            name=data.get("name"),
            labels=data.get("labels") or {},
            timeout_s=data.get("timeout_s"),
            stdin=data.get("stdin") or "none",
            window=tuple(data.get("window") or (24, 80)),
            term=data.get("term") or "xterm",
        )


@dataclass(frozen=True, slots=True)
class ExecSpec:
    """A process to run inside a running job (``docker exec``): ``argv`` (no shell), ``env``
    added to the job's environment, ``cwd`` (None: the job's), and its stdin: a pipe the
    caller writes (``stdin``), else /dev/null; ``tty`` gives it a terminal of the job's own
    of ``window`` (rows, columns) with ``term``.

    Raises:
        InvalidSpecError: on construction, naming the bad field.
    """

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stdin: bool = False
    tty: bool = False
    window: tuple[int, int] = (24, 80)
    term: str = "xterm"

    def __post_init__(self) -> None:
        argv, env = _check_command(self.argv, self.env, self.cwd)
        _check_terminal(self.window, self.term)
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "env", types.MappingProxyType(env))
