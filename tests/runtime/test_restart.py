"""Jobs outlive the runtime: a new runtime on the same state dir takes them back.

Each test closes (or abandons) one runtime while its jobs run, changes something while no
runtime watches (the job ends, is OOM-killed, its supervisor is killed), then opens another
and checks what it reports, and that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import signal
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jobworker.runtime import (
    CgroupError,
    InvalidSpecError,
    JobEndedError,
    JobNotFoundError,
    JobRunningError,
    JobSpec,
    Limits,
    Runtime,
    RuntimeConfig,
    State,
    StateDirError,
    _lifecycle,
)

from ..conftest import cgroup_dirs, make_config, opened
from .helpers import collect, joined, py, read_until

# Prints, then waits for SIGUSR1 and exits 3 once it comes; a second line proves the
# signal came through whichever runtime sent it.
# The handlers write with os.write and leave with os._exit: the signal may land while
# print("ready") is still inside stdout's buffer, where a print raises "reentrant call"
# and the job exits 1 (seen in CI, and reproduced under load).
WAITS_FOR_USR1 = """
    import os, signal
    def done(*_):
        os.write(1, b"got usr1\\n")
        os._exit(3)
    signal.signal(signal.SIGUSR1, done)
    print("ready", flush=True)
    while True:
        signal.pause()
"""

TERM_SAYS_BYE = """
    import os, signal
    def bye(*_):
        os.write(1, b"bye\\n")
        os._exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("ready", flush=True)
    while True:
        signal.pause()
