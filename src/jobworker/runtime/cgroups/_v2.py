"""cgroup v2: jobs under ``<parent>/<subtree>/<id>``, the server in ``<parent>/supervisor``.

cgroup v2's "no internal processes" rule: a cgroup that hands controllers to its children
(``cgroup.subtree_control``) may not hold processes itself. So before enabling the controllers
in the parent, every process of the parent (the server, at start-up, before it spawns
anything) moves into a leaf of its own. With systemd that parent is the service's cgroup,
delegated to us with ``Delegate=yes``.
"""

from __future__ import annotations

import contextlib
import os
import time

from .._jobdir import UNIFIED, CgroupPaths
from .._spec import Limits
from .._status import Usage
from .._usage import Sample
from ._base import (
    CPU_PERIOD_US,
    UsageProbe,
    job_dirs,
    lock_subtree,
    remove_all,
    remove_dirs,
    wait_unpopulated,
)
from ._files import (
    CgroupError,
    KeptFile,
    keyed_value,
    read_int,
    read_keyed,
    read_raw,
    read_text,
    write,
)

__all__ = ["LEAF", "V2Cgroup", "V2Driver"]

REQUIRED = ("cpu", "memory", "io", "pids")
LEAF = "supervisor"


def _enable(directory: str, controllers: tuple[str, ...]) -> None:
    available = (read_text(f"{directory}/cgroup.controllers") or "").split()
    missing = [c for c in controllers if c not in available]
    if missing:
        raise CgroupError(
            f"cgroup controller(s) {', '.join(missing)} are not available in {directory}; "
            "enable them in the parent's cgroup.subtree_control (with systemd: Delegate=yes "
            "in the unit), or set [cgroups] enabled = false in the configuration (limits are "
            "then not enforced)"
        )
    enabled = (read_text(f"{directory}/cgroup.subtree_control") or "").split()
    todo = " ".join(f"+{c}" for c in controllers if c not in enabled)
    if todo:
        write(f"{directory}/cgroup.subtree_control", todo)


class V2Driver:
    """Per-job cgroups in the unified hierarchy."""

    def __init__(self, parent: str, subtree: str) -> None:
        # A server that moved itself into <parent>/supervisor earlier (a restart in the same
        # process, or a second runtime) keeps using <parent>.
        if os.path.basename(parent) == LEAF:
            parent = os.path.dirname(parent)
        self._parent = parent
        self._base = os.path.join(parent, subtree)
        self._lock = -1
        try:
            self._move_into_leaf()
            _enable(parent, REQUIRED)
            os.makedirs(self._base, mode=0o755, exist_ok=True)
            # Before the subtree's controllers are touched: they may be another server's.
            self._lock = lock_subtree(self._base, subtree)
            _enable(self._base, REQUIRED)
        except OSError as e:
            self.release()
            raise CgroupError(
                f"cannot set up cgroups under {parent}: {e.strerror}; jobworker needs write "
                "access to its own cgroup (run as root, or Delegate=yes under systemd)"
            ) from e

    @property
    def kind(self) -> str:
        return "v2"

    def _move_into_leaf(self) -> None:
        procs = (read_text(f"{self._parent}/cgroup.procs") or "").split()
        if not procs:
            return
        mine = str(os.getpid())
        others = [p for p in procs if p != mine]
        if others:
            raise CgroupError(
                f"cgroup {self._parent} also holds processes jobworker did not start "
                f"({', '.join(others[:5])}); give jobworker a cgroup of its own (systemd: "
                "Delegate=yes) or set [cgroups] parent in the configuration"
            )
        leaf = os.path.join(self._parent, LEAF)
        os.makedirs(leaf, mode=0o755, exist_ok=True)
        write(f"{leaf}/cgroup.procs", mine)

    def _dir(self, job_id: str) -> str:
        return os.path.join(self._base, job_id)

    def create(self, job_id: str, limits: Limits, *, made: bool = False) -> V2Cgroup:
        directory = self._dir(job_id)
        try:
            if not made:
                os.mkdir(directory)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {directory}: {e.strerror}") from e
        try:
            _apply(directory, limits)
        except CgroupError:
            with contextlib.suppress(CgroupError):
                remove_dirs([] if made else [directory])
            raise
        return V2Cgroup(directory)

    def attach(self, paths: CgroupPaths) -> V2Cgroup:
        return V2Cgroup(next(iter(paths.dirs.values())))

    def find(self, job_id: str) -> V2Cgroup:
        return V2Cgroup(self._dir(job_id))

    def prune(self, keep: set[str]) -> list[str]:
        removed = []
        for job_id in job_dirs(self._base):
            events = read_keyed(f"{self._dir(job_id)}/cgroup.events")
            if job_id not in keep and not events.get("populated", 0):
                with contextlib.suppress(CgroupError):
                    remove_dirs([self._dir(job_id)])
                    removed.append(job_id)
        return removed

    def close(self, timeout: float) -> None:
        remove_all([self.find(job_id) for job_id in job_dirs(self._base)], timeout)
        with contextlib.suppress(OSError):
            os.rmdir(self._base)

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _apply(directory: str, limits: Limits) -> None:
    if limits.cpus is not None:
        quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
        write(f"{directory}/cpu.max", f"{quota} {CPU_PERIOD_US}")
    if limits.cpu_weight is not None:
        write(f"{directory}/cpu.weight", str(limits.cpu_weight))
    if limits.memory_bytes is not None:
        write(f"{directory}/memory.max", str(limits.memory_bytes))
        if os.path.exists(f"{directory}/memory.swap.max"):
            write(f"{directory}/memory.swap.max", "0")
    if limits.pids is not None:
        write(f"{directory}/pids.max", str(limits.pids))
    for io in limits.io:
        fields = [
            f"{key}={value}"
            for key, value in (
                ("rbps", io.read_bps),
                ("wbps", io.write_bps),
                ("riops", io.read_iops),
                ("wiops", io.write_iops),
            )
            if value is not None
        ]
        if fields:
            write(f"{directory}/io.max", f"{io.device} {' '.join(fields)}")


