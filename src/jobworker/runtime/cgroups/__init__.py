"""Per-job cgroups: one narrow interface (:class:`CgroupDriver`), v2 and v1/hybrid drivers."""

from __future__ import annotations

import os

from ._base import CgroupDriver, JobCgroup, UsageProbe, resolve_io
from ._detect import Layout, detect
from ._files import CgroupError
from ._v1 import V1Driver
from ._v2 import V2Driver

__all__ = [
    "CgroupDriver",
    "CgroupError",
    "JobCgroup",
    "Layout",
    "UsageProbe",
    "detect",
    "open_driver",
    "resolve_io",
]


def open_driver(subtree: str, parent: str | None = None) -> CgroupDriver:
    """Detect the host's layout and prepare ``subtree`` beneath our own cgroup (or ``parent``,
    an absolute path in the cgroup2 hierarchy, on v2).

    Blocks (file I/O): call it from a worker thread.

    Raises:
        CgroupError: cgroups are not mounted, not writable, or a controller is missing; the
            message says what to do.
    """
    layout = detect()
    if layout.kind == "v2" and layout.unified is not None:
        own = layout.unified.own_dir
        if parent is not None:
            own = os.path.join(layout.unified.mount, parent.lstrip("/"))
        return V2Driver(own, subtree)
    return V1Driver(layout, subtree)
