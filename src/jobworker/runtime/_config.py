"""The runtime's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import InvalidSpecError
from ._protocol import DEFAULT_GRACE_S
from ._spec import Limits

__all__ = ["NOBODY", "RunAs", "RuntimeConfig"]


@dataclass(frozen=True, slots=True)
class RunAs:
    """The local user and group a job's command runs as."""

    uid: int
    gid: int


NOBODY = RunAs(65534, 65534)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Settings of a runtime.

    ``state_dir`` holds one directory per job (spec, output log, exit record).
    ``output_limit`` caps each job's logged output in bytes; past it the log gets an
    "output truncated" note and the rest is discarded while the job keeps running.

    Isolation: ``cgroups`` puts each job in its own cgroup under ``cgroup_subtree`` beneath
    the server's own cgroup (or ``cgroup_parent`` on cgroup v2); turning it off runs jobs
    without limits, and their status says so. ``default_limits`` fill what a spec leaves
    unset; ``max_limits`` cap what a spec may ask. Jobs run as ``run_as`` (default nobody),
    or as ``owner_run_as[owner]``; uid 0 only with ``allow_root``. Only owners in
    ``host_network_owners`` may ask for the host's network instead of an empty one.
    ``namespaces`` off skips the mount, UTS, IPC, network and cgroup namespaces (to measure
    what they cost, or to debug); the PID namespace stays, as stop relies on it.

    Retention: ended jobs and their output are deleted once ``retention_seconds`` have
    passed since they ended, and, oldest first, while all jobs together take more than
    ``retention_bytes`` of disk; checked every ``retention_interval`` seconds and at start.
    Running and created jobs are never deleted.

    Raises:
        InvalidSpecError: on construction, naming the bad setting.
    """

    state_dir: Path
    output_limit: int = 1 << 30
    default_grace: float = DEFAULT_GRACE_S
    launch_timeout: float = 60.0
    cgroups: bool = True
    cgroup_subtree: str = "jobworker"
    cgroup_parent: str | None = None
    default_limits: Limits = field(default_factory=Limits)
    max_limits: Limits = field(default_factory=Limits)
    run_as: RunAs = NOBODY
    owner_run_as: Mapping[str, RunAs] = field(default_factory=dict)
    allow_root: bool = False
    host_network_owners: frozenset[str] = frozenset()
    cgroup_remove_timeout: float = 10.0
    namespaces: bool = True
    retention_seconds: float = 7 * 24 * 3600.0
    retention_bytes: int = 10 << 30
    retention_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.output_limit < 1:
            raise InvalidSpecError("output_limit must be at least 1 byte")
        if self.retention_seconds < 0 or self.retention_bytes < 0:
            raise InvalidSpecError("retention age and size must not be negative")
        if self.retention_interval <= 0:
            raise InvalidSpecError("retention_interval must be positive")
        if self.default_grace < 0:
            raise InvalidSpecError("default_grace must not be negative")
        subtree = self.cgroup_subtree
        if not subtree or "/" in subtree or subtree in {".", ".."}:
            raise InvalidSpecError(
                f"cgroup subtree name {subtree!r} must be a single directory name"
            )
        for who, user in [("default", self.run_as), *self.owner_run_as.items()]:
            if min(user.uid, user.gid) < 0:
                raise InvalidSpecError(f"run-as user for {who} has a negative uid or gid")
            if 0 in (user.uid, user.gid) and not self.allow_root:
                raise InvalidSpecError(
                    f"run-as user for {who} is root (uid or gid 0); set allow_root to permit it"
                )

    def user_for(self, owner: str) -> RunAs:
        return self.owner_run_as.get(owner, self.run_as)
