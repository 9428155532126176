"""Reading a job's output log: from the start, any number of readers, optionally following.

A reader may want only part of the log (:class:`Window`): from an offset an earlier read
returned, its last lines, or a span of time.

A reader owns one fd on the log and nothing else; file reads run in a worker thread so a big or
cold read never blocks the event loop. Following waits on an event set by the directory
notifier (new bytes) or by the job (state change), never on a timer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from array import array
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ._errors import InvalidSpecError
from ._logformat import HEADER, MAGIC, Stream

__all__ = ["Batch", "Chunk", "ReadBudget", "SharedReads", "Window", "log_end", "read_log"]

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
    """A piece of output: its stream, its bytes, when the supervisor read it (ns), and the
    log offset just past its record (where a reader that got it can resume)."""

    stream: Stream
    data: bytes
    timestamp_ns: int
    end: int = 0


class Batch(NamedTuple):
    """What one read of the log found: its chunks, and the offset it read up to (past
    records of streams not wanted too)."""

    chunks: list[Chunk]
    offset: int


@dataclass(frozen=True, slots=True)
class Window:
    """Which part of a log a reader wants.

    ``offset``: resume just after what an earlier read returned (a ``Chunk.end`` or
    ``Batch.offset``); ``tail_lines``: start at the last N lines written so far (of the
    streams read); ``since_ns`` / ``until_ns``: only chunks read in [since, until), and the
    read ends at ``until_ns`` even while following. None: no such bound. ``tail_lines``
    counts lines of the whole log; the time bounds then apply to what it leaves.
    """

    offset: int | None = None
    tail_lines: int | None = None
    since_ns: int | None = None
    until_ns: int | None = None


# The longest record the supervisor writes (its read size): a header claiming more at a
# resume offset shows the offset is not a record boundary.
_MAX_RECORD = 1 << 20
# One resume point kept per this many records while looking for a tail, so finding the
# last lines of a log of millions of small records holds thousands of offsets, not millions.
_TAIL_MARK_EVERY = 256
_STREAM_IDS = frozenset(int(s) for s in Stream)


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


class _LastRead:
    """The last batch read from one log for one choice of streams, and where it began."""

    __slots__ = ("batch", "start", "users")

    def __init__(self) -> None:
        self.start = -1
        self.batch: Batch | None = None
        self.users = 0


class SharedReads:
    """The last batch read from each log, for the next reader at the same offset.

    A hundred followers of one job each wake for every line it writes, and each read and
    parsed the same new record, one after the other, before its message could go
    (docs/benchmarks.md (j)). A log only grows and a batch holds complete records only, so
    a batch read from an offset is right for every reader at that offset; a reader that
    would find more by now reads the rest next. A log's last batch is kept while it has
    readers: at most one batch more than they hold themselves.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, frozenset[Stream]], _LastRead] = {}

    def __len__(self) -> int:
        """How many logs (per choice of streams) have readers, and so a last read kept."""
        return len(self._last)

    @contextlib.contextmanager
    def joined(self, path: str, streams: frozenset[Stream]) -> Iterator[_LastRead]:
        key = (path, streams)
        last = self._last.get(key)
        if last is None:
            last = self._last[key] = _LastRead()
        last.users += 1
        try:
            yield last
        finally:
            last.users -= 1
            if not last.users:
                del self._last[key]


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
                    chunks.append(Chunk(stream, head[pos + size : end], ts, offset + end))
                pos = end
                continue
            body_at = offset + pos + size
            if stream in streams:
                body = os.pread(fd, length, body_at)
                if len(body) < length:
                    return chunks, offset + pos
                chunks.append(Chunk(stream, body, ts, offset + end))
            elif body_at + length > os.fstat(fd).st_size:
                return chunks, offset + pos
            pos = end
            break
        if pos == 0:
            break
        offset += pos
    return chunks, offset


