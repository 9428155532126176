"""Retention: which ended jobs to delete, by age and by the disk jobs take.

Ended jobs are deleted ``retention_seconds`` after they ended. Disk is budgeted per owner:
while an owner's jobs take more than ``retention_bytes_per_owner`` (when set), that owner's
oldest ended jobs go. Then, as a last resort, while all jobs together take more than
``retention_bytes``, the oldest ended job of whichever owner takes the most disk goes: one
user's output never deletes another user's history while the first still holds more.
Running and created jobs are never deleted. Checked at start-up, every
``retention_interval`` seconds and after each job's end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from ._config import RuntimeConfig
from ._job import Job
from ._jobdir import dir_bytes
from ._lifecycle import Lifecycle
from ._registry import ended_seconds

__all__ = ["prune_ended", "retention_loop"]

log = logging.getLogger("jobworker.runtime")


class _Oldest:
    """One owner's ended jobs, oldest first, looked at one at a time: a pass that deletes
    nothing reads one job per owner, not every ended job."""

    __slots__ = ("_jobs", "first")

    def __init__(self, jobs: Iterator[Job]) -> None:
        self._jobs = jobs
        self.first = next(jobs, None)

    def advance(self) -> None:
        self.first = next(self._jobs, None)


def _choose(
    config: RuntimeConfig, ended: dict[str, Iterator[Job]], used: dict[str, int], cutoff: float
) -> list[Job]:
    """The ended jobs to delete (``ended``: each owner's, oldest first; ``used``: the disk
    each owner's jobs take). Both are consumed."""
    doomed: list[Job] = []
    oldest = {owner: _Oldest(jobs) for owner, jobs in ended.items()}

    def take(owner: str, job: Job) -> None:
        oldest[owner].advance()
        used[owner] -= job.disk_bytes
        doomed.append(job)

    cap = config.retention_bytes_per_owner
    for owner, mine in oldest.items():
        while (job := mine.first) is not None and ended_seconds(job) < cutoff:
            take(owner, job)
        while cap is not None and (job := mine.first) is not None and used[owner] > cap:
            take(owner, job)
    while sum(used.values()) > config.retention_bytes:
        firsts = {o: mine.first for o, mine in oldest.items() if mine.first is not None}
        if not firsts:
            break
        owner = max(firsts, key=lambda o: used[o])
        take(owner, firsts[owner])
    return doomed


async def prune_ended(
    life: Lifecycle, now: float | None = None, *, measure_live: bool = True
) -> list[str]:
    """Apply the retention settings now (``now``: seconds since the epoch, for tests);
    return the ids of the jobs deleted, oldest first.

    The disk of running jobs grows, so it is measured (in a thread) when ``measure_live``;
    otherwise the sizes the last measuring pass found stand (the pass after each job's end:
    measuring 1,000 running jobs' directories after each of 1,000 ends was most of what a
    stop storm cost, issue 15). Ended jobs' disk was measured once, when each ended.
    """
    config = life.config
    now = time.time() if now is None else now
    registry = life.registry
    if measure_live:
        live = registry.live()
        registry.measured_live(
            await asyncio.to_thread(lambda: {j.id: dir_bytes(j.dir) for j in live})
        )
    # Each owner's ended jobs, oldest first: the candidates.
    doomed = _choose(
        config, registry.ended_by_owner(), registry.used_bytes(), now - config.retention_seconds
    )
    doomed.sort(key=ended_seconds)
    for job in doomed:
        await life.delete(job)
    if doomed:
        log.info("retention: deleted %d ended job(s)", len(doomed))
    return [j.id for j in doomed]


async def retention_loop(life: Lifecycle) -> None:
    while True:
        try:
            await prune_ended(life)
        except OSError as e:
            log.warning("retention pass failed: %s", e)
        await asyncio.sleep(life.config.retention_interval)
