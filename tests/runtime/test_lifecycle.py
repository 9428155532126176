"""Exit codes, start failures, env and cwd, create/start, wait and watch, on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from asyncinotify import Inotify, Mask

from jobworker._aio import wait_fd
from jobworker.runtime import (
    InvalidSpecError,
    JobAlreadyStartedError,
    JobNotFoundError,
    JobNotRunningError,
    JobSpec,
    Limits,
    Runtime,
    State,
    Stream,
    _lifecycle,
)
from jobworker.runtime._errors import LaunchError
from jobworker.runtime._protocol import MAX_ORDER_BYTES, LaunchOrder, Report
from jobworker.runtime.cgroups import CgroupError
from jobworker.runtime.cgroups import _v1 as cgroups_v1
from jobworker.runtime.cgroups import _v2 as cgroups_v2

from ..conftest import cgroup_dirs, make_config, opened
from .helpers import collect, joined, py, read_until, supervisor_pid


@pytest.mark.parametrize("code", [0, 1, 255])
async def test_exit_code_is_reported(runtime: Runtime, code: int) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py(f"raise SystemExit({code})"))
        final = await runtime.wait(job.id)
    assert final.state is State.EXITED
    assert final.exit_code == code
    assert final.signal is None
    assert final.started_at is not None
    assert final.ended_at is not None
    assert final.created_at <= final.started_at <= final.ended_at


async def test_killed_by_signal_is_reported(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
        final = await runtime.wait(job.id)
    assert final.state is State.EXITED
    assert final.signal == signal.SIGSEGV
    assert final.exit_code is None


async def test_missing_executable_fails_with_reason(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(JobSpec(["no-such-command-jw"]))
    assert job.state is State.FAILED
    assert "'no-such-command-jw' not found" in (job.error or "")
    assert (await runtime.wait(job.id)).state is State.FAILED


async def test_non_executable_file_fails_with_os_error(runtime: Runtime, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    async with asyncio.timeout(30):
        job = await runtime.run(JobSpec([str(script)]))
    assert job.state is State.FAILED
    assert "Permission denied" in (job.error or "")
    assert str(script) in (job.error or "")


async def test_missing_workdir_fails_with_reason(runtime: Runtime, public_dir: Path) -> None:
    missing = str(public_dir / "no" / "such" / "dir")  # inside a path the job is shown
    async with asyncio.timeout(30):
        job = await runtime.run(JobSpec(["/bin/true"], cwd=missing))
    assert job.state is State.FAILED
    assert f"working directory {missing!r}" in (job.error or "")
    assert "No such file or directory" in (job.error or "")


async def test_a_workdir_the_job_cannot_see_is_refused_up_front(runtime: Runtime) -> None:
    with pytest.raises(InvalidSpecError, match="'/no/such/dir' does not exist inside the job"):
        await runtime.run(JobSpec(["/bin/true"], cwd="/no/such/dir"))


async def test_env_and_cwd_are_honoured(runtime: Runtime, public_dir: Path) -> None:
    spec = py(
        "import os; print(os.getcwd()); print(os.environ['GREETING']); print(os.environ['PATH'])",
        env={"GREETING": "hello world"},
        cwd=str(public_dir),
    )
    async with asyncio.timeout(30):
        job = await runtime.run(spec)
        out = joined(await collect(runtime, job.id)).decode().splitlines()
    assert out[0] == str(public_dir)
    assert out[1] == "hello world"
    assert "/usr/bin" in out[2]


async def test_server_environment_does_not_leak_into_job(runtime: Runtime) -> None:
    os.environ["JW_SECRET_TEST"] = "leak"  # noqa: S105 - a marker, not a secret
    try:
        async with asyncio.timeout(30):
            job = await runtime.run(py("import os; print(sorted(os.environ))"))
            out = joined(await collect(runtime, job.id)).decode()
    finally:
        del os.environ["JW_SECRET_TEST"]
    assert "JW_SECRET_TEST" not in out
    assert "JOBWORKER_JOB_ID" in out


async def test_stdin_is_dev_null_and_no_fd_leaks(runtime: Runtime) -> None:
    leaked = os.open("/dev/null", os.O_RDONLY)  # inheritable in the server: must not reach jobs
    os.set_inheritable(leaked, True)
    try:
        code = """
            import os, sys
            print(repr(sys.stdin.read()))
            print(os.readlink('/proc/self/fd/0'))
            print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))
        """
        async with asyncio.timeout(30):
            job = await runtime.run(py(code))
            out = joined(await collect(runtime, job.id)).decode().splitlines()
    finally:
        os.close(leaked)
    assert out[0] == "''"
    assert out[1] == "/dev/null"
    # 0-2, plus the one listdir itself opens.
    assert out[2] == "[0, 1, 2, 3]"


async def test_create_then_start(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        created = await runtime.create(py("print('late')"))
        assert created.state is State.CREATED
        assert (await runtime.status(created.id)).started_at is None
        assert await collect(runtime, created.id, follow=False) == []
        started = await runtime.start(created.id)
        assert started.state in {State.RUNNING, State.EXITED}
        final = await runtime.wait(created.id)
        assert joined(await collect(runtime, created.id)) == b"late\n"
    assert final.exit_code == 0


async def test_start_twice_is_refused(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py("pass"))
        await runtime.wait(job.id)
        with pytest.raises(JobAlreadyStartedError, match="already been started"):
            await runtime.start(job.id)


async def test_stop_of_created_job_is_refused(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.create(py("pass"))
        with pytest.raises(JobNotRunningError, match="has not been started"):
            await runtime.stop(job.id)


async def test_unknown_and_malformed_ids(runtime: Runtime) -> None:
    async with asyncio.timeout(10):
        with pytest.raises(JobNotFoundError):
            await runtime.status("00000000-0000-0000-0000-000000000000")
        with pytest.raises(JobNotFoundError):
            await runtime.status("../../etc/passwd")
        with pytest.raises(JobNotFoundError):
            await runtime.wait("nope")


async def test_watch_yields_every_transition(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.create(py("import sys; sys.stdout.write('x')"))
        watcher = asyncio.ensure_future(_states(runtime, job.id))
        await runtime.start(job.id)
        states = await watcher
    assert states == [State.CREATED, State.RUNNING, State.EXITED]


async def _states(runtime: Runtime, job_id: str) -> list[State]:
    return [s.state async for s in runtime.watch(job_id)]


async def test_watch_of_ended_job_yields_history_and_ends(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(JobSpec(["no-such-command-jw"]))
        assert await _states(runtime, job.id) == [State.CREATED, State.FAILED]


async def test_list_filters_by_owner(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        a = await runtime.create(py("pass", owner="alice"))
        b = await runtime.create(py("pass", owner="bob"))
        assert [s.id for s in await runtime.jobs()] == [a.id, b.id]
        assert [s.id for s in await runtime.jobs(owner="bob")] == [b.id]
        assert await runtime.jobs(owner="carol") == []


async def test_signal_reaches_the_job(runtime: Runtime) -> None:
    code = """
        import os, signal
        # os.write, not print: the signal may land while print('ready') is still inside
        # stdout's buffer, and a second print there raises "reentrant call".
        def on_usr1(signum, frame):
            os.write(1, b'got usr1\\n')
            os._exit(7)
        signal.signal(signal.SIGUSR1, on_usr1)
        print('ready', flush=True)
        signal.pause()
    """
    async with asyncio.timeout(30):
        job = await runtime.run(py(code))
        await read_until(runtime, job.id, b"ready")
        await runtime.signal(job.id, signal.SIGUSR1)
        final = await runtime.wait(job.id)
        out = joined(await collect(runtime, job.id), Stream.STDOUT)
    assert final.state is State.EXITED
    assert final.exit_code == 7
    assert out == b"ready\ngot usr1\n"


async def test_start_cancelled_mid_launch_still_tracks_the_job(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.create(py("print('ran')"))
        job_dir = os.path.join(runtime._config.state_dir, "jobs", job.id)  # noqa: SLF001 - where to watch
        with Inotify() as inotify:
            inotify.add_watch(job_dir, Mask.CREATE)
            starting = asyncio.ensure_future(runtime.start(job.id))
            # The supervisor binds its control socket before it execs the command: from here
            # on the job exists, whatever happens to the caller of start().
            async for event in inotify:
                if event.name is not None and str(event.name) == "control.sock":
                    break
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        final = await runtime.wait(job.id)
        out = joined(await collect(runtime, job.id))
    assert final.state is State.EXITED
    assert out == b"ran\n"


async def test_a_launch_order_too_long_for_the_launcher_is_refused_whole(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Cut to the launcher's read size, an order could name a parent cgroup of the job's."""
    launcher = runtime._launcher  # noqa: SLF001 - the guard sits below the runtime's API
    huge = LaunchOrder(str(tmp_path), 1, "none", None, None, "/" + "x" * MAX_ORDER_BYTES)
    async with asyncio.timeout(30):
        with pytest.raises(LaunchError, match=f"over the {MAX_ORDER_BYTES} the launcher reads"):
            await launcher.launch(huge, 10)
        # Past the server's check, the launcher refuses it as well.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        with ours:
            try:
                await launcher._send(huge.encode(), theirs.fileno())  # noqa: SLF001 - as above
            finally:
                theirs.close()
            report = Report.decode(await asyncio.get_running_loop().sock_recv(ours, 65536))
        assert report.error == "the job's launch order was cut short"
        assert not tmp_path.joinpath("log").exists()  # no supervisor ever ran there
        job = await runtime.run(JobSpec(["true"]))
        assert (await runtime.wait(job.id)).state is State.EXITED


