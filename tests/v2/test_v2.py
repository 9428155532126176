"""What only pure cgroup v2 has: the server-in-a-leaf rule and cgroup.kill.

Runs inside tools/v2vm (pure cgroup v2 kernel); skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from jobworker.runtime import CgroupError, Runtime, State

from ..conftest import IN_V2VM, make_config
from ..runtime.helpers import is_gone, pid_namespace_members, py, read_until

pytestmark = pytest.mark.skipif(not IN_V2VM, reason="needs a pure cgroup v2 kernel (v2vm)")


def own_cgroup(pid: int | str = "self") -> str:
    line = Path(f"/proc/{pid}/cgroup").read_text().strip()
    return line.split("::", 1)[1]


async def test_server_moves_into_a_leaf_before_enabling_controllers(tmp_path: Path) -> None:
    before = own_cgroup()
    config = make_config(tmp_path / "state")
    async with asyncio.timeout(60), await Runtime.open(config) as rt:
        assert rt.cgroup_kind == "v2"
        parent = before.removesuffix("/supervisor")
        assert own_cgroup() == f"{parent}/supervisor"
        launcher = rt._launcher._proc.pid  # noqa: SLF001 - where the launcher lives
        assert own_cgroup(launcher) == f"{parent}/supervisor"
        controllers = Path(f"/sys/fs/cgroup{parent}/cgroup.subtree_control").read_text().split()
        assert {"cpu", "memory", "io", "pids"} <= set(controllers)
        job = await rt.run(py("import time; print('up', flush=True); time.sleep(600)"))
        await read_until(rt, job.id, b"up")
        assert job.pid is not None
        assert own_cgroup(job.pid) == f"{parent}/{config.cgroup_subtree}/{job.id}"
        await rt.stop(job.id, grace=0)


async def test_sigkill_goes_through_cgroup_kill(tmp_path: Path) -> None:
    code = """
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("escaped", flush=True)
            time.sleep(600)
        time.sleep(600)
    """
    config = make_config(tmp_path / "state")
    async with asyncio.timeout(60), await Runtime.open(config) as rt:
        job = await rt.run(py(code))
        await read_until(rt, job.id, b"escaped")
        assert job.pid is not None
        job_procs = [p for p in pid_namespace_members(job.pid) if p != job.pid] + [job.pid]
        pidfds = [os.pidfd_open(p) for p in job_procs]
        kill_file = Path(f"/sys/fs/cgroup{own_cgroup(job.pid)}/cgroup.kill")
        assert kill_file.exists()
        try:
            await rt.signal(job.id, signal.SIGKILL)
            final = await rt.wait(job.id)
            assert all(is_gone(fd) for fd in pidfds[-2:])
        finally:
            for fd in pidfds:
                os.close(fd)
    assert final.state is State.EXITED
    assert final.signal == signal.SIGKILL


async def test_missing_controller_is_a_clear_start_up_error(tmp_path: Path) -> None:
    root = Path(f"/sys/fs/cgroup{own_cgroup()}").parent
    outer = root / f"no-io-{os.getpid()}"
    outer.mkdir()
    try:
        (outer / "cgroup.subtree_control").write_text("+cpu +memory +pids")
        inner = outer / "parent"
        inner.mkdir()
        config = make_config(tmp_path / "state", cgroup_parent=str(inner)[len("/sys/fs/cgroup") :])
        with pytest.raises(CgroupError, match=r"controller\(s\) io are not available.*Delegate"):
            await Runtime.open(config)
        inner.rmdir()
    finally:
        outer.rmdir()


async def test_parent_shared_with_other_processes_is_refused(tmp_path: Path) -> None:
    root = Path(f"/sys/fs/cgroup{own_cgroup()}").parent
    shared = root / f"shared-{os.getpid()}"
    shared.mkdir()
    other = subprocess.Popen(["/bin/sleep", "600"])  # noqa: ASYNC220 - a bystander to refuse
    try:
        (shared / "cgroup.procs").write_text(str(other.pid))
        config = make_config(tmp_path / "state", cgroup_parent=str(shared)[len("/sys/fs/cgroup") :])
        with pytest.raises(CgroupError, match=f"processes jobworker did not start \\({other.pid}"):
            await Runtime.open(config)
    finally:
        other.kill()
        other.wait()
        shared.rmdir()
