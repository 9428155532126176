"""Reading a job's output log: from the start, any number of readers, optionally following.

A reader owns one fd on the log and nothing else; file reads run in a worker thread so a big or
cold read never blocks the event loop. Following waits on an event set by the directory
notifier (new bytes) or by the job (state change), never on a timer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass

from ._logformat import HEADER, MAGIC, Stream

__all__ = ["Batch", "Chunk", "ReadBudget", "read_log"]

LOOKAHEAD = 16 * 1024
# The most one reader reads per batch, alone: big batches are what make one follower fast
# (docs/benchmarks.md (b), (i)).
BATCH = 4 * 1024 * 1024
# The least, however many readers there are: below this the per-message costs dominate.
LEAST_BATCH = 64 * 1024
# Up to this many unread bytes are parsed on the event loop itself: a follower's reads are
# mostly a few lines just appended, so in the page cache, and a hop to a worker thread would
# cost more than the read (with 100 followers the hops queue up: measured p99 20 ms -> see
# docs/benchmarks.md (j)). Bigger reads, which may hit the disk, go to the thread pool.
INLINE_READ = 64 * 1024


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of output: its stream, its bytes, and when the supervisor read it (ns)."""

    stream: Stream
    data: bytes
    timestamp_ns: int


Batch = list[Chunk]