async def test_a_job_whose_cgroup_cannot_be_made_is_failed_and_on_record(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Created with its start, a job is recorded by its launch: a cgroup that cannot be
    made (an injected fault) still leaves it on disk, failed, with the reason."""
    driver = runtime._cgroups  # noqa: SLF001 - the fault goes into the cgroup driver
    assert driver is not None

    def refuse(job_id: str, _limits: object, **_made: bool) -> None:
        raise CgroupError(f"cannot create the cgroup of {job_id} (injected)")

    monkeypatch.setattr(driver, "create", refuse)
    async with asyncio.timeout(30):
        with pytest.raises(LaunchError, match="could not set up the job's cgroup"):
            await runtime.run(JobSpec(["true"]))
        (job,) = await runtime.jobs()
        assert job.state is State.FAILED
        assert "could not set up the job's cgroup" in (job.error or "")
    job_dir = Path(runtime._config.state_dir, "jobs", job.id)  # noqa: SLF001 - its records
    assert sorted(p.name for p in job_dir.iterdir() if not p.name.startswith(".")) == [
        "exit.json",
        "spec.json",
    ]


async def test_the_next_job_failing_its_limits_takes_its_cgroup_made_ahead_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next job's cgroup, made ahead with its command waiting in it, refusing the job's
    limits (an injected fault): the job is failed with the reason, and the cgroup goes
    with it once the standby lets that command go for the job named next."""
    config = make_config(tmp_path / "state", spare_roots=False)
    async with opened(config) as rt:
        _command, next_id = await _command_ahead(await _standby(rt, set()))

        def refuse(_dirs: object, limits: Limits) -> None:
            if limits != Limits():  # the next job's own cgroup, made with none, still works
                raise CgroupError("cannot write the job's limits (injected)")

        for driver in (cgroups_v1, cgroups_v2):
            monkeypatch.setattr(driver, "_apply", refuse)
        async with asyncio.timeout(30):
            with pytest.raises(LaunchError, match="could not set up the job's cgroup"):
                await rt.run(JobSpec(["true"], limits=Limits(pids=10)))
            (job,) = await rt.jobs()
            assert (job.id, job.state) == (next_id, State.FAILED)
            while any((Path(d) / next_id).exists() for d in cgroup_dirs(config.cgroup_subtree)):  # noqa: ASYNC110 - cgroupfs cannot be watched
                await asyncio.sleep(0.05)


def _launcher_children(rt: Runtime) -> set[int]:
    pid = rt._launcher._proc.pid  # noqa: SLF001 - the standby is the launcher's own business
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def _standby(rt: Runtime, besides: set[int]) -> int:
    """The pid of the launcher's standby supervisor: its child that is not in ``besides``
    (the supervisors of running jobs). Checked every 10 ms, 30 s at most: nothing
    announces its fork."""
    async with asyncio.timeout(30):
        while not (waiting := _launcher_children(rt) - besides):  # noqa: ASYNC110 - /proc cannot be watched
            await asyncio.sleep(0.01)
    (pid,) = waiting
    return pid


async def test_a_job_goes_to_the_supervisor_forked_ahead_of_it(tmp_path: Path) -> None:
    """The launcher keeps a supervisor forked before any job asks for it; a launch hands
    the job to it, and the next one is forked."""
    state = tmp_path / "state"
    async with opened(make_config(state, spare_roots=False)) as rt:
        ahead = await _standby(rt, set())
        job = await rt.run(py("import time; print('up', flush=True); time.sleep(600)"))
        await read_until(rt, job.id, b"up")
        assert supervisor_pid(state, job.id) == ahead
        assert await _standby(rt, {ahead}) != ahead
        await rt.stop(job.id, grace=0)


async def _kill(pid: int) -> None:
    """SIGKILL a process this test's runtime forked, and wait until it is gone."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            await wait_fd(pidfd)
    finally:
        os.close(pidfd)


async def test_a_start_goes_on_when_the_supervisor_forked_ahead_is_gone(tmp_path: Path) -> None:
    """A standby killed from outside (the OOM killer, say) costs nothing but its time
    saved: the launch forks the job's supervisor itself."""
    state = tmp_path / "state"
    async with opened(make_config(state, spare_roots=False)) as rt:
        ahead = await _standby(rt, set())
        await _kill(ahead)
        async with asyncio.timeout(30):
            job = await rt.run(JobSpec(["echo", "still here"]))
            final = await rt.wait(job.id)
            out = joined(await collect(rt, job.id))
        assert (final.state, final.exit_code, out) == (State.EXITED, 0, b"still here\n")
        assert supervisor_pid(state, job.id) != ahead


async def _command_ahead(standby: int) -> tuple[int, str]:
    """The standby's child, the command forked ahead for the next job: its pid, and the
    name of the cgroup it was born in (the next job's id). Checked every 10 ms, 30 s at
    most: nothing announces its fork."""
    children = Path(f"/proc/{standby}/task/{standby}/children")
    async with asyncio.timeout(30):
        while not (pids := children.read_text().split()):  # noqa: ASYNC110 - /proc cannot be watched
            await asyncio.sleep(0.01)
    (pid,) = pids
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    unified = next(line for line in lines if line.startswith("0::"))
    return int(pid), unified.rsplit("/", 1)[1]


def _pid_in_job(host_pid: int) -> int:
    """The pid a process has in its own (innermost) PID namespace."""
    status = Path(f"/proc/{host_pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])


async def test_a_job_created_with_its_start_runs_in_the_command_forked_ahead(
    tmp_path: Path,
) -> None:
    """The server names its next job before it exists (its id, its cgroup made); the
    standby forks that job's command there, and the next job created with its start is
    that job: its command is the process that waited, PID 2 of its namespace."""
    state = tmp_path / "state"
    async with opened(make_config(state, spare_roots=False)) as rt:
        standby = await _standby(rt, set())
        command, next_id = await _command_ahead(standby)
        job = await rt.run(py("import time; print('up', flush=True); time.sleep(600)"))
        await read_until(rt, job.id, b"up")
        assert (job.id, job.pid, supervisor_pid(state, job.id)) == (next_id, command, standby)
        assert _pid_in_job(command) == 2
        # The next standby forks a command for the job named next.
        assert (await _command_ahead(await _standby(rt, {standby})))[1] != job.id
        await rt.stop(job.id, grace=0)


async def test_another_jobs_start_leaves_the_standby_to_the_next_job(tmp_path: Path) -> None:
    """A job created first and started later is not the next job: its start forks its
    own supervisor and command, and the standby waits on for the next job."""
    state = tmp_path / "state"
    async with opened(make_config(state, spare_roots=False)) as rt:
        standby = await _standby(rt, set())
        command, next_id = await _command_ahead(standby)
        created = await rt.create(JobSpec(["sleep", "600"]))
        later = await rt.start(created.id)
        assert later.pid is not None
        assert created.id != next_id
        assert supervisor_pid(state, created.id) != standby
        assert _pid_in_job(later.pid) == 2
        assert await _command_ahead(standby) == (command, next_id)
        job = await rt.run(JobSpec(["echo", "next"]))
        assert (job.id, supervisor_pid(state, job.id)) == (next_id, standby)
        async with asyncio.timeout(30):
            assert (await rt.wait(job.id)).exit_code == 0
        assert joined(await collect(rt, job.id)) == b"next\n"
        await rt.stop(created.id, grace=0)


async def test_a_start_goes_on_when_the_command_forked_ahead_is_gone(tmp_path: Path) -> None:
    """A command forked ahead and killed from outside leaves its job to a command forked
    at the launch, still PID 2 of the job's namespace."""
    state = tmp_path / "state"
    async with opened(make_config(state, spare_roots=False)) as rt:
        command, _next_id = await _command_ahead(await _standby(rt, set()))
        await _kill(command)
        job = await rt.run(py("import os, time; print(os.getpid(), flush=True); time.sleep(600)"))
        out = await read_until(rt, job.id, b"\n")
        assert job.pid not in (None, command)
        assert out == b"2\n"
        await rt.stop(job.id, grace=0)


async def test_the_next_job_is_named_once_the_job_launched_has_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next job, and the command forked ahead for it, wait until the job just launched
    has said something (or ended): made at once, they competed with its start. Here the
    job stays silent until the test writes to its stdin, with the wait's cap out of reach."""
    monkeypatch.setattr(_lifecycle, "_SETTLE_S", 600.0)
    state = tmp_path / "state"
    async with opened(make_config(state, spare_roots=False)) as rt:
        first = await _standby(rt, set())
        job = await rt.run(
            py(
                "import sys, time; sys.stdin.readline(); print('up', flush=True); time.sleep(600)",
                stdin="pipe",
            )
        )
        # The launcher forks a standby after a while anyway; it has no job to fork for.
        standby = await _standby(rt, {first})
        children = Path(f"/proc/{standby}/task/{standby}/children")
        for _ in range(20):  # 0.2 s: a next job named at the launch is forked for in ms
            assert children.read_text().split() == []
            await asyncio.sleep(0.01)
        async with asyncio.timeout(30):
            assert await rt.write_stdin(job.id, b"go\n")
            await read_until(rt, job.id, b"up")
        assert (await _command_ahead(standby))[1] not in ("", job.id)
        await rt.stop(job.id, grace=0)


async def test_the_next_job_is_named_after_a_silent_jobs_start_too(tmp_path: Path) -> None:
    """A job that says nothing does not hold the next one back for long."""
    state = tmp_path / "state"
    async with opened(make_config(state, spare_roots=False)) as rt:
        first = await _standby(rt, set())
        job = await rt.run(JobSpec(["sleep", "600"]))
        assert (await _command_ahead(await _standby(rt, {first})))[1] != job.id
        await rt.stop(job.id, grace=0)
