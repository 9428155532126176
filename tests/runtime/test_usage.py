"""A job's usage history: sampled from its real cgroup, kept on disk, bounded, followed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from jobworker.runtime import Sample
from jobworker.runtime._usage import MAX_POINTS, UsageHistory, merge_pairs, thin

from ..conftest import make_config, opened
from .helpers import py

MIB = 1 << 20


def _sample(t: int, memory: int = 0, cpu: float = 0.0, pids: int = 1) -> Sample:
    return Sample(t, cpu, memory, 0, 0, pids)


def test_a_week_at_one_second_keeps_a_few_thousand_points_and_every_peak(tmp_path: Path) -> None:
    history = UsageHistory(str(tmp_path))
    week = 7 * 86400
    peak_at = 1234
    for t in range(week):  # ~8 s: each append opens, checks and writes the file
        history.append(_sample(t, memory=999 * MIB if t == peak_at else MIB, cpu=t / 2))
    samples = history.samples()
    assert len(samples) <= MAX_POINTS
    assert samples[-1] == _sample(week - 1, MIB, cpu=(week - 1) / 2)  # the newest, exact
    assert [s.time_ns for s in samples] == sorted(s.time_ns for s in samples)
    assert max(s.memory_bytes for s in samples) == 999 * MIB  # a peak is never averaged away
    # Totals stay totals: the last of each merged pair.
    assert all(s.cpu_seconds == s.time_ns / 2 for s in samples)


def test_merge_and_thin_keep_the_later_totals_and_the_larger_peaks() -> None:
    a, b, c = _sample(1, 5, 1.0, 2), _sample(2, 9, 2.0, 1), _sample(3, 1, 3.0, 7)
    assert merge_pairs([a, b, c]) == [_sample(2, 9, 2.0, 2), c]
    assert thin([a, b, c], since_ns=1) == [b, c]
    assert thin([a, b, c], step_ns=10) == [_sample(1, 9, 3.0, 7)]


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
    config = make_config(tmp_path / "off", usage_interval=None)
    async with opened(config) as rt:
        job = await rt.run(py("import time; time.sleep(0.5)"))
        await rt.wait(job.id)
        assert await rt.usage(job.id) == []
