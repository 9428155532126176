"""Every job change, fanned out to whoever watches all jobs (``jobctl events``).

It sits between the jobs and the runtime's observer: it passes each change on, and puts it in
the queue of each watcher that wants it. A watcher that does not keep up is dropped with an
error rather than letting its queue grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Callable
from typing import NamedTuple

from ._errors import WatcherBehindError
from ._observer import JobObserver
from ._status import JobStatus

__all__ = ["Change", "ChangeFeed"]

# Changes one watcher may have waiting: a burst of 10,000 job starts fits.
MAX_PENDING = 10_000


class Change(NamedTuple):
    """A job's status after a change (its last one if ``deleted``)."""

    status: JobStatus
    deleted: bool = False


class _Watcher:
    __slots__ = ("behind", "pending", "wake", "wants")

    def __init__(self, wants: Callable[[JobStatus], bool]) -> None:
        self.wants = wants
        self.pending: collections.deque[Change] = collections.deque()
        self.wake = asyncio.Event()
        self.behind = False

    def put(self, change: Change) -> None:
        if self.behind or not self.wants(change.status):
            return
        if len(self.pending) >= MAX_PENDING:
            self.behind = True
            self.pending.clear()
        else:
            self.pending.append(change)
        self.wake.set()


class ChangeFeed:
    """A :class:`JobObserver` that passes every change to ``inner`` and to the watchers."""

    def __init__(self, inner: JobObserver) -> None:
        self._inner = inner
        self._watchers: set[_Watcher] = set()

    def job_changed(self, before: JobStatus | None, after: JobStatus) -> None:
        self._inner.job_changed(before, after)
        for watcher in self._watchers:
            watcher.put(Change(after))

    def job_removed(self, last: JobStatus) -> None:
        self._inner.job_removed(last)
        for watcher in self._watchers:
            watcher.put(Change(last, deleted=True))

    async def watch(
        self,
        wants: Callable[[JobStatus], bool],
        existing: Callable[[], list[JobStatus]] | None = None,
    ) -> AsyncGenerator[list[Change], None]:
        """Yield every change from now on to a job ``wants`` accepts, in batches of what
        piled up meanwhile; never ends by itself. With ``existing``, the first batch is
        the jobs it returns, called in the same step as the watch begins: no change falls
        between that list and the changes after it (Kubernetes' list-then-watch leaves a
        gap its clients must close with a resource version).

        Raises:
            WatcherBehindError: more than MAX_PENDING changes piled up unread.
        """
        watcher = _Watcher(wants)
        self._watchers.add(watcher)
        try:
            if existing is not None:
                yield [Change(status) for status in existing()]
            while True:
                await watcher.wake.wait()
                watcher.wake.clear()
                if watcher.behind:
                    raise WatcherBehindError(
                        f"more than {MAX_PENDING} changes were waiting to be read; watch again "
                        "(and list the jobs to catch up)"
                    )
                if watcher.pending:
                    batch = list(watcher.pending)
                    watcher.pending.clear()
                    yield batch
        finally:
            self._watchers.discard(watcher)
