"""Resource limits enforced by real kernel cgroups, usage and OOM reported, cgroups cleaned up.

The same tests run on this host's layout (hybrid here) and, through tools/v2vm, on a pure
cgroup v2 kernel. Tolerances are stated where a rate is measured.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jobworker.runtime import (
    ExecSpec,
    InvalidSpecError,
    IOLimit,
    JobSpec,
    Limits,
    RunAs,
    Runtime,
    State,
)
from jobworker.runtime.cgroups._detect import detect

from ..conftest import cgroup_dirs, make_config
from .helpers import collect, is_gone, joined, pid_namespace_members, py, read_until

MIB = 1 << 20
# In the v2 VM the IO test writes to the VM's spare virtio disk (as root); on a host it
# writes a file in a directory on the state disk, which must be a real block device.
IO_DEVICE = os.environ.get("V2VM_DISK")


async def test_cpu_quota_holds_a_busy_loop(runtime: Runtime) -> None:
    code = """
        import time
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pass
    """
    async with asyncio.timeout(60):
        job = await runtime.run(py(code, limits=Limits(cpus=0.25)))
        final = await runtime.wait(job.id)
    assert final.exit_code == 0
    assert final.usage is not None
    assert final.started_at is not None
    assert final.ended_at is not None
    # The job is CPU-bound from exec to exit (interpreter start-up included), so over its
    # whole life it uses 25% of one CPU; allow 18-32% for CFS period granularity.
    lifetime = (final.ended_at - final.started_at).total_seconds()
    share = final.usage.cpu_seconds / lifetime
    assert lifetime >= 2.0
    assert 0.18 <= share <= 0.32, f"{share:.0%} of a CPU over {lifetime:.2f} s"


async def test_memory_limit_ooms_and_reports_it(runtime: Runtime) -> None:
    code = """
        blocks = []
        for _ in range(512):
            blocks.append(bytearray(1 << 20))  # zero-filled: every page is touched
        print("not killed")
    """
    async with asyncio.timeout(60):
        job = await runtime.run(py(code, limits=Limits(memory_bytes=64 * MIB)))
        final = await runtime.wait(job.id)
    assert final.oom_killed is True
    assert final.signal == signal.SIGKILL
    assert final.usage is not None
    assert final.usage.memory_peak_bytes is None or final.usage.memory_peak_bytes <= 64 * MIB


async def test_pids_limit_contains_a_fork_bomb(runtime: Runtime) -> None:
    code = """
        import os, signal
        forked = 0
        try:
            while True:
                if os.fork() == 0:
                    signal.pause()
                    os._exit(0)
                forked += 1
        except OSError as e:
            print(f"stopped after {forked} forks: {e.strerror}", flush=True)
        signal.pause()
    """
    async with asyncio.timeout(60):
        job = await runtime.run(py(code, limits=Limits(pids=20)))
        out = await read_until(runtime, job.id, b"forks")
        assert job.pid is not None
        members = pid_namespace_members(job.pid)
        pidfds = [os.pidfd_open(p) for p in members]
        try:
            assert len(members) <= 21  # 20 tasks in the cgroup, plus the supervisor outside it
            assert b"stopped after 19 forks" in out
            os.close(os.pidfd_open(os.getpid()))  # the host can still create processes
            final = await runtime.stop(job.id, grace=1)
            assert all(is_gone(fd) for fd in pidfds)
        finally:
            for fd in pidfds:
                os.close(fd)
    assert final.state is State.STOPPED
    assert final.pids_limited  # reported, as an OOM kill is (pids.events "max")


async def test_an_exec_counts_against_the_jobs_pids_limit(runtime: Runtime) -> None:
    """A process exec'd into a job is in the job's cgroups (v1 and v2): it and its forks
    count, so of five sleeps it forks, only two fit beside the job's own task and it."""
    async with asyncio.timeout(60):
        job = await runtime.run(JobSpec(argv=["sleep", "1000"], limits=Limits(pids=4)))
        script = "for i in 1 2 3 4 5; do sleep 1000 & echo forked; done"
        process = await runtime.exec(job.id, ExecSpec(argv=["sh", "-c", script]))
        try:
            out = b""
            while (piece := await process.read()) is not None:
                out += piece[1]
            status = await process.wait()
        finally:
            process.close()
        assert out.count(b"forked") == 2, out
        assert b"Cannot fork" in out
        assert status == 2  # dash gives up at the fork that fails
        final = await runtime.stop(job.id, grace=1)
    assert final.pids_limited


