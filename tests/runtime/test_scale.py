"""Many jobs at once: right final states, no zombies, no leftover supervisors."""

from __future__ import annotations

import asyncio
import os

from jobworker.runtime import JobSpec, Runtime, State

from .helpers import children_of, zombies_of


async def test_200_concurrent_short_jobs(runtime: Runtime) -> None:
    async with asyncio.timeout(120):
        specs = [JobSpec(["/bin/sh", "-c", f"exit {i % 7}"]) for i in range(200)]
        started = await asyncio.gather(*(runtime.run(s) for s in specs))
        finals = await asyncio.gather(*(runtime.wait(s.id) for s in started))
    assert [f.state for f in finals] == [State.EXITED] * 200
    assert [f.exit_code for f in finals] == [i % 7 for i in range(200)]
    launcher = runtime._launcher._proc.pid  # noqa: SLF001 - checking what it leaves behind
    assert zombies_of({os.getpid(), launcher}) == []
    assert children_of(launcher) == []  # every supervisor has ended and been reaped


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