"""


async def _wait_pid_gone(pid: int, timeout: float = 30) -> None:
    """Wait (pidfd, no polling) until process ``pid`` has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(pidfd, lambda: None if gone.done() else gone.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await gone
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def _end_unwatched(state_dir: Path, job_id: str, pid: int | None, signum: int) -> None:
    """While no runtime watches: send ``signum`` to ``pid`` (the job's command, a process we
    started) or, if None, to the job's supervisor; return once the supervisor has exited."""
    run = json.loads((state_dir / "jobs" / job_id / "run.json").read_text())
    supervisor: int = run["supervisor_pid"]
    os.kill(supervisor if pid is None else pid, signum)
    await _wait_pid_gone(supervisor)


class Restarts:
    """Opens runtimes on one state dir; at the end, every job has ended and every runtime,
    launcher and cgroup is gone."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.opened: list[Runtime] = []

    async def open(self) -> Runtime:
        async with asyncio.timeout(60):
            rt = await Runtime.open(self.config)
        self.opened.append(rt)
        return rt

    async def cleanup(self) -> None:
        async with asyncio.timeout(60):
            last = self.opened[-1] if self.opened else await self.open()
            for status in await last.jobs():
                if status.state is State.RUNNING:
                    # It may end by itself meanwhile: then there is nothing to stop.
                    with contextlib.suppress(JobEndedError):
                        await last.stop(status.id, grace=0)
            for rt in self.opened:
                await rt.close()
            for rt in self.opened:
                await asyncio.to_thread(rt._launcher._proc.wait, 30)  # noqa: SLF001
        assert cgroup_dirs(self.config.cgroup_subtree) == [], "cgroups left behind"


@pytest_asyncio.fixture
async def restarts(tmp_path: Path) -> AsyncIterator[Restarts]:
    r = Restarts(make_config(tmp_path / "state"))
    try:
        yield r
    finally:
        await r.cleanup()


async def test_a_running_job_is_taken_back_and_steered(restarts: Restarts) -> None:
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.run(py(WAITS_FOR_USR1))
        await read_until(first, job.id, b"ready")
        await first.close()

        second = await restarts.open()
        status = await second.status(job.id)
        assert status.state is State.RUNNING
        assert status.pid == job.pid
        assert status.started_at == job.started_at
        await second.signal(job.id, signal.SIGUSR1)
        final = await second.wait(job.id)
        output = joined(await collect(second, job.id))
    assert final.state is State.EXITED
    assert final.exit_code == 3
    assert final.usage is not None
    assert output == b"ready\ngot usr1\n"


async def test_stop_works_on_a_job_taken_back(restarts: Restarts) -> None:
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.run(JobSpec(["sleep", "1000"]))
        await first.close()
        second = await restarts.open()
        final = await second.stop(job.id, grace=1)
    assert final.state is State.STOPPED
    assert final.signal == signal.SIGTERM


async def test_a_job_that_ended_while_no_runtime_ran_shows_how(
    restarts: Restarts, tmp_path: Path
) -> None:
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.run(py(WAITS_FOR_USR1))
        await read_until(first, job.id, b"ready")
        await first.close()
        await _end_unwatched(tmp_path / "state", job.id, job.pid, signal.SIGUSR1)

        second = await restarts.open()
        final = await second.status(job.id)
        output = joined(await collect(second, job.id))
    # One comparison, so that a failure shows the job's output (stderr included) too.
    assert (final.state, final.exit_code, output) == (State.EXITED, 3, b"ready\ngot usr1\n")
    assert final.usage is not None
    assert final.usage.cpu_seconds > 0


async def test_an_oom_kill_while_no_runtime_ran_is_reported(
    restarts: Restarts, tmp_path: Path
) -> None:
    eat = """
        import signal, sys
        def eat(*_):
            blocks = []
            while True:
                blocks.append(bytearray(16 << 20))
        signal.signal(signal.SIGUSR1, eat)
        print("ready", flush=True)
        while True:
            signal.pause()
    """
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.run(py(eat, limits=Limits(memory_bytes=64 << 20)))
        await read_until(first, job.id, b"ready")
        await first.close()
        await _end_unwatched(tmp_path / "state", job.id, job.pid, signal.SIGUSR1)
        final = await (await restarts.open()).status(job.id)
    assert final.state is State.EXITED
    assert final.signal == signal.SIGKILL
    assert final.oom_killed


async def test_a_vanished_supervisor_makes_the_job_lost_not_running(
    restarts: Restarts, tmp_path: Path
) -> None:
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.run(JobSpec(["sleep", "1000"]))
        await first.close()
        # The supervisor we started: its job dies with it.
        await _end_unwatched(tmp_path / "state", job.id, None, signal.SIGKILL)

        second = await restarts.open()
        final = await second.status(job.id)
        # The decision is recorded: a third runtime says the same.
        await second.close()
        again = await (await restarts.open()).status(job.id)
    assert final.state is State.FAILED
    assert final.error is not None
    assert final.error.startswith("lost: "), final.error
    assert again == final


async def test_a_job_from_before_a_host_restart_is_lost(restarts: Restarts, tmp_path: Path) -> None:
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.run(JobSpec(["sleep", "1000"]))
        await first.close()
        await _end_unwatched(tmp_path / "state", job.id, None, signal.SIGKILL)
        # Injected fault: the record says the job ran under another boot of the host.
        spec = tmp_path / "state" / "jobs" / job.id / "spec.json"
        meta = json.loads(spec.read_text())
        meta["boot_id"] = "00000000-0000-0000-0000-000000000000"
        spec.write_text(json.dumps(meta))
        final = await (await restarts.open()).status(job.id)
    assert final.state is State.FAILED
    assert final.error == "lost: the host restarted while the job ran"


async def test_created_jobs_stay_created_and_can_start_later(restarts: Restarts) -> None:
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.create(JobSpec(["echo", "later"]))
        await first.close()
        second = await restarts.open()
        assert (await second.status(job.id)).state is State.CREATED
        await second.start(job.id)
        final = await second.wait(job.id)
        output = joined(await collect(second, job.id))
    assert final.exit_code == 0
    assert output == b"later\n"


async def test_a_create_cut_short_leaves_nothing(restarts: Restarts, tmp_path: Path) -> None:
    half = tmp_path / "state" / "jobs" / "4f8a1c62-0000-4000-8000-000000000000"
    half.mkdir(parents=True)  # what a crash between mkdir and writing spec.json leaves
    rt = await restarts.open()
    assert await asyncio.wait_for(rt.jobs(), 10) == []
    assert not half.exists()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda spec: spec["spec"].update(argv=[]), "argv is empty"),
        (lambda spec: spec.pop("created_ns"), "created_ns"),
        (lambda spec: spec.update(uid="nobody"), "uid"),
        (lambda spec: spec["limits"].update(pids=-5), "pids limit"),
    ],
)
async def test_a_corrupt_job_record_is_set_aside_and_the_rest_start(
    restarts: Restarts,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[dict[str, Any]], object],
    reason: str,
) -> None:
    first = await restarts.open()
    async with asyncio.timeout(60):
        bad = await first.create(JobSpec(["echo", "bad"]))
        good = await first.run(JobSpec(["echo", "good"]))
        await first.wait(good.id)
        await first.close()
    spec_file = tmp_path / "state" / "jobs" / bad.id / "spec.json"
    spec = json.loads(spec_file.read_text())
    damage(spec)  # parses as JSON, fails validation: hand-edited, or an older release's
    spec_file.write_text(json.dumps(spec))

    second = await restarts.open()
    ids = {s.id for s in await asyncio.wait_for(second.jobs(), 10)}
    assert ids == {good.id}
    moved = tmp_path / "state" / "set-aside" / bad.id
    assert (moved / "spec.json").exists()
    assert reason in (moved / "REASON").read_text()
    assert not (tmp_path / "state" / "jobs" / bad.id).exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(moved) in w and reason in w for w in warnings), warnings


async def test_remove_deletes_ended_jobs_and_refuses_running_ones(
    restarts: Restarts, tmp_path: Path
) -> None:
    rt = await restarts.open()
    async with asyncio.timeout(60):
        done = await rt.run(JobSpec(["echo", "hi"]))
        await rt.wait(done.id)
        running = await rt.run(JobSpec(["sleep", "1000"]))
        created = await rt.create(JobSpec(["true"]))

        await rt.remove(done.id)
        await rt.remove(created.id)
        with pytest.raises(JobRunningError, match="stop it first"):
            await rt.remove(running.id)
        ids = {s.id for s in await rt.jobs()}
    assert ids == {running.id}
    assert not (tmp_path / "state" / "jobs" / done.id).exists()
    with pytest.raises(JobNotFoundError):
        await rt.status(done.id)


async def test_an_ended_jobs_final_record_outlives_the_runtime(restarts: Restarts) -> None:
    """Its final usage is recorded after its end is shown, off the event loop; a runtime
    closed then must still record it. Measured again, it would be unknown (its cgroup is
    gone)."""
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.run(py("sum(range(3_000_000))"))
        ended = await first.wait(job.id)
        await first.close()
        second = await restarts.open()
        again = await second.status(job.id)
    assert ended.usage is not None
    assert ended.usage.cpu_seconds > 0
    assert (again.state, again.usage) == (State.EXITED, ended.usage)


async def test_a_job_removed_as_its_end_is_recorded_leaves_no_directory(
    restarts: Restarts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RemoveJob waits for the job's final.json to be written: deleting the directory
    meanwhile could leave the file behind in it. The writer is held back (an injected
    fault) until the remove has waited for it."""
    release = threading.Event()
    writing = threading.Event()
    real_write = _lifecycle._write_final_records  # noqa: SLF001 - the fault goes into the writer

    def held_write(finals: Any) -> None:
        writing.set()
        release.wait(30)
        real_write(finals)

    monkeypatch.setattr(_lifecycle, "_write_final_records", held_write)
    rt = await restarts.open()
    directory = tmp_path / "state" / "jobs"
    try:
        async with asyncio.timeout(60):
            job = await rt.run(JobSpec(["true"]))
            await rt.wait(job.id)
            await asyncio.to_thread(writing.wait, 30)
            removing = asyncio.ensure_future(rt.remove(job.id))
            done, _ = await asyncio.wait([removing], timeout=0.2)
            assert not done, "the job was removed while its final record was being written"
            release.set()
            await removing
            await rt.settled()
    finally:
        release.set()
    assert not (directory / job.id).exists()


async def test_a_job_removed_right_after_its_end_waits_for_no_other_end(
    restarts: Restarts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """final.json waits until no end has begun for a while (here: ever, while the runtime
    is open); a RemoveJob right after the end, as `jobctl run --rm` sends, drops it rather
    than wait for it."""
    monkeypatch.setattr(_lifecycle, "_REMOVE_QUIET_S", 600.0)
    monkeypatch.setattr(_lifecycle, "_REMOVE_DEFER_S", 600.0)
    rt = await restarts.open()
    async with asyncio.timeout(30):
        job = await rt.run(JobSpec(["true"]))
        await rt.wait(job.id)
        await rt.remove(job.id)
    assert not (tmp_path / "state" / "jobs" / job.id).exists()


async def test_a_removed_job_is_freed_without_the_cycle_collector(restarts: Restarts) -> None:
    """jobworkerd freezes what is alive after start-up (gc.freeze): a job read back then
    must still be freed when it is removed, so it may hold no reference cycle. Nor may the
    usage sampler hold a job it sampled until its next tick (an hour away here): the job
    running across the restart is sampled by the new runtime's first tick."""
    restarts.config = replace(restarts.config, usage_interval=3600.0)
    rt = await restarts.open()
    async with asyncio.timeout(60):
        done = await rt.run(JobSpec(["echo", "hi"]))
        await rt.wait(done.id)
        sampled = await rt.run(JobSpec(["sleep", "600"]))
        await rt.close()
        rt = await restarts.open()
        async with contextlib.aclosing(rt.watch_usage(sampled.id)) as usage:
            assert await anext(usage)
        await rt.stop(sampled.id, grace=0)
        await rt.wait(sampled.id)
        fresh = await rt.run(JobSpec(["echo", "hi"]))
        await rt.wait(fresh.id)
        ids = (done.id, sampled.id, fresh.id)
        jobs = [weakref.ref(rt._get(i)) for i in ids]  # noqa: SLF001
        gc.disable()
        try:
            for job_id in ids:
                await rt.remove(job_id)
            # Tasks that handled the job's end may still hold it until they are collected.
            await rt.settled()
            assert [ref() for ref in jobs] == [None, None, None]
        finally:
            gc.enable()


async def test_retention_deletes_oldest_ended_jobs_first_never_running_ones(
    tmp_path: Path,
) -> None:
    # A budget of 3.5 MiB: three 1 MiB jobs fit; with a running one, only once the oldest
    # has gone (which happens whenever a job ends, and on every pass).
    config = make_config(tmp_path / "state", retention_bytes=7 << 19)
    r = Restarts(config)
    try:
        rt = await r.open()
        async with asyncio.timeout(60):
            big = py("import os; os.write(1, b'x' * (1 << 20))")
            ended = []
            for _ in range(3):
                job = await rt.run(big)
                ended.append((await rt.wait(job.id)).id)
            running = await rt.run(
                py(
                    "import os, signal; os.write(1, b'y' * (1 << 20)); os.write(1, b'!');"
                    " signal.pause()"
                )
            )
            # All of its 1 MiB in the log, not only its first chunk: the budget counts it.
            await read_until(rt, running.id, b"!")
            removed = await rt.prune_ended()
            left = {s.id for s in await rt.jobs()}
            assert left == {*ended[1:], running.id}
            # The pass that runs after each job's end (the third one's, late on a loaded
            # host) may have deleted it first.
            assert removed in ([], ended[:1])
            # Age: a week and a day later, every ended job goes; the running one stays.
            later = (await rt.status(ended[-1])).created_at.timestamp() + 8 * 86400
            removed = await rt.prune_ended(now=later)
            assert removed == ended[1:]
            assert {s.id for s in await rt.jobs()} == {running.id}
    finally:
        await r.cleanup()


@pytest.mark.parametrize("per_owner", [None, 3 << 19])
async def test_one_owners_output_never_deletes_another_owners_history(
    tmp_path: Path, per_owner: int | None
) -> None:
    """A 3 MiB budget: bob's one ended 1 MiB job stays while alice's 1 MiB jobs pile up;
    alice's own oldest go (by the global cap, or by a per-owner budget of 1.5 MiB)."""
    config = make_config(
        tmp_path / "state", retention_bytes=3 << 20, retention_bytes_per_owner=per_owner
    )
    r = Restarts(config)
    try:
        rt = await r.open()
        async with asyncio.timeout(60):
            big = "import os; os.write(1, b'x' * (1 << 20))"
            bobs = await rt.run(py(big, owner="bob"))
            await rt.wait(bobs.id)
            alices = []
            for _ in range(4):
                job = await rt.run(py(big, owner="alice"))
                alices.append((await rt.wait(job.id)).id)
            await rt.settled()
            await rt.prune_ended()
            left = {s.id for s in await rt.jobs()}
    finally:
        await r.cleanup()
    assert bobs.id in left
    assert alices[0] not in left
    assert alices[-1] in left
    if per_owner is not None:
        assert left == {bobs.id, alices[-1]}


async def test_disk_full_truncates_output_keeps_the_job_and_the_runtime(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _libc_call("mount", b"tmpfs", str(state).encode(), b"tmpfs", 0, b"size=2m,mode=0700")
    try:
        r = Restarts(make_config(state))
        try:
            rt = await r.open()
            async with asyncio.timeout(60):
                job = await rt.run(
                    py("import os\nfor _ in range(8): os.write(1, b'z' * (1 << 20))\nprint('done')")
                )
                final = await rt.wait(job.id)
                chunks = await collect(rt, job.id)
                assert final.state is State.EXITED
                assert final.exit_code == 0
                assert final.output_truncated
                notes = b"".join(c.data for c in chunks if c.stream.name == "SYSTEM")
                assert b"output truncated" in notes
                # The runtime is still up: it answers, and says clearly why a new job fails.
                assert (await rt.status(job.id)).state is State.EXITED
                # Whatever room the truncation left, take it; then a new job cannot be recorded.
                filler = state / "filler"
                with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
                    while True:
                        f.write(b"f" * 4096)
                with pytest.raises(StateDirError, match="No space left on device; the server"):
                    await rt.run(JobSpec(["true"]))
                # Space freed, jobs run again.
                filler.unlink()
                await rt.remove(job.id)
                again = await rt.run(JobSpec(["true"]))
                assert (await rt.wait(again.id)).exit_code == 0
        finally:
            await r.cleanup()
    finally:
        _libc_call("umount2", str(state).encode(), 2)  # MNT_DETACH


FILLS_THE_DISK = """
    import os
    for _ in range(8):
        os.write(1, b"z" * (1 << 20))
    print("done")
"""


def _libc_call(name: str, *args: object) -> None:
    """mount(2)/umount2(2) for the test's own small filesystem."""
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), f"{name}{args}")


async def test_leftover_cgroups_are_pruned_at_start(restarts: Restarts) -> None:
    leftover = "00000000-0000-4000-8000-000000000000"
    subtree = restarts.config.cgroup_subtree
    first = await restarts.open()
    async with asyncio.timeout(60):
        sleeper = await first.run(JobSpec(["sleep", "600"]))
        bases = cgroup_dirs(subtree)
        for base in bases:
            os.mkdir(os.path.join(base, leftover))
        # Closed with a job running: its cgroup and the unknown one both stay.
        await first.close()
    assert all(os.path.exists(os.path.join(b, leftover)) for b in bases)
    await restarts.open()
    assert all(not os.path.exists(os.path.join(b, leftover)) for b in bases)
    assert all(os.path.exists(os.path.join(b, sleeper.id)) for b in bases)


async def test_two_servers_cannot_share_a_state_dir_or_a_subtree(tmp_path: Path) -> None:
    """A second runtime on the same state dir, or on the same cgroup subtree, refuses to
    open and names the holder; the first keeps working."""
    config = make_config(tmp_path / "state")
    async with asyncio.timeout(60), await Runtime.open(config) as first:
        with pytest.raises(StateDirError, match=rf"another jobworkerd \(pid {os.getpid()}\)"):
            await Runtime.open(config)
        other_dir = make_config(tmp_path / "other", cgroup_subtree=config.cgroup_subtree)
        with pytest.raises(
            CgroupError, match=rf"in use by another jobworkerd \(pid {os.getpid()}\)"
        ):
            await Runtime.open(other_dir)
        job = await first.run(JobSpec(["true"]))
        assert (await first.wait(job.id)).exit_code == 0
    # Released at close: the next one opens.
    async with asyncio.timeout(60), await Runtime.open(config) as again:
        assert [s.id for s in await again.jobs()] == [job.id]


async def test_a_timeout_stops_the_job_even_while_no_runtime_runs(restarts: Restarts) -> None:
    """The supervisor, not the server, enforces a job's timeout: it holds across a
    restart, and the job ends stopped with reason "timeout" after its TERM handler ran."""
    first = await restarts.open()
    async with asyncio.timeout(60):
        job = await first.create(replace(py(TERM_SAYS_BYE), timeout_s=2.0), start=True)
        assert job.timeout_s == 2.0
        await read_until(first, job.id, b"ready")
        await first.close()
        run = json.loads((restarts.config.state_dir / "jobs" / job.id / "run.json").read_text())
        await _wait_pid_gone(run["supervisor_pid"])

        second = await restarts.open()
        final = await second.status(job.id)
        output = joined(await collect(second, job.id))
    assert final.state is State.STOPPED
    assert final.reason == "timeout"
    assert final.exit_code == 0  # its TERM handler exited cleanly
    assert output == b"ready\nbye\n"
    assert "timeout" in final.describe_end()


async def test_timeouts_take_the_server_default_and_respect_its_maximum(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state", default_timeout=3600.0, max_timeout=7200.0)
    async with opened(config) as rt:
        defaulted = await rt.create(JobSpec(["true"]))
        own = await rt.create(JobSpec(["true"], timeout_s=60))
        with pytest.raises(InvalidSpecError, match="above the server maximum of 7200s"):
            await rt.create(JobSpec(["true"], timeout_s=7201))
    assert (defaulted.timeout_s, own.timeout_s) == (3600.0, 60)


async def test_a_stop_on_request_says_so_and_a_start_failure_says_why(tmp_path: Path) -> None:
    async with opened(make_config(tmp_path / "state")) as rt:
        stopped = await rt.stop((await rt.run(JobSpec(["sleep", "600"]))).id, grace=0)
        missing = await rt.run(JobSpec(["no-such-command-here"]))
        not_exec = await rt.run(JobSpec(["/etc/hostname"]))
        bad_dir = await rt.run(JobSpec(["true"], cwd="/tmp/none"))  # /tmp is empty
    assert (stopped.state, stopped.reason) == (State.STOPPED, "stop")
    assert (missing.state, missing.reason) == (State.FAILED, "not_found")
    assert (not_exec.state, not_exec.reason) == (State.FAILED, "not_executable")
    assert (bad_dir.state, bad_dir.reason) == (State.FAILED, "start_error")