async def test_a_jobs_command_is_in_the_jobs_cgroup_of_every_hierarchy(runtime: Runtime) -> None:
    """Born in the job's v2 cgroup, it joins the v1 ones itself (through their ``tasks``
    files): the host's /proc/PID/cgroup names the job's cgroup in each hierarchy used."""
    layout = detect()
    used = {"cpu", "cpuacct", "memory", "blkio", "pids"} & set(layout.v1)
    if layout.unified is not None:
        used.add("")  # the v2 line, "0::/path"
    async with asyncio.timeout(60):
        job = await runtime.run(JobSpec(argv=["sleep", "1000"]))
        assert job.pid is not None
        lines = Path(f"/proc/{job.pid}/cgroup").read_text().splitlines()
        await runtime.stop(job.id, grace=0)
    seen: dict[str, str] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        seen |= {c: path for c in controllers.split(",") if c in used}
    assert set(seen) == used, lines
    assert all(path.endswith(f"/{job.id}") for path in seen.values()), lines


FORK_IN = """
import os, sys
from jobworker.runtime._preexec import fork_in_cgroup
r, w = os.pipe()
pid, born = fork_in_cgroup(sys.argv[1])
if pid == 0:
    # The child's first act: where is it? It has written nothing to get there.
    with open("/proc/self/cgroup", "rb") as f:
        os.write(w, f.read())
    os._exit(0)
os.close(w)
line = next(l for l in os.read(r, 65536).decode().splitlines() if l.startswith("0::"))
os.waitpid(pid, 0)
print(born, line[3:])
"""


