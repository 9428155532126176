"""Change notification for job directories: one inotify instance for the whole runtime.

Followers of a job's output wait on an ``asyncio.Event`` that this hub sets whenever a file in
the job's directory is written or renamed into place, so new output reaches them within
milliseconds without a sleep-polling loop. One inotify instance with one watch per watched
directory (refcounted) keeps the per-user inotify limits (128 instances by default) out of
reach however many followers there are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from asyncinotify import Inotify, Mask, Watch

__all__ = ["DirNotifier"]

_MASK = Mask.MODIFY | Mask.MOVED_TO | Mask.CREATE | Mask.CLOSE_WRITE


@dataclass(slots=True)
class _Entry:
    watch: Watch
    subscribers: set[asyncio.Event] = field(default_factory=set)


class DirNotifier:
    """Sets subscribers' events when something in their directory changes."""

    def __init__(self) -> None:
        self._inotify: Inotify | None = Inotify()
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(self._pump())
        self._by_path: dict[str, _Entry] = {}
        self._by_wd: dict[int, _Entry] = {}

    @contextlib.contextmanager
    def subscribe(self, path: str, event: asyncio.Event) -> Iterator[None]:
        """Set ``event`` on every change in directory ``path`` while the context is open.

        Raises:
            OSError: the directory cannot be watched (gone, or the watch limit is reached).
        """
        entry = self._by_path.get(path)
        if entry is None:
            if self._inotify is None:
                raise RuntimeError("the notifier is closed")
            watch = self._inotify.add_watch(path, _MASK)
            entry = _Entry(watch)
            self._by_path[path] = entry
            self._by_wd[watch.wd] = entry
        entry.subscribers.add(event)
        try:
            yield
        finally:
            entry.subscribers.discard(event)
            if not entry.subscribers:
                del self._by_path[path]
                del self._by_wd[entry.watch.wd]
                if self._inotify is not None:
                    # The directory may be gone already; the kernel then dropped the watch.
                    with contextlib.suppress(OSError):
                        self._inotify.rm_watch(entry.watch)

    @property
    def watch_count(self) -> int:
        return len(self._by_path)

    async def _pump(self) -> None:
        if self._inotify is None:
            return
        async for event in self._inotify:
            watch = event.watch
            if Mask.Q_OVERFLOW in event.mask:
                # Events were lost: wake everyone; they re-read and find what changed.
                woken = list(self._by_wd.values())
            else:
                found = self._by_wd.get(watch.wd) if watch is not None else None
                woken = [found] if found is not None else []
            for entry in woken:
                for sub in entry.subscribers:
                    sub.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._by_path.clear()
        self._by_wd.clear()
