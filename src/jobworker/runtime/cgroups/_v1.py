"""cgroup v1 (and hybrid): one directory per job in each controller's hierarchy.

On a hybrid host the job also gets a directory in the cgroup2 hierarchy: it has no controllers
there, but its ``cgroup.events`` says when the job's last process is gone.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping

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
from ._detect import Layout
from ._files import CgroupError, KeptFile, read_int, read_keyed, read_raw, read_text, write

__all__ = ["V1Cgroup", "V1Driver"]

REQUIRED = ("cpu", "cpuacct", "memory", "blkio", "pids")


class V1Driver:
    """Per-job cgroups in the v1 controller hierarchies (plus cgroup2 on a hybrid host)."""

    def __init__(self, layout: Layout, subtree: str) -> None:
        missing = [c for c in REQUIRED if c not in layout.v1]
        if missing:
            raise CgroupError(
                f"cgroup v1 controller(s) {', '.join(missing)} are not mounted; mount them "
                "under /sys/fs/cgroup, or set [cgroups] enabled = false in the configuration "
                "(limits are then not enforced)"
            )
        self._kind = layout.kind
        self._bases = {c: os.path.join(layout.v1[c].own_dir, subtree) for c in REQUIRED}
        self._unified = (
            os.path.join(layout.unified.own_dir, subtree) if layout.unified is not None else None
        )
        for base in self._all_bases():
            try:
                os.makedirs(base, mode=0o755, exist_ok=True)
            except OSError as e:
                raise CgroupError(
                    f"cannot create {base}: {e.strerror}; jobworker needs write access to its "
                    "own cgroup (run as root, or delegate the cgroup to it)"
                ) from e
        # One hierarchy's directory stands for the subtree in all of them.
        self._lock = lock_subtree(self._bases["pids"], subtree)

    @property
    def kind(self) -> str:
        return self._kind

    def _all_bases(self) -> list[str]:
        # cpu and cpuacct may be one hierarchy ("cpu,cpuacct"): visit each directory once.
        bases = list(dict.fromkeys(self._bases.values()))
        if self._unified is not None:
            bases.append(self._unified)
        return bases

    def _dirs(self, job_id: str) -> list[str]:
        return [os.path.join(base, job_id) for base in self._all_bases()]

    def find(self, job_id: str) -> V1Cgroup:
        dirs = {c: os.path.join(base, job_id) for c, base in self._bases.items()}
        if self._unified is not None:
            dirs[UNIFIED] = os.path.join(self._unified, job_id)
        return V1Cgroup(dirs)

    def attach(self, paths: CgroupPaths) -> V1Cgroup:
        if set(REQUIRED) <= set(paths.dirs):
            return V1Cgroup(dict(paths.dirs))
        # A record of the release before typed records kept the procs files only, in
        # hierarchy order, all named after the job.
        return self.find(os.path.basename(next(iter(paths.dirs.values()))))

    def create(self, job_id: str, limits: Limits, *, made: bool = False) -> V1Cgroup:
        cgroup = self.find(job_id)
        dirs = self._dirs(job_id)
        try:
            for directory in () if made else dirs:
                os.mkdir(directory)
            _apply(cgroup.dirs, limits)
        except (OSError, CgroupError) as e:
            with contextlib.suppress(CgroupError):
                remove_dirs([] if made else dirs)
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot create the job's cgroup: {e}") from e
        return cgroup

    def prune(self, keep: set[str]) -> list[str]:
        removed = []
        # Every hierarchy: a server killed while creating a job's cgroups leaves some of
        # them only.
        found = {job_id for base in self._all_bases() for job_id in job_dirs(base)}
        for job_id in sorted(found - keep):
            dirs = self._dirs(job_id)
            if not any((read_text(os.path.join(d, "cgroup.procs")) or "").strip() for d in dirs):
                with contextlib.suppress(CgroupError):
                    remove_dirs(dirs)
                    removed.append(job_id)
        return removed

    def close(self, timeout: float) -> None:
        left = sorted({job_id for base in self._all_bases() for job_id in job_dirs(base)})
        remove_all([self.find(job_id) for job_id in left], timeout)
        for base in self._all_bases():
            with contextlib.suppress(OSError):
                os.rmdir(base)

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _apply(dirs: dict[str, str], limits: Limits) -> None:
    cpu = dirs["cpu"]
    if limits.cpus is not None:
        write(f"{cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US))
        write(f"{cpu}/cpu.cfs_quota_us", str(max(1000, round(limits.cpus * CPU_PERIOD_US))))
    if limits.cpu_weight is not None:
        # cgroup v2's weight (1-10000, default 100) on v1's shares (default 1024).
        write(f"{cpu}/cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
    memory = dirs["memory"]
    if limits.memory_bytes is not None:
        write(f"{memory}/memory.limit_in_bytes", str(limits.memory_bytes))
        # memory+swap at the same value means no swap; the file exists only with swap
        # accounting on.
        if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):
            write(f"{memory}/memory.memsw.limit_in_bytes", str(limits.memory_bytes))
    if limits.pids is not None:
        write(f"{dirs['pids']}/pids.max", str(limits.pids))
    blkio = dirs["blkio"]
    for io in limits.io:
        for name, value in (
            ("read_bps_device", io.read_bps),
            ("write_bps_device", io.write_bps),
            ("read_iops_device", io.read_iops),
            ("write_iops_device", io.write_iops),
        ):
            if value is not None:
                write(f"{blkio}/blkio.throttle.{name}", f"{io.device} {value}")


class V1Cgroup:
    """One job's directories: one per v1 controller, plus cgroup2's on a hybrid host."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs

    @property
    def paths(self) -> CgroupPaths:
        return CgroupPaths(dict(self.dirs))

    def usage(self) -> Usage:
        memory = self.dirs["memory"]
        read, write_ = _io_totals(read_raw(f"{self.dirs['blkio']}/blkio.throttle.io_service_bytes"))
        return Usage(
            cpu_seconds=(read_int(f"{self.dirs['cpuacct']}/cpuacct.usage") or 0) / 1e9,
            memory_bytes=read_int(f"{memory}/memory.usage_in_bytes") or 0,
            memory_peak_bytes=read_int(f"{memory}/memory.max_usage_in_bytes"),
            io_read_bytes=read,
            io_write_bytes=write_,
        )

    def probe(self) -> UsageProbe:
        return _Probe(self.dirs)

    def oom_killed(self) -> bool:
        oom = read_keyed(f"{self.dirs['memory']}/memory.oom_control")
        return oom.get("oom_kill", 0) > 0

    def pids_limited(self) -> bool:
        return read_keyed(f"{self.dirs['pids']}/pids.events").get("max", 0) > 0

    def kill(self) -> bool:
        # On a hybrid host the job's cgroup2 directory has cgroup.kill even without
        # controllers; pure v1 has none (the PID namespace does the job there).
        unified = self.dirs.get(UNIFIED)
        if unified is None:
            return False
        path = os.path.join(unified, "cgroup.kill")
        if not os.path.exists(path):
            return False
        write(path, "1")
        return True

    def remove(self, timeout: float) -> bool:
        unified = self.dirs.get(UNIFIED)
        events = os.path.join(unified, "cgroup.events") if unified else None
        procs = os.path.join(self.dirs["pids"], "cgroup.procs")
        deadline = time.monotonic() + timeout
        if not wait_unpopulated(events, procs, timeout):
            return False
        remove_dirs(list(dict.fromkeys(self.dirs.values())), max(0.0, deadline - time.monotonic()))
        return True