def test_a_process_forked_in_a_cgroup_is_there_from_birth(tmp_path: Path) -> None:
    """fork_in_cgroup (clone3, CLONE_INTO_CGROUP) puts the child in the cgroup as it is
    made; a directory that is no cgroup gets a plain fork, and says so. In a process of
    its own: the clone is for single-threaded callers, and pytest's is not."""
    unified = detect().unified
    if unified is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    target = os.path.join(unified.own_dir, f"jobworker-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(target)
    try:
        for directory, born in ((target, True), (str(tmp_path), False)):
            out = subprocess.run(
                [sys.executable, "-c", FORK_IN, directory],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.split()
            assert out[0] == str(born)
            there = "/" + os.path.relpath(target, unified.mount)
            assert (out[1] == there) is born, out
    finally:
        os.rmdir(target)


IO_WRITER = """
import mmap, os, sys, time
path, total = sys.argv[1], int(sys.argv[2])
block = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT needs
block.write(b"x" * (1 << 20))
flags = os.O_WRONLY | os.O_DIRECT | (0 if path.startswith("/dev/") else os.O_CREAT | os.O_TRUNC)
fd = os.open(path, flags, 0o600)
start = time.monotonic()
for _ in range(total >> 20):
    os.write(fd, block)
elapsed = time.monotonic() - start
os.close(fd)
print(f"{total / elapsed:.0f}")
"""


async def test_io_write_limit_throttles_direct_writes(tmp_path: Path, public_dir: Path) -> None:
    rate, total = 4 * MIB, 12 * MIB
    kw: dict[str, object] = {}
    if IO_DEVICE is not None:
        target, cwd = IO_DEVICE, "/"
        major_minor = os.environ["V2VM_DISK_MAJMIN"]
        limits = Limits(io=(IOLimit(major_minor, write_bps=rate),))
        # The raw disk: only outside the sandbox, whose /dev has no block devices.
        kw = {"owner_run_as": {"root": RunAs(0, 0)}, "allow_root": True, "sandbox": False}
        owner = "root"
    else:
        target, cwd = str(public_dir / "io.bin"), str(public_dir)
        limits = Limits(io=(IOLimit(write_bps=rate),))  # the device of cwd
        os.chmod(public_dir, 0o777)  # noqa: S103 - the job (nobody) writes its file here
        owner = "local"
    config = make_config(tmp_path / "state", **kw)
    async with asyncio.timeout(60), await Runtime.open(config) as rt:
        job = await rt.run(py(IO_WRITER, target, str(total), cwd=cwd, limits=limits, owner=owner))
        final = await rt.wait(job.id)
        out = joined(await collect(rt, job.id))
    assert final.exit_code == 0, out
    measured = float(out)
    # The throttle lets a short burst through at the start; over 12 MiB at 4 MiB/s the rate
    # must stay well under twice the limit (unthrottled, this disk does hundreds of MB/s).
    assert measured < 2 * rate, f"{measured / MIB:.1f} MiB/s against a {rate / MIB} MiB/s limit"
    assert final.usage is not None
    assert final.usage.io_write_bytes >= total


async def test_usage_is_live_while_running(runtime: Runtime) -> None:
    code = """
        import time
        data = bytearray(32 << 20)
        # CPU time, not wall time: on a loaded host 0.3 s of wall time is less CPU.
        while time.process_time() < 0.3:
            pass
        print("busy done", flush=True)
        time.sleep(600)
    """
    async with asyncio.timeout(30):
        job = await runtime.run(py(code))
        await read_until(runtime, job.id, b"busy done")
        status = await runtime.status(job.id)
        listed = next(s for s in await runtime.jobs() if s.id == job.id)
        await runtime.stop(job.id, grace=0)
    assert status.usage is not None
    assert status.usage.cpu_seconds >= 0.2
    assert status.usage.memory_bytes >= 32 * MIB
    # A listing reads no cgroup: live usage is for status alone (issue 15).
    assert listed.usage is None


async def test_defaults_and_maxima(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "state",
        default_limits=Limits(memory_bytes=256 * MIB),
        max_limits=Limits(memory_bytes=512 * MIB, pids=100),
    )
    async with asyncio.timeout(30), await Runtime.open(config) as rt:
        job = await rt.create(JobSpec(["/bin/true"]))
        assert job.limits.memory_bytes == 256 * MIB  # the default
        assert job.limits.pids == 100  # unset, capped at the maximum
        with pytest.raises(InvalidSpecError, match="above the server maximum"):
            await rt.create(JobSpec(["/bin/true"], limits=Limits(memory_bytes=1024 * MIB)))
        with pytest.raises(InvalidSpecError, match="not a block device"):
            await rt.create(JobSpec(["/bin/true"], limits=Limits(io=(IOLimit("1:255", 1),))))


async def test_without_cgroups_limits_are_not_enforced(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state", cgroups=False)
    async with asyncio.timeout(30), await Runtime.open(config) as rt:
        job = await rt.run(JobSpec(["/bin/true"], limits=Limits(memory_bytes=64 * MIB)))
        final = await rt.wait(job.id)
    assert rt.cgroup_kind is None
    assert final.limits_enforced is False
    assert final.exit_code == 0


async def test_a_clean_close_removes_job_cgroups_a_removal_left(tmp_path: Path) -> None:
    # As a job cgroup whose removal gave up (a v1 hierarchy slow to let go) leaves it.
    config = make_config(tmp_path / "state")
    leftover = "00000000-0000-4000-8000-000000000001"
    async with asyncio.timeout(60), await Runtime.open(config) as rt:
        job = await rt.run(JobSpec(["/bin/true"]))
        await rt.wait(job.id)
        for base in cgroup_dirs(config.cgroup_subtree):
            os.mkdir(os.path.join(base, leftover))
    assert cgroup_dirs(config.cgroup_subtree) == []


@pytest.mark.slow
async def test_1000_jobs_leave_no_cgroup_behind(tmp_path: Path) -> None:
    # Cgroup cleanup at scale, without the sandbox's thirty mounts per job: under the v2
    # VM's emulation those alone outlast the suite's budget (their cost is bench row (e')).
    config = make_config(tmp_path / "state", sandbox=False)
    async with asyncio.timeout(300), await Runtime.open(config) as rt:
        for _ in range(10):
            batch = await asyncio.gather(*(rt.run(JobSpec(["/bin/true"])) for _ in range(100)))
            finals = await asyncio.gather(*(rt.wait(s.id) for s in batch))
            assert {f.exit_code for f in finals} == {0}
    assert cgroup_dirs(config.cgroup_subtree) == []
