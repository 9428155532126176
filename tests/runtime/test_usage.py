"""A job's usage history sampled from its real cgroup (v1, hybrid, and v2 in the VM), and
followed. The history's storage alone: tests/unit/test_usage_history.py."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from jobworker.runtime import Sample

from ..conftest import make_config, opened
from .helpers import py

MIB = 1 << 20


async def test_a_running_job_is_sampled_and_its_samples_can_be_followed(tmp_path: Path) -> None:
    code = """
        import sys
        held = bytearray(64 << 20)
        for i in range(0, len(held), 4096):
            held[i] = 1
        print("holding", flush=True)
        sys.stdin.read()
    """
    config = make_config(tmp_path / "state", usage_interval=0.1)
    async with opened(config) as rt:
        job = await rt.run(py(code, stdin="pipe"))
        seen: list[Sample] = []
        async with asyncio.timeout(60), contextlib.aclosing(rt.watch_usage(job.id)) as samples:
            async for batch in samples:
                seen += batch
                if seen[-1].memory_bytes >= 64 * MIB:
                    break
        assert [s.time_ns for s in seen] == sorted({s.time_ns for s in seen})
        assert seen[-1].pids >= 1
        assert seen[-1].cpu_seconds > 0
        kept = await rt.usage(job.id)
        assert kept[: len(seen)] == seen
        # A step thins them, and never hides the peak.
        thinned = await rt.usage(job.id, step_ns=10**10)
        assert len(thinned) == 1
        assert thinned[0].memory_bytes == max(s.memory_bytes for s in kept)
        # Following ends with the job.
        await rt.close_stdin(job.id)
        async with asyncio.timeout(60), contextlib.aclosing(rt.watch_usage(job.id)) as samples:
            async for _ in samples:
                pass
            assert (await rt.wait(job.id)).exit_code == 0


async def test_sampling_off_keeps_no_history(tmp_path: Path) -> None:
    """The same job, sampled every 100 ms and not at all: samples only in the first."""
    sleeper = py("import time; time.sleep(0.5)")
    for interval, sampled in ((0.1, True), (None, False)):
        config = make_config(tmp_path / f"state-{interval}", usage_interval=interval)
        async with opened(config) as rt, asyncio.timeout(60):
            job = await rt.run(sleeper)
            await rt.wait(job.id)
            assert bool(await rt.usage(job.id)) is sampled, interval
