"""Many jobs at once: right final states, no zombies, no leftover supervisors."""

from __future__ import annotations

import asyncio
import builtins
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from jobworker.runtime import CgroupError, JobSpec, Runtime, State, _jobdir, _lifecycle

from .helpers import children_of, supervisor_pid, zombies_of


async def test_200_concurrent_short_jobs(runtime: Runtime, tmp_path: Path) -> None:
    async with asyncio.timeout(120):
        specs = [JobSpec(["/bin/sh", "-c", f"exit {i % 7}"]) for i in range(200)]
        started = await asyncio.gather(*(runtime.run(s) for s in specs))
        finals = await asyncio.gather(*(runtime.wait(s.id) for s in started))
    assert [f.state for f in finals] == [State.EXITED] * 200
    assert [f.exit_code for f in finals] == [i % 7 for i in range(200)]
    launcher = runtime._launcher._proc.pid  # noqa: SLF001 - checking what it leaves behind
    assert zombies_of({os.getpid(), launcher}) == []
    # Every supervisor has ended and been reaped: what is left is at most the standby, the
    # supervisor forked ahead for the next job.
    left = set(children_of(launcher))
    assert len(left) <= 1
    assert not left & {supervisor_pid(tmp_path / "state", s.id) for s in started}


async def test_500_concurrent_launches_all_start(runtime: Runtime) -> None:
    # More launches than the launcher socket's queue holds (net.unix.max_dgram_qlen): senders
    # must wait for room without losing each other's wake-ups.
    async with asyncio.timeout(120):
        started = await asyncio.gather(
            *(runtime.run(JobSpec(["sleep", "600"])) for _ in range(500))
        )
        assert {s.state for s in started} == {State.RUNNING}
        finals = await asyncio.gather(*(runtime.stop(s.id, grace=0) for s in started))
    assert {f.state for f in finals} == {State.STOPPED}


async def test_create_status_and_listing_read_no_cgroup_file(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quota, authorization and listing come from memory: with running and ended jobs
    around, creating a job, asking whose a job is and listing read no cgroup file (a
    create used to read the usage of every job of its owner, issue 15)."""
    async with asyncio.timeout(60):
        running = [await runtime.run(JobSpec(["sleep", "600"])) for _ in range(5)]
        ended = await runtime.run(JobSpec(["true"]))
        await runtime.wait(ended.id)
        await runtime.settled()  # its cgroup removed: that reads cgroup files, rightly
        opened: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def counting_open(path: Any, *args: Any, **kw: Any) -> Any:
            opened.append(str(path))
            return real_open(path, *args, **kw)

        def counting_os_open(path: Any, *args: Any, **kw: Any) -> int:
            opened.append(str(path))
            return real_os_open(path, *args, **kw)

        with monkeypatch.context() as patch:
            patch.setattr(builtins, "open", counting_open)
            patch.setattr(os, "open", counting_os_open)
            created = await runtime.create(JobSpec(["true"]), max_active=100)
            assert runtime.owner_of(running[0].id) == "local"
            await runtime.status(ended.id)
            listed = await runtime.jobs()
        assert len(listed) == 7
        assert [p for p in opened if p.startswith("/sys/fs/cgroup")] == []
        assert opened, "the counter saw no file opened at all (the create writes spec.json)"
        await runtime.remove(created.id)
        for job in running:
            await runtime.stop(job.id, grace=0)


async def test_ends_are_handled_while_cgroup_removals_lag(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cgroup the kernel is slow to let go of (an injected fault: busy until released)
    must not hold up other jobs' ends and creates: more lagging removals than the worker
    threads there are, and another job still stops, and a new one is still created."""
    driver = runtime._cgroups  # noqa: SLF001 - the fault goes into the driver's job cgroups
    assert driver is not None
    cgroup_class = type(driver.find("x"))
    real_remove = cgroup_class.remove
    released = threading.Event()
    stuck: set[str] = set()

    def lagging_remove(self: Any, timeout: float) -> bool:
        if released.is_set() or not any(i in str(self.paths) for i in stuck):
            return real_remove(self, timeout)
        released.wait(timeout)  # what a blocking wait for the kernel would do
        raise CgroupError("cgroup busy (injected)")

    monkeypatch.setattr(cgroup_class, "remove", lagging_remove)
    async with asyncio.timeout(60):
        lagging = [await runtime.run(JobSpec(["sleep", "600"])) for _ in range(12)]
        stuck.update(j.id for j in lagging)
        await asyncio.gather(*(runtime.stop(j.id, grace=0) for j in lagging))
        other = await runtime.run(JobSpec(["sleep", "600"]))
        assert (await runtime.stop(other.id, grace=0)).state is State.STOPPED
        created = await runtime.create(JobSpec(["true"]))
        assert created.state is State.CREATED
        released.set()
        await runtime.settled()


async def test_a_start_and_a_stop_free_no_inode_of_the_job(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On ext4 without a journal, every freed inode slows the files created after it in
    its block group for a minute or more (docs/benchmarks.md, (s)). A job created with its
    start writes spec.json once, where a rewrite would free the first one's inode; its
    supervisor leaves its control socket, dead, to go with the job's directory."""
    written: list[str] = []
    real_write = _jobdir.write_record

    def counting_write(directory: str, name: str, *args: Any, **kw: Any) -> None:
        written.append(name)
        real_write(directory, name, *args, **kw)

    monkeypatch.setattr(_lifecycle, "write_record", counting_write)
    async with asyncio.timeout(60):
        job = await runtime.run(JobSpec(["sleep", "600"]))
        assert written == ["spec.json"]
        assert (await runtime.stop(job.id, grace=0)).state is State.STOPPED
        created = await runtime.create(JobSpec(["true"]))
        await runtime.start(created.id)
        await runtime.wait(created.id)
    # Created first and started later, a job is on record twice: at its create and with
    # its launch.
    assert written.count("spec.json") == 3
    job_dir = os.path.join(runtime._config.state_dir, "jobs", job.id)  # noqa: SLF001 - the job's own directory
    # Through a descriptor of the directory: the path is over AF_UNIX's 108 bytes.
    dir_fd = os.open(job_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX) as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(f"/proc/self/fd/{dir_fd}/control.sock")
    finally:
        os.close(dir_fd)
