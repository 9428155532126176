"""Stop and kill-all: SIGTERM to every process, SIGKILL after the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from jobworker.runtime import JobEndedError, Runtime, State, Stream

from .helpers import collect, is_gone, joined, pid_namespace_members, py, read_until

IGNORES_SIGTERM = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print('ready', flush=True)
    while True:
        time.sleep(1)
"""


async def test_graceful_stop_lets_the_command_exit_cleanly(runtime: Runtime) -> None:
    code = """
        import os, signal
        # os.write and os._exit: the signal may land while print('ready') is still inside
        # stdout's buffer, where a print raises "reentrant call" (the job then exits 1).
        def on_term(signum, frame):
            os.write(1, b'cleaning up\\n')
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print('ready', flush=True)
        signal.pause()
    """
    async with asyncio.timeout(30):
        job = await runtime.run(py(code))
        await read_until(runtime, job.id, b"ready")
        final = await runtime.stop(job.id, grace=20)
        chunks = await collect(runtime, job.id)
    # One assertion, so a failure shows the job's stderr too.
    assert (final.state, final.exit_code, joined(chunks, Stream.STDOUT)) == (
        State.STOPPED,
        0,
        b"ready\ncleaning up\n",
    ), joined(chunks, Stream.STDERR)


async def test_job_ignoring_sigterm_is_killed_after_grace(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py(IGNORES_SIGTERM))
        await read_until(runtime, job.id, b"ready")
        started = time.monotonic()
        final = await runtime.stop(job.id, grace=0.5)
        elapsed = time.monotonic() - started
    assert final.state is State.STOPPED
    assert final.signal == signal.SIGKILL
    assert elapsed >= 0.5


async def test_stop_kills_setsid_double_forked_grandchild(runtime: Runtime) -> None:
    code = """
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn escapee
                print('escaped', flush=True)
                while True:
                    time.sleep(1)
            os._exit(0)
        os.wait()
        print('reaped', flush=True)
        while True:
            time.sleep(1)
    """
    async with asyncio.timeout(30):
        job = await runtime.run(py(code))
        # Both: the escapee may print before or after its parent has been reaped (until
        # then the namespace holds one process more).
        await read_until(runtime, job.id, b"escaped")
        await read_until(runtime, job.id, b"reaped")
        assert job.pid is not None
        members = pid_namespace_members(job.pid)
        # the supervisor (PID 1 of the namespace), the command and the escapee
        assert len(members) == 3
        pidfds = [os.pidfd_open(pid) for pid in members]
        try:
            final = await runtime.stop(job.id, grace=0.3)
            assert all(is_gone(fd) for fd in pidfds)
        finally:
            for fd in pidfds:
                os.close(fd)
    assert final.state is State.STOPPED


async def test_stop_of_ended_job_says_how_it_ended(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py("pass"))
        await runtime.wait(job.id)
        with pytest.raises(JobEndedError, match=r"already exited with code 0"):
            await runtime.stop(job.id)
        with pytest.raises(JobEndedError, match=r"already exited with code 0"):
            await runtime.signal(job.id, signal.SIGTERM)


async def test_concurrent_stops_are_safe(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py(IGNORES_SIGTERM))
        await read_until(runtime, job.id, b"ready")
        started = time.monotonic()
        results = await asyncio.gather(
            *(runtime.stop(job.id, grace=g) for g in (30, 0.2, 5, 0.2, 10)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
    # Every call returns the same final status; the earliest deadline (0.2 s) wins.
    assert all(not isinstance(r, BaseException) for r in results), results
    assert {r.state for r in results if not isinstance(r, BaseException)} == {State.STOPPED}
    assert elapsed < 5


async def test_stop_racing_a_natural_exit_is_consistent(runtime: Runtime) -> None:
    async with asyncio.timeout(60):
        for _ in range(20):
            job = await runtime.run(py("pass"))
            try:
                final = await runtime.stop(job.id, grace=1)
            except JobEndedError:
                final = await runtime.wait(job.id)
            assert final.state in {State.EXITED, State.STOPPED}
            assert (await runtime.wait(job.id)) == final


async def test_supervisor_killed_from_outside_marks_job_failed(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py("import time; print('ready', flush=True); time.sleep(1000)"))
        await read_until(runtime, job.id, b"ready")
        assert job.pid is not None
        supervisor = next(p for p in pid_namespace_members(job.pid) if p != job.pid)
        os.kill(supervisor, signal.SIGKILL)
        final = await runtime.wait(job.id)
    assert final.state is State.FAILED
    assert "supervisor was killed" in (final.error or "")


async def test_a_launched_job_is_steered_over_its_kept_connection(runtime: Runtime) -> None:
    """Signals and stops of a job this runtime launched go over the connection made with
    the launch, not a connect to the control socket each (the socket is gone here), and
    any number of them in turn; a job's control socket still serves a restarted server."""
    async with asyncio.timeout(30):
        job = await runtime.run(py(IGNORES_SIGTERM))
        await read_until(runtime, job.id, b"ready")
        control = os.path.join(runtime._config.state_dir, "jobs", job.id, "control.sock")  # noqa: SLF001 - the socket to take away
        os.unlink(control)
        for _ in range(3):
            await runtime.signal(job.id, signal.SIGTERM)  # ignored: it runs on
        final = await runtime.stop(job.id, grace=0)
    assert final.state is State.STOPPED
    assert final.signal == signal.SIGKILL