def _records(fd: int, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(offset, body length, stream id) of each complete record in [start, end), reading
    headers only (bodies are skipped, in LOOKAHEAD-sized reads)."""
    size = HEADER.size
    buf, buf_at = b"", start
    pos = start
    while pos + size <= end:
        if pos + size > buf_at + len(buf):
            buf, buf_at = os.pread(fd, LOOKAHEAD, pos), pos
            if len(buf) < size:
                return
        length, stream_id, _ts = HEADER.unpack_from(buf, pos - buf_at)
        if pos + size + length > end:
            return
        yield pos, length, stream_id
        pos += size + length


def _tail_start(fd: int, streams: frozenset[Stream], lines: int, end: int) -> tuple[int, int]:
    """Where the last ``lines`` lines of ``streams`` before ``end`` begin: a record's offset
    and how many bytes of its body to skip. A last line with no newline yet counts.

    Runs in a worker thread. Headers are read forward once, keeping every
    _TAIL_MARK_EVERY-th wanted record's offset; then bodies are read backwards, one stretch
    between marks at a time, until enough newlines are found.
    """
    wanted = {int(s) for s in streams}
    marks = array("Q")
    count = 0
    # Where the last complete record ends: ``end`` may fall inside one being written.
    complete = len(MAGIC)
    for pos, length, stream_id in _records(fd, len(MAGIC), end):
        complete = pos + HEADER.size + length
        if lines > 0 and stream_id in wanted:
            if count % _TAIL_MARK_EVERY == 0:
                marks.append(pos)
            count += 1
    if lines <= 0:
        return complete, 0
    need, at_end = lines, True
    for k in range(len(marks) - 1, -1, -1):
        stop = marks[k + 1] if k + 1 < len(marks) else end
        stretch = [(p, n) for p, n, s in _records(fd, marks[k], stop) if s in wanted and n]
        for pos, length in reversed(stretch):
            body = os.pread(fd, length, pos + HEADER.size)
            cut = len(body)
            if at_end:
                # The newline that ends the last line does not start another.
                cut -= body.endswith(b"\n")
                at_end = False
            while (newline := body.rfind(b"\n", 0, cut)) >= 0:
                need -= 1
                if need == 0:
                    return pos, newline + 1
                cut = newline
    return len(MAGIC), 0


def log_end(path: str) -> int:
    """The offset just past the last complete record of the log at ``path`` now (the
    start of the log if it does not exist yet): where "only new output" begins. Blocks
    (reads every header): run it in a thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return len(MAGIC)
    try:
        return _tail_start(fd, frozenset(Stream), 0, os.fstat(fd).st_size)[0]
    finally:
        os.close(fd)


class _LogReader:
    """One open log fd and the position of the next record."""

    def __init__(  # noqa: PLR0913 - what to read, and the three things readers share
        self,
        path: str,
        streams: frozenset[Stream],
        window: Window,
        *,
        executor: concurrent.futures.Executor,
        budget: ReadBudget,
        last: _LastRead,
    ) -> None:
        self._path = path
        self._last = last
        self._streams = streams | {Stream.SYSTEM}
        self._window = window
        self._executor = executor
        self._budget = budget
        self._fd = -1
        self._offset = len(MAGIC)
        # Bytes to drop from the front of the first chunk (a tail that starts mid-record).
        self._skip = 0
        # Slow start: the first batch is small and each next one twice as big, up to the
        # budget's share. When hundreds of readers come at once, each gets its first
        # message after a small read instead of queueing behind the others' 4 MiB ones
        # (docs/benchmarks.md (q')).
        self._ramp = LEAST_BATCH
        self._inflight: concurrent.futures.Future[tuple[list[Chunk], int]] | None = None

    async def _open(self) -> bool:
        """Open the log and find where to start; False while it does not exist yet.

        Raises:
            InvalidSpecError: the window's offset is not one this log gave.
        """
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # the job has not started, so it has written nothing yet
        window = self._window
        if window.offset is not None:
            self._offset = _checked_offset(self._fd, window.offset)
        elif window.tail_lines is not None:
            end = os.fstat(self._fd).st_size
            self._offset, self._skip = await asyncio.wrap_future(
                self._executor.submit(_tail_start, self._fd, self._streams, window.tail_lines, end)
            )
        return True

    async def next_batch(self) -> Batch | None:
        """The next chunks; None once the log has no complete record left to read.

        Raises:
            InvalidSpecError: (first call) the window's offset is not one this log gave.
        """
        if self._fd < 0 and not await self._open():
            return None
        limit = min(self._ramp, self._budget.batch_bytes())
        self._ramp = min(2 * self._ramp, BATCH)
        last = self._last
        batch = last.batch
        if batch is None or last.start != self._offset or batch.offset - last.start > limit:
            batch = await self._read(limit)
            if batch is None:
                return None
            last.start, last.batch = self._offset, batch
        self._offset = batch.offset
        if self._skip and batch.chunks:
            # The batch may be shared: the first chunk is cut in a copy.
            first, skip, self._skip = batch.chunks[0], self._skip, 0
            rest = first.data[skip:]
            chunks = batch.chunks[1:]
            if rest:
                chunks.insert(0, Chunk(first.stream, rest, first.timestamp_ns, first.end))
            batch = Batch(chunks, batch.offset)
        return batch

    async def _read(self, limit: int) -> Batch | None:
        """Up to about ``limit`` bytes of records from the log itself; None at its end."""
        unread = os.fstat(self._fd).st_size - self._offset
        if unread <= 0:
            return None
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
        return Batch(chunks, offset)

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


def _checked_offset(fd: int, offset: int) -> int:
    """``offset``, if a record of this log starts there (or it is the log's end).

    Raises:
        InvalidSpecError: it lies outside the log, or no record header is there.
    """
    size = os.fstat(fd).st_size
    bad = offset < len(MAGIC) or offset > size
    if not bad and offset < size:
        head = os.pread(fd, HEADER.size, offset)
        if len(head) == HEADER.size:
            length, stream_id, _ts = HEADER.unpack(head)
            bad = stream_id not in _STREAM_IDS or length > _MAX_RECORD
    if bad:
        raise InvalidSpecError(
            f"offset {offset} is not a point in this job's output; resume from an offset "
            "that a response for this job returned"
        )
    return offset


def _in_window(batch: Batch, window: Window) -> tuple[Batch, bool]:
    """The batch's chunks within the window's time bounds, and whether the window has
    closed (a chunk at or after ``until_ns`` was read)."""
    since, until = window.since_ns, window.until_ns
    chunks = batch.chunks
    closed = False
    if until is not None and chunks and chunks[-1].timestamp_ns >= until:
        chunks = [c for c in chunks if c.timestamp_ns < until]
        closed = True
    if since is not None:
        chunks = [c for c in chunks if c.timestamp_ns >= since]
    return Batch(chunks, batch.offset), closed


async def read_log(  # noqa: PLR0913 - each argument is one independent knob
    path: str,
    streams: frozenset[Stream],
    *,
    follow: bool,
    has_ended: Callable[[], bool],
    subscribe: Callable[[asyncio.Event], contextlib.AbstractContextManager[None]],
    executor: concurrent.futures.Executor,
    budget: ReadBudget,
    shared: SharedReads,
    window: Window | None = None,
) -> AsyncGenerator[Batch, None]:
    """Yield the log's chunks in batches of what one read found (so small writes can
    travel together without waiting for more), from the start or where ``window`` says;
    with ``follow``, until the job has ended (or the window's end time has passed).

    ``has_ended`` tells whether the job is over (then everything is in the log).
    ``subscribe(event)`` arranges for ``event`` to be set on any change to the log or the job.
    ``budget`` sizes each batch; readers at the same offset share one read (``shared``).

    Raises:
        InvalidSpecError: (first iteration) the window's offset is not one this log gave.
    """
    window = window or Window()
    timed = window.since_ns is not None or window.until_ns is not None
    wake = asyncio.Event()
    with shared.joined(path, streams) as last:
        reader = _LogReader(path, streams, window, executor=executor, budget=budget, last=last)
        try:
            with budget.reader(), subscribe(wake) if follow else contextlib.nullcontext():
                while True:
                    # Read the state before the log: if the job had ended by now, everything it
                    # wrote is in the log, and reading to EOF below gets all of it.
                    ended = not follow or has_ended()
                    wake.clear()
                    while (batch := await reader.next_batch()) is not None:
                        closed = False
                        if timed:
                            batch, closed = _in_window(batch, window)
                        if batch.chunks:
                            yield batch
                        if closed:
                            return
                    if ended:
                        return
                    if window.until_ns is None:
                        await wake.wait()
                        continue
                    left = (window.until_ns - time.time_ns()) / 1e9
                    if left <= 0:
                        return
                    # A deadline, not a poll: nothing read after it could fall in the window.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), left)
        finally:
            await reader.aclose()
