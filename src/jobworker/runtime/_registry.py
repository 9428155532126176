"""Every job the runtime knows, by id and by owner.

The owner index answers "whose job is this" and "how many jobs does this owner have" from
memory, without touching the job's cgroup or directory, so authorization and quota checks
cost the same for any id, known or not.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from ._errors import JobNotFoundError
from ._job import Job

__all__ = ["Registry", "canonical_id", "ended_seconds"]


def ended_seconds(job: Job) -> float:
    """When the job ended (seconds since the epoch); its creation if it never ran."""
    ended_at = job.status.ended_at
    return ended_at.timestamp() if ended_at is not None else job.status.created_at.timestamp()


def canonical_id(job_id: str) -> str | None:
    """The canonical form of a job id, or None if it is not a UUID."""
    try:
        return str(uuid.UUID(job_id))
    except (ValueError, TypeError, AttributeError):
        return None


class Registry:
    """Jobs by id, and the ids of each owner's jobs."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_owner: dict[str, dict[str, Job]] = {}
        # Kept up to date as jobs come, end and go, so that the quota check and the
        # retention pass after each end cost the same with 10 or 10,000 ended jobs (with a
        # count and a sort per call, churn fell from 83 to 55 jobs/s, issue 15): jobs
        # created or running, each owner's count of them, each owner's ended jobs in the
        # order they ended, and the disk those take.
        self._live: dict[str, Job] = {}
        self._active: dict[str, int] = {}
        self._ended: dict[str, dict[str, Job]] = {}
        self._ended_bytes: dict[str, int] = {}
        # The disk each running job's directory took when last measured (the periodic
        # retention pass), and its sum per owner: the pass after each end reads the sums
        # (with a loop over every running job, it was a tenth of a 1,000-stop storm's
        # event-loop time).
        self._live_bytes: dict[str, int] = {}
        self._live_used: dict[str, int] = {}
        # (owner, name) -> the job of that name, among jobs that exist.
        self._names: dict[tuple[str, str], Job] = {}

    def named(self, owner: str, name: str) -> Job | None:
        """``owner``'s job called ``name``, if one exists."""
        return self._names.get((owner, name))

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        if job.spec.name is not None:
            self._names.setdefault((job.owner, job.spec.name), job)
        self._by_owner.setdefault(job.owner, {})[job.id] = job
        if job.state.is_final:
            self._add_ended(job)
        else:
            self._live[job.id] = job
            self._count(job.owner, 1)
        job.on_final = self._ended_now

    def discard(self, job: Job) -> bool:
        """Forget ``job``; False if it was not known (deleted meanwhile)."""
        if self._jobs.pop(job.id, None) is None:
            return False
        job.on_final = None
        key = (job.owner, job.spec.name or "")
        if self._names.get(key) is job:
            del self._names[key]
        if job.state.is_final:
            mine_ended = self._ended.get(job.owner, {})
            if mine_ended.pop(job.id, None) is not None:
                self._ended_bytes[job.owner] -= job.disk_bytes
            if not mine_ended:
                self._ended.pop(job.owner, None)
                self._ended_bytes.pop(job.owner, None)
        else:
            del self._live[job.id]
            self._count(job.owner, -1)
            self._unmeasure(job)
        mine = self._by_owner.get(job.owner)
        if mine is not None:
            mine.pop(job.id, None)
            if not mine:
                del self._by_owner[job.owner]
        return True

    def _ended_now(self, job: Job) -> None:
        del self._live[job.id]
        self._count(job.owner, -1)
        self._unmeasure(job)
        self._add_ended(job)

    def _unmeasure(self, job: Job) -> None:
        measured = self._live_bytes.pop(job.id, None)
        if measured is not None:
            self._live_used[job.owner] -= measured

    def measured_live(self, sizes: dict[str, int]) -> None:
        """Record the disk running jobs' directories take (by id; jobs that ended
        meanwhile are left out)."""
        self._live_bytes = {i: n for i, n in sizes.items() if i in self._live}
        used: dict[str, int] = {}
        for job_id, size in self._live_bytes.items():
            owner = self._live[job_id].owner
            used[owner] = used.get(owner, 0) + size
        self._live_used = used

    def _add_ended(self, job: Job) -> None:
        self._ended.setdefault(job.owner, {})[job.id] = job
        self._ended_bytes[job.owner] = self._ended_bytes.get(job.owner, 0) + job.disk_bytes

    def live(self) -> list[Job]:
        """The jobs created or running."""
        return list(self._live.values())

    def ended_by_owner(self) -> dict[str, Iterator[Job]]:
        """Each owner's ended jobs, in the order they ended (see :meth:`sort_ended`), read
        as they are needed; valid until a job is added or discarded."""
        return {owner: iter(jobs.values()) for owner, jobs in self._ended.items()}

    def used_bytes(self) -> dict[str, int]:
        """The disk each owner's jobs take: the ended ones as recorded when each ended,
        the running ones as last measured."""
        used = dict(self._ended_bytes)
        for owner, size in self._live_used.items():
            used[owner] = used.get(owner, 0) + size
        return used

    def sort_ended(self) -> None:
        """Put each owner's ended jobs in the order they ended: a restart reads them back
        in the order they were created (once, at start-up)."""
        for owner, jobs in self._ended.items():
            ordered = sorted(jobs.values(), key=ended_seconds)
            self._ended[owner] = {job.id: job for job in ordered}

    def _count(self, owner: str, change: int) -> None:
        count = self._active.get(owner, 0) + change
        if count:
            self._active[owner] = count
        else:
            self._active.pop(owner, None)

    def get(self, job_id: str) -> Job:
        """Raises JobNotFoundError: no job has this id (or it is not an id at all)."""
        canonical = canonical_id(job_id)
        job = self._jobs.get(canonical) if canonical is not None else None
        if job is None:
            raise JobNotFoundError(str(job_id))
        return job

    def owner_of(self, job_id: str) -> str | None:
        """The owner of the job ``job_id`` names, or None for no such job."""
        canonical = canonical_id(job_id)
        job = self._jobs.get(canonical) if canonical is not None else None
        return job.owner if job is not None else None

    def active(self, owner: str) -> int:
        """How many of ``owner``'s jobs are created or running (their quota)."""
        return self._active.get(owner, 0)

    def of(self, owner: str | None) -> list[Job]:
        """``owner``'s jobs (everyone's for None), oldest first: the order they were added
        in, since a restart adds them sorted by creation and every later job is newer (no
        sort per listing: with one, 10,000 jobs cost 7 ms more)."""
        jobs = self._jobs if owner is None else self._by_owner.get(owner, {})
        return list(jobs.values())

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)