class _Probe:
    """A job's cgroup v1 usage files, kept open (see KeptFile); a controller the host
    lacks reads as zero."""

    def __init__(self, dirs: Mapping[str, str]) -> None:
        self._files = [
            KeptFile(f"{dirs[controller]}/{name}") if controller in dirs else None
            for controller, name in (
                ("cpuacct", "cpuacct.usage"),
                ("memory", "memory.usage_in_bytes"),
                ("blkio", "blkio.throttle.io_service_bytes"),
                ("pids", "pids.current"),
            )
        ]

    def read(self) -> Sample:
        cpu, memory, io, pids = (f.read() if f is not None else b"" for f in self._files)
        read, write_ = _io_totals(io)
        return Sample(
            time_ns=time.time_ns(),
            cpu_seconds=int(cpu or 0) / 1e9,
            memory_bytes=int(memory or 0),
            io_read_bytes=read,
            io_write_bytes=write_,
            pids=int(pids or 0),
        )

    def close(self) -> None:
        for f in self._files:
            if f is not None:
                f.close()


def _io_totals(service_bytes: bytes) -> tuple[int, int]:
    """Bytes read and written, over every device of a ``blkio.throttle.io_service_bytes``."""
    read = write_ = 0
    for line in service_bytes.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == b"Read":
            read += int(parts[2])
        elif len(parts) == 3 and parts[1] == b"Write":
            write_ += int(parts[2])
    return read, write_
