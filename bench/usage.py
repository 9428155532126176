"""The cost of usage history (issue 19): sampling 1,000 running jobs every second.

(y) CPU time of the sampler's thread, and of the whole server process, per second of wall
    time, while 1,000 idle jobs run (each with a cgroup of its own), in % of one core;
    against the same process with the same 1,000 jobs and sampling off, measured in the
    same run. Target: under 5% of one core.

Run alone: `.venv/bin/python bench/usage.py` (as root).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from jobworker.runtime import JobSpec, Runtime, RuntimeConfig
from table import Row, scratch

JOBS = 1000
SECONDS = 10.0


async def _cost(state: Path, interval: float | None) -> tuple[float, float, int]:
    """(sampler thread %, process %, samples taken) of one core over SECONDS, with JOBS
    idle jobs running."""
    config = RuntimeConfig(
        state_dir=state,
        cgroup_subtree=f"jw-bench-usage-{os.getpid()}",
        namespaces=False,
        sandbox=False,
        usage_interval=interval,
    )
    async with await Runtime.open(config) as rt:
        ids = []
        try:
            for _ in range(JOBS):
                job = await rt.run(JobSpec(["sleep", "3600"]))
                ids.append(job.id)  # as each comes: the stop below ends every one started
            sampler = rt.sampler
            before, taken = sampler.cost_seconds, sampler.samples_taken
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(SECONDS)  # the benchmark measures an interval; it syncs nothing
            wall = time.monotonic() - wall0
            thread = (sampler.cost_seconds - before) / wall * 100
            process = (time.process_time() - cpu0) / wall * 100
            return thread, process, sampler.samples_taken - taken
        finally:
            await asyncio.gather(*(rt.stop(i, grace=0) for i in ids), return_exceptions=True)


async def measure() -> list[Row]:
    with scratch("jobworker-bench-usage-") as tmp:
        thread, process, taken = await _cost(tmp / "on", 1.0)
        _, idle, _ = await _cost(tmp / "off", None)
    per_sample = thread / 100 * SECONDS / max(taken, 1) * 1e6
    return [
        Row(
            f"(y) sampling {JOBS:,} running jobs every second: sampler thread / whole server",
            f"{thread:.1f}% / {process:.1f}% of a core ({per_sample:.0f} us a sample)",
            f"{idle:.1f}% (server, sampling off)",
            f"+{process - idle:.1f} points",
            "< 5% of a core",
            process - idle < 5,
        )
    ]


if __name__ == "__main__":
    for row in asyncio.run(measure()):
        print(f"{row.name}: {row.ours}; anchor {row.anchor}; {row.ratio}; ok={row.ok}")
