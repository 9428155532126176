"""The runtime's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import InvalidSpecError
from ._jobdir import Bind
from ._protocol import DEFAULT_GRACE_S
from ._spec import Limits
from ._uids import DEFAULT_UID_RANGE, check_range

__all__ = ["ALL_OWNERS", "DEFAULT_TMP_BYTES", "NOBODY", "Bind", "RunAs", "RuntimeConfig"]


@dataclass(frozen=True, slots=True)
class RunAs:
    """The local user and group a job's command runs as."""

    uid: int
    gid: int


NOBODY = RunAs(65534, 65534)
# The owner key of ``owner_paths`` that applies to every owner.
ALL_OWNERS = "*"
# A job's private writable places (/tmp, /var/tmp, /dev/shm, /run/lock, /work) together,
# when neither the job nor the server's defaults say: a tmpfs needs a size, and the
# kernel's own default (half the RAM) would let one job pin half the host's memory.
DEFAULT_TMP_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Settings of a runtime.

    ``state_dir`` holds one directory per job (spec, output log, exit record).
    ``output_limit`` caps each job's logged output in bytes; past it the log gets an
    "output truncated" note and the rest is discarded while the job keeps running.
    ``output_buffer_bytes`` is what all readers of output together may hold in their
    batches (``_output.ReadBudget``).

    Isolation: ``cgroups`` puts each job in its own cgroup under ``cgroup_subtree`` beneath
    the server's own cgroup (or ``cgroup_parent`` on cgroup v2); turning it off runs jobs
    without limits, and their status says so. ``default_limits`` fill what a spec leaves
    unset; ``max_limits`` cap what a spec may ask. ``default_timeout`` is the run time a job
    gets when it asks for none (None: no limit), ``max_timeout`` the most it may ask for;
    its supervisor stops it then, with ``default_grace``. Each job runs as a uid:gid of its own
    from ``uid_range`` (as systemd's DynamicUser=), or as ``run_as`` for every job if set,
    or as ``owner_run_as[owner]``; uid 0 only with ``allow_root``. Only owners in
    ``host_network_owners`` may ask for the host's network instead of an empty one.
    ``namespaces`` off skips the mount, UTS, IPC, network and cgroup namespaces (to measure
    what they cost, or to debug); the PID namespace stays, as stop relies on it.

    Sandbox (``sandbox``, on by default, needs ``namespaces``): each job gets a read-only
    view of the host (or of one of ``images``, name -> directory), private writable places,
    a private /dev, masked /proc and /sys, no capabilities and a seccomp filter (see
    ``_rootfs`` and ``_seccomp``). ``hide_paths`` are shown empty (the state dir always
    is); ``owner_paths`` are shown to an owner (or every owner, ``"*"``) at the same path;
    owners in ``seccomp_optional_owners`` may ask for no seccomp filter. ``spare_roots``:
    the launcher builds the common root (the host's, no shown path) ahead for the next job
    (``_spare``); off, each job builds all of its root as it starts.

    Retention: ended jobs and their output are deleted once ``retention_seconds`` have
    passed since they ended; oldest first while an owner's jobs take more than
    ``retention_bytes_per_owner``; and, as a last resort while all jobs together take more
    than ``retention_bytes``, the oldest of the owner who takes the most (``_retention``).
    Checked every ``retention_interval`` seconds and at start. Running and created jobs
    are never deleted.

    Raises:
        InvalidSpecError: on construction, naming the bad setting.
    """

    state_dir: Path
    output_limit: int = 1 << 30
    output_buffer_bytes: int = 128 << 20
    default_grace: float = DEFAULT_GRACE_S
    launch_timeout: float = 60.0
    cgroups: bool = True
    cgroup_subtree: str = "jobworker"
    cgroup_parent: str | None = None
    default_limits: Limits = field(default_factory=Limits)
    max_limits: Limits = field(default_factory=Limits)
    default_timeout: float | None = None
    max_timeout: float | None = None
    run_as: RunAs | None = None
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    owner_run_as: Mapping[str, RunAs] = field(default_factory=dict)
    allow_root: bool = False
    host_network_owners: frozenset[str] = frozenset()
    cgroup_remove_timeout: float = 10.0
    namespaces: bool = True
    retention_seconds: float = 7 * 24 * 3600.0
    retention_bytes: int = 10 << 30
    retention_bytes_per_owner: int | None = None
    retention_interval: float = 60.0
    # How often every running job's usage is sampled for its history; None: never.
    usage_interval: float | None = 1.0
    sandbox: bool = True
    hide_paths: tuple[str, ...] = ()
    owner_paths: Mapping[str, tuple[Bind, ...]] = field(default_factory=dict)
    seccomp_optional_owners: frozenset[str] = frozenset()
    images: Mapping[str, str] = field(default_factory=dict)
    spare_roots: bool = True

    def __post_init__(self) -> None:
        if self.output_limit < 1:
            raise InvalidSpecError("output_limit must be at least 1 byte")
        if self.output_buffer_bytes < 1 << 20:
            raise InvalidSpecError(
                "the output read buffer must be at least 1M ([quotas] output_read_buffer)"
            )
        if self.retention_seconds < 0 or self.retention_bytes < 0:
            raise InvalidSpecError("retention age and size must not be negative")
        if self.retention_interval <= 0:
            raise InvalidSpecError("retention_interval must be positive")
        if self.usage_interval is not None and not 0.1 <= self.usage_interval <= 3600:
            raise InvalidSpecError(
                "the usage sampling interval must be between 100ms and 1h ([usage] interval)"
            )
        if self.default_grace < 0:
            raise InvalidSpecError("default_grace must not be negative")
        self._check_timeouts()
        subtree = self.cgroup_subtree
        if not subtree or "/" in subtree or subtree in {".", ".."}:
            raise InvalidSpecError(
                f"cgroup subtree name {subtree!r} must be a single directory name"
            )
        self._check_users()

    def _check_timeouts(self) -> None:
        for name in ("default_timeout", "max_timeout"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise InvalidSpecError(f"{name} must be a number of seconds above 0")
        if (
            self.default_timeout is not None
            and self.max_timeout is not None
            and self.default_timeout > self.max_timeout
        ):
            raise InvalidSpecError(
                "limits.default timeout is above limits.max timeout; lower it or raise the maximum"
            )
        self._check_sandbox()

    def _check_sandbox(self) -> None:
        if self.sandbox and not self.namespaces:
            raise InvalidSpecError("the sandbox needs namespaces; turn both off, or neither")
        for path in (*self.hide_paths, *(b.path for bs in self.owner_paths.values() for b in bs)):
            if not path.startswith("/"):
                raise InvalidSpecError(f"sandbox path {path!r} is not absolute")
        for name, path in self.images.items():
            if not name or not path.startswith("/"):
                raise InvalidSpecError(f"image {name!r}: {path!r} is not an absolute directory")

    def _check_users(self) -> None:
        if self.run_as is None:
            check_range(*self.uid_range)
        users = [("default", self.run_as)] if self.run_as is not None else []
        for who, user in [*users, *self.owner_run_as.items()]:
            if min(user.uid, user.gid) < 0:
                raise InvalidSpecError(f"run-as user for {who} has a negative uid or gid")
            if 0 in (user.uid, user.gid) and not self.allow_root:
                raise InvalidSpecError(
                    f"run-as user for {who} is root (uid or gid 0); set allow_root to permit it"
                )

    def user_for(self, owner: str) -> RunAs | None:
        """Who ``owner``'s jobs run as; None: a uid of each job's own."""
        return self.owner_run_as.get(owner, self.run_as)

    @property
    def hidden_paths(self) -> tuple[str, ...]:
        """What every sandboxed job is shown empty: the state dir and ``hide_paths``."""
        return (str(self.state_dir), *self.hide_paths)

    def binds_for(self, owner: str) -> tuple[Bind, ...]:
        """The host paths shown to ``owner``'s jobs."""
        return (*self.owner_paths.get(ALL_OWNERS, ()), *self.owner_paths.get(owner, ()))
