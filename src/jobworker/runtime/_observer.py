"""A hook that sees every job status change, for metrics and the like."""

from __future__ import annotations

from typing import Protocol

from ._status import JobStatus

__all__ = ["JobObserver", "NullObserver"]


class JobObserver(Protocol):
    """Called on the runtime's event loop, synchronously: keep it quick and never raise."""

    def job_changed(self, before: JobStatus | None, after: JobStatus) -> None:
        """A job appeared (``before`` is None: created, or taken back after a restart) or
        moved from ``before`` to ``after``."""

    def job_removed(self, last: JobStatus) -> None:
        """A job was deleted (``jobctl rm`` or retention); ``last`` is its final status."""


class NullObserver:
    def job_changed(self, before: JobStatus | None, after: JobStatus) -> None:
        pass

    def job_removed(self, last: JobStatus) -> None:
        pass