class ReadBudget:
    """The bytes every reader of every log may hold at once, shared out evenly.

    Each reader holds its batch, and the API layer an encoded copy of it and gRPC one more
    while a slow client drains it: at a fixed 4 MiB per batch, 1,000 followers of one job
    took the server to 8.5 GB (issue 15). So a reader's batch is ``total`` divided among
    the readers there are, between LEAST_BATCH and BATCH: one follower still reads 4 MiB
    at a time, a thousand read 128 KiB each (of the default 128 MiB). ``on_idle`` runs
    when the last reader goes after more than the budget's worth of full batches were out
    at once (the server hands the freed memory back to the kernel then); not after every
    lone follower, whose few MiB the allocator keeps for the next on purpose
    (``jobworker._allocator``), and whose end should not cost a collection.
    """

    def __init__(self, total: int, on_idle: Callable[[], None] | None = None) -> None:
        self.total = total
        self.readers = 0
        # Set while no reader exists.
        self.idle = asyncio.Event()
        self.idle.set()
        self._on_idle = on_idle
        # The most readers at once since the last time there were none.
        self._peak = 0

    def batch_bytes(self) -> int:
        return max(LEAST_BATCH, min(BATCH, self.total // max(1, self.readers)))

    @contextlib.contextmanager
    def reader(self) -> Iterator[None]:
        self.readers += 1
        self._peak = max(self._peak, self.readers)
        self.idle.clear()
        try:
            yield
        finally:
            self.readers -= 1
            if self.readers == 0:
                self.idle.set()
                crowded = self._peak * BATCH > self.total
                self._peak = 0
                if crowded and self._on_idle is not None:
                    self._on_idle()


def _read_batch(
    fd: int, offset: int, streams: frozenset[Stream], limit: int
) -> tuple[list[Chunk], int]:
    """Parse the complete records from ``offset`` on; return them and the offset after them.

    Runs in a worker thread and reads up to about ``limit`` bytes per call. Small records are
    sliced out of a LOOKAHEAD-sized read; a record that does not fit gets its body read
    exactly, straight into its own bytes object, so big output is copied once. A record
    still being written (incomplete at EOF) is left for the next call, and records of
    unwanted streams are skipped without reading their bodies.
    """
    chunks: list[Chunk] = []
    start = offset
    size = HEADER.size
    while offset - start < limit:
        head = os.pread(fd, LOOKAHEAD, offset)
        pos = 0
        while pos + size <= len(head):
            length, stream_id, ts = HEADER.unpack_from(head, pos)
            stream = Stream(stream_id)
            end = pos + size + length
            if end <= len(head):
                if stream in streams:
                    chunks.append(Chunk(stream, head[pos + size : end], ts))
                pos = end
                continue
            body_at = offset + pos + size
            if stream in streams:
                body = os.pread(fd, length, body_at)
                if len(body) < length:
                    return chunks, offset + pos
                chunks.append(Chunk(stream, body, ts))
            elif body_at + length > os.fstat(fd).st_size:
                return chunks, offset + pos
            pos = end
            break
        if pos == 0:
            break
        offset += pos
    return chunks, offset


class _LogReader:
    """One open log fd and the position of the next record."""

    def __init__(
        self,
        path: str,
        streams: frozenset[Stream],
        executor: concurrent.futures.Executor,
        budget: ReadBudget,
    ) -> None:
        self._path = path
        self._streams = streams | {Stream.SYSTEM}
        self._executor = executor
        self._budget = budget
        self._fd = -1
        self._offset = len(MAGIC)
        # Slow start: the first batch is small and each next one twice as big, up to the
        # budget's share. When hundreds of readers come at once, each gets its first
        # message after a small read instead of queueing behind the others' 4 MiB ones
        # (docs/benchmarks.md (q')).
        self._ramp = LEAST_BATCH
        self._inflight: concurrent.futures.Future[tuple[list[Chunk], int]] | None = None

    async def next_batch(self) -> list[Chunk] | None:
        """The next chunks; None once the log has no complete record left to read."""
        if self._fd < 0:
            try:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None  # the job has not started, so it has written nothing yet
        unread = os.fstat(self._fd).st_size - self._offset
        limit = min(self._ramp, self._budget.batch_bytes())
        self._ramp = min(2 * self._ramp, BATCH)
        if unread <= INLINE_READ:
            chunks, offset = _read_batch(self._fd, self._offset, self._streams, limit)
        else:
            self._inflight = self._executor.submit(
                _read_batch, self._fd, self._offset, self._streams, limit
            )
            chunks, offset = await asyncio.wrap_future(self._inflight)
            self._inflight = None
        if offset == self._offset:
            return None
        self._offset = offset
        return chunks

    async def aclose(self) -> None:
        """Close the fd, after any read still running in its thread has finished."""
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            # asyncio.wait never cancels what it waits for; if we are cancelled meanwhile,
            # close() below hands the fd to the read's completion instead.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([asyncio.wrap_future(inflight)])
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            # A read is still running in its thread; closing now could let the fd number be
            # reused under it. Close once it is done.
            inflight.add_done_callback(lambda _f: os.close(fd))
        else:
            os.close(fd)


async def read_log(  # noqa: PLR0913 - each argument is one independent knob
    path: str,
    streams: frozenset[Stream],
    *,
    follow: bool,
    has_ended: Callable[[], bool],
    subscribe: Callable[[asyncio.Event], contextlib.AbstractContextManager[None]],
    executor: concurrent.futures.Executor,
    budget: ReadBudget,
) -> AsyncGenerator[list[Chunk], None]:
    """Yield the log's chunks from the start, in batches of what one read found (so small
    writes can travel together without waiting for more); with ``follow``, until the job has
    ended.

    ``has_ended`` tells whether the job is over (then everything is in the log).
    ``subscribe(event)`` arranges for ``event`` to be set on any change to the log or the job.
    ``budget`` sizes each batch.
    """
    reader = _LogReader(path, streams, executor, budget)
    wake = asyncio.Event()
    try:
        with budget.reader(), subscribe(wake) if follow else contextlib.nullcontext():
            while True:
                # Read the state before the log: if the job had ended by now, everything it
                # wrote is in the log, and reading to EOF below gets all of it.
                ended = not follow or has_ended()
                wake.clear()
                while (batch := await reader.next_batch()) is not None:
                    if batch:
                        yield batch
                if ended:
                    return
                await wake.wait()
    finally:
        await reader.aclose()
