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

from ._config import RuntimeConfig
from ._job import Job
from ._jobdir import dir_bytes
from ._lifecycle import Lifecycle

__all__ = ["prune_ended", "retention_loop"]

log = logging.getLogger("jobworker.runtime")


def _ended_s(job: Job) -> float:
    ended_at = job.status.ended_at
    return ended_at.timestamp() if ended_at is not None else job.status.created_at.timestamp()


def _choose(
    config: RuntimeConfig, ended: dict[str, list[Job]], used: dict[str, int], cutoff: float
) -> list[Job]:
    """The ended jobs to delete (``ended``: each owner's, oldest first; ``used``: the disk
    each owner's jobs take). Both are consumed."""
    doomed: list[Job] = []

    def take(owner: str) -> None:
        job = ended[owner].pop(0)
        used[owner] -= job.disk_bytes
        doomed.append(job)

    cap = config.retention_bytes_per_owner
    for owner, mine in ended.items():
        while mine and _ended_s(mine[0]) < cutoff:
            take(owner)
        while cap is not None and mine and used[owner] > cap:
            take(owner)
    while sum(used.values()) > config.retention_bytes:
        owners = [o for o in ended if ended[o]]
        if not owners:
            break
        take(max(owners, key=lambda o: used[o]))
    return doomed


async def prune_ended(life: Lifecycle, now: float | None = None) -> list[str]:
    """Apply the retention settings now (``now``: seconds since the epoch, for tests);
    return the ids of the jobs deleted, oldest first."""
    config = life.config
    now = time.time() if now is None else now
    jobs = list(life.registry)
    running = [j for j in jobs if not j.state.is_final]
    sizes = await asyncio.to_thread(lambda: {j.id: dir_bytes(j.dir) for j in running})
    used: dict[str, int] = {}
    for job in jobs:
        used[job.owner] = used.get(job.owner, 0) + sizes.get(job.id, job.disk_bytes)
    # Each owner's ended jobs, oldest first: the candidates.
    ended: dict[str, list[Job]] = {}
    for job in sorted((j for j in jobs if j.state.is_final and j.status.ended_at), key=_ended_s):
        ended.setdefault(job.owner, []).append(job)
    doomed = _choose(config, ended, used, now - config.retention_seconds)
    doomed.sort(key=_ended_s)
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
