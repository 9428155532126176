"""Where the cgroup hierarchies are mounted, and where in each this process sits."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._files import CgroupError

__all__ = ["Hierarchy", "Layout", "detect"]

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One mounted hierarchy and this process's own cgroup directory in it."""

    mount: str
    own_dir: str


@dataclass(frozen=True, slots=True)
class Layout:
    """``kind`` is "v2" (unified only), "hybrid" (v1 controllers + cgroup2) or "v1"."""

    kind: str
    unified: Hierarchy | None
    v1: dict[str, Hierarchy]


def _own_dir(mount: str, mount_root: str, own_path: str) -> str:
    # mountinfo's root field is the part of the hierarchy the mount shows (not "/" inside a
    # container with its own cgroup namespace); /proc/self/cgroup paths are relative to it.
    rel = os.path.relpath(own_path, mount_root) if mount_root != "/" else own_path.lstrip("/")
    return os.path.normpath(os.path.join(mount, rel))


def _own_cgroups(cgroup_file: str) -> tuple[dict[str, str], str | None]:
    own_v1: dict[str, str] = {}
    own_unified: str | None = None
    with open(cgroup_file) as f:
        for line in f:
            hier_id, controllers, path = line.rstrip("\n").split(":", 2)
            if hier_id == "0" and not controllers:
                own_unified = path
            for controller in controllers.split(","):
                if controller:
                    own_v1[controller] = path
    return own_v1, own_unified


def detect(
    mountinfo: str = "/proc/self/mountinfo", cgroup_file: str = "/proc/self/cgroup"
) -> Layout:
    """Read the mounts and this process's cgroups.

    Raises:
        CgroupError: no cgroup hierarchy is mounted.
    """
    own_v1, own_unified = _own_cgroups(cgroup_file)
    unified: Hierarchy | None = None
    v1: dict[str, Hierarchy] = {}
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            fstype, _source, super_opts = post.split()[:3]
            root, mount = fields[3], fields[4]
            if fstype == "cgroup2" and own_unified is not None:
                unified = Hierarchy(mount, _own_dir(mount, root, own_unified))
            elif fstype == "cgroup":
                for option in super_opts.split(","):
                    if option in V1_CONTROLLERS and option in own_v1:
                        v1[option] = Hierarchy(mount, _own_dir(mount, root, own_v1[option]))
    if v1:
        return Layout("hybrid" if unified else "v1", unified, v1)
    if unified is None:
        raise CgroupError(
            "no cgroup hierarchy is mounted; mount cgroup2 on /sys/fs/cgroup, or set [cgroups] "
            "enabled = false in the configuration (limits are then not enforced)"
        )
    return Layout("v2", unified, {})
