"""Per-job user ids, as systemd's DynamicUser= gives each service one of its own.

Each job that no operator mapping covers runs as a uid of its own from a configured range,
with the same number as its gid and no supplementary groups. No two jobs that may still
have a process share one: a uid is taken at create and given back once the job has ended
and its cgroup is empty (nothing it started remains). The ids of jobs that are still
running are recorded in their spec.json, so a restarted server takes them again.

Ids are handed out round-robin, not lowest-free first: a file a job left behind where it
could write (a writable path an operator exposed) stays that job's for as long as possible
before the number comes round again. The cursor is not stored: a restart derives it from
the job records it reads back (just past the newest job's uid), so taking an id costs no
I/O on the launch path.

The default range, 1,900,000,000-1,900,065,535, sits beside systemd's (docs/security.md):
above its container ranges (systemd-nspawn's 524,288-1,878,982,656, 64Ki each) and below
its foreign-image range (2,147,352,576-2,147,418,111), far from its dynamic service users
(61,184-65,519), regular users (1,000-60,000) and nobody (65,534).
"""

from __future__ import annotations

import grp
import pwd

from ._errors import InvalidSpecError, NotPermittedError

__all__ = ["DEFAULT_UID_RANGE", "UidAllocator", "check_range"]

DEFAULT_UID_RANGE = (1_900_000_000, 1_900_065_535)


def check_range(first: int, last: int) -> None:
    """Raises InvalidSpecError: the range is empty or out of bounds, or holds a user or
    group of this host (its files would become the jobs')."""
    if not 1000 <= first <= last < 2**31 - 1:
        raise InvalidSpecError(
            f"uid range {first}-{last} must lie within 1000-2147483646, lowest first"
        )
    users = sorted(e.pw_name for e in pwd.getpwall() if first <= e.pw_uid <= last)
    groups = sorted(e.gr_name for e in grp.getgrall() if first <= e.gr_gid <= last)
    if users or groups:
        names = ", ".join(users + [f"group {g}" for g in groups][:5])
        raise InvalidSpecError(
            f"uid range {first}-{last} holds existing accounts ({names}); pick a range no "
            "user or group of /etc/passwd or /etc/group uses"
        )


class UidAllocator:
    """Hands out ids of ``[first, last]`` to jobs, one per job."""

    def __init__(self, first: int, last: int) -> None:
        self._first = first
        self._last = last
        self._taken: dict[int, str] = {}
        self._next = first

    def __contains__(self, uid: int) -> bool:
        return self._first <= uid <= self._last

    def take(self, job_id: str) -> int:
        """A free id for ``job_id``.

        Raises:
            NotPermittedError: every id of the range is in use.
        """
        size = self._last - self._first + 1
        if len(self._taken) >= size:
            raise NotPermittedError(
                f"all {size} job user ids are in use; wait for jobs to end, or ask the "
                "operator for a larger [sandbox] uid_range"
            )
        uid = self._next
        while uid in self._taken:
            uid = self._first if uid == self._last else uid + 1
        self._taken[uid] = job_id
        self._after(uid)
        return uid

    def _after(self, uid: int) -> None:
        self._next = self._first if uid == self._last else uid + 1

    def seen(self, uid: int) -> None:
        """A job record read back after a restart ran as ``uid``: called in creation
        order, this leaves the cursor just past the newest job's uid."""
        if uid in self:
            self._after(uid)

    def keep(self, uid: int, job_id: str) -> None:
        """Mark ``uid`` in use by a job found running (or still ending) after a restart."""
        if uid in self:
            self._taken[uid] = job_id

    def give_back(self, uid: int) -> None:
        self._taken.pop(uid, None)

    @property
    def in_use(self) -> int:
        return len(self._taken)
