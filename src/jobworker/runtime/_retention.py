"""Retention: which ended jobs to delete, by age and by the disk all jobs take.

Ended jobs are deleted ``retention_seconds`` after they ended and, oldest first, while all
jobs together take more than ``retention_bytes``. Running and created jobs are never
deleted. Checked at start-up, every ``retention_interval`` seconds and after each job's end.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ._job import Job
from ._jobdir import dir_bytes
from ._lifecycle import Lifecycle

__all__ = ["prune_ended", "retention_loop"]

log = logging.getLogger("jobworker.runtime")


def _ended_s(job: Job) -> float:
    ended_at = job.status.ended_at
    return ended_at.timestamp() if ended_at is not None else job.status.created_at.timestamp()


async def prune_ended(life: Lifecycle, now: float | None = None) -> list[str]:
    """Apply the retention settings now (``now``: seconds since the epoch, for tests);
    return the ids of the jobs deleted, oldest first."""
    config = life.config
    now = time.time() if now is None else now
    jobs = list(life.registry)
    ended = [j for j in jobs if j.state.is_final and j.status.ended_at]
    running = [j.dir for j in jobs if not j.state.is_final]
    total = await asyncio.to_thread(lambda: sum(dir_bytes(d) for d in running))
    total += sum(j.disk_bytes for j in ended)
    cutoff = now - config.retention_seconds
    if total <= config.retention_bytes:
        # Within budget (the usual case, checked at every job's end): only age counts,
        # so only the expired are sorted, not every ended job.
        ended = [j for j in ended if _ended_s(j) < cutoff]
    ended.sort(key=_ended_s)
    removed = []
    for job in ended:
        if _ended_s(job) >= cutoff and total <= config.retention_bytes:
            break
        total -= job.disk_bytes
        await life.delete(job)
        removed.append(job.id)
    if removed:
        log.info("retention: deleted %d ended job(s)", len(removed))
    return removed


async def retention_loop(life: Lifecycle) -> None:
    while True:
        try:
            await prune_ended(life)
        except OSError as e:
            log.warning("retention pass failed: %s", e)
        await asyncio.sleep(life.config.retention_interval)