class V2Cgroup:
    """One job's directory in the unified hierarchy."""

    def __init__(self, directory: str) -> None:
        self._dir = directory

    @property
    def paths(self) -> CgroupPaths:
        return CgroupPaths({UNIFIED: self._dir})

    def usage(self) -> Usage:
        directory = self._dir
        read, write_ = _io_totals(read_raw(f"{directory}/io.stat"))
        return Usage(
            cpu_seconds=read_keyed(f"{directory}/cpu.stat").get("usage_usec", 0) / 1e6,
            memory_bytes=read_int(f"{directory}/memory.current") or 0,
            memory_peak_bytes=read_int(f"{directory}/memory.peak"),
            io_read_bytes=read,
            io_write_bytes=write_,
        )

    def probe(self) -> UsageProbe:
        return _Probe(self._dir)

    def oom_killed(self) -> bool:
        return read_keyed(f"{self._dir}/memory.events").get("oom_kill", 0) > 0

    def pids_limited(self) -> bool:
        return read_keyed(f"{self._dir}/pids.events").get("max", 0) > 0

    def kill(self) -> bool:
        path = f"{self._dir}/cgroup.kill"
        if not os.path.exists(path):
            return False
        write(path, "1")
        return True

    def remove(self, timeout: float) -> bool:
        directory = self._dir
        deadline = time.monotonic() + timeout
        if not wait_unpopulated(f"{directory}/cgroup.events", f"{directory}/cgroup.procs", timeout):
            return False
        remove_dirs([directory], max(0.0, deadline - time.monotonic()))
        return True


class _Probe:
    """A job's cgroup2 usage files, kept open (see KeptFile)."""

    def __init__(self, directory: str) -> None:
        self._files = [
            KeptFile(f"{directory}/{name}")
            for name in ("cpu.stat", "memory.current", "io.stat", "pids.current")
        ]

    def read(self) -> Sample:
        cpu, memory, io, pids = (f.read() for f in self._files)
        read, write_ = _io_totals(io)
        return Sample(
            time_ns=time.time_ns(),
            cpu_seconds=keyed_value(cpu, b"usage_usec") / 1e6,
            memory_bytes=int(memory or 0),
            io_read_bytes=read,
            io_write_bytes=write_,
            pids=int(pids or 0),
        )

    def close(self) -> None:
        for f in self._files:
            f.close()


def _io_totals(io_stat: bytes) -> tuple[int, int]:
    """Bytes read and written, over every device of an ``io.stat``."""
    read = write_ = 0
    for line in io_stat.splitlines():
        for field in line.split()[1:]:
            if field.startswith(b"rbytes="):
                read += int(field[7:])
            elif field.startswith(b"wbytes="):
                write_ += int(field[7:])
    return read, write_
