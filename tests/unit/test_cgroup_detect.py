"""Layout detection from /proc/self/mountinfo and /proc/self/cgroup as the kernel writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobworker.runtime.cgroups import CgroupError, Layout, detect

V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID_MOUNTS = (
    "30 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    "31 25 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    "32 25 0:29 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n"
    "33 25 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
)
HYBRID_CGROUP = "4:memory:/svc/a\n2:cpuacct:/\n1:cpu:/\n0::/svc\n"


def run(tmp_path: Path, mounts: str, cgroups: str) -> Layout:
    (tmp_path / "mountinfo").write_text(mounts)
    (tmp_path / "cgroup").write_text(cgroups)
    return detect(str(tmp_path / "mountinfo"), str(tmp_path / "cgroup"))


def test_pure_v2(tmp_path: Path) -> None:
    layout = run(tmp_path, V2_MOUNTS, "0::/system.slice/jobworker.service\n")
    assert layout.kind == "v2"
    assert layout.unified is not None
    assert layout.unified.own_dir == "/sys/fs/cgroup/system.slice/jobworker.service"


def test_hybrid_with_separate_cpu_and_cpuacct(tmp_path: Path) -> None:
    layout = run(tmp_path, HYBRID_MOUNTS, HYBRID_CGROUP)
    assert layout.kind == "hybrid"
    assert layout.v1["memory"].own_dir == "/sys/fs/cgroup/memory/svc/a"
    assert layout.v1["cpu"].mount != layout.v1["cpuacct"].mount
    assert layout.unified is not None
    assert layout.unified.own_dir == "/sys/fs/cgroup/unified/svc"


def test_pure_v1_with_joined_cpu_cpuacct(tmp_path: Path) -> None:
    mounts = (
        "31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "33 25 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    layout = run(tmp_path, mounts, "3:cpu,cpuacct:/x\n2:memory:/x\n")
    assert layout.kind == "v1"
    assert layout.v1["cpu"] == layout.v1["cpuacct"]


def test_container_with_its_own_cgroup_root(tmp_path: Path) -> None:
    # Inside a cgroup namespace the mount shows a sub-tree; own paths are relative to it.
    mounts = "29 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    layout = run(tmp_path, mounts, "0::/docker/abc/app\n")
    assert layout.unified is not None
    assert layout.unified.own_dir == "/sys/fs/cgroup/app"


def test_no_cgroups_mounted_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        CgroupError, match=r"no cgroup hierarchy is mounted.*\[cgroups\] enabled = false"
    ):
        run(tmp_path, "22 1 0:21 / /proc rw - proc proc rw\n", "0::/\n")
