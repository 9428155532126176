"""Readers of one log at the same offset share one read (``_output.SharedReads``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest

from jobworker.runtime import Stream
from jobworker.runtime._logformat import HEADER, MAGIC
from jobworker.runtime._output import Batch, ReadBudget, SharedReads, Window, read_log

# Reading a small file that is all there: far more than any of these reads takes.
TIMEOUT = 10


def record(data: bytes) -> bytes:
    return HEADER.pack(len(data), Stream.STDOUT, 1) + data


class Log:
    """A log file of stdout records, and readers of it that share their reads."""

    def __init__(self, path: Path, executor: concurrent.futures.Executor) -> None:
        self.path = path
        self.shared = SharedReads()
        self._executor = executor

    def write(self, *bodies: bytes) -> None:
        self.path.write_bytes(MAGIC + b"".join(record(b) for b in bodies))

    def append(self, body: bytes) -> None:
        with self.path.open("ab") as f:
            f.write(record(body))

    def reader(self, window: Window | None = None) -> AsyncGenerator[Batch, None]:
        return read_log(
            str(self.path),
            frozenset({Stream.STDOUT}),
            follow=False,
            has_ended=lambda: True,
            subscribe=lambda _event: contextlib.nullcontext(),
            executor=self._executor,
            budget=ReadBudget(1 << 20),
            shared=self.shared,
            window=window,
        )


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield Log(tmp_path / "log", pool)


def data(batch: Batch) -> list[bytes]:
    return [c.data for c in batch.chunks]


async def test_two_readers_at_one_offset_get_one_batch(log: Log) -> None:
    log.write(b"one\n", b"two\n")
    async with (
        asyncio.timeout(TIMEOUT),
        contextlib.aclosing(log.reader()) as first,
        contextlib.aclosing(log.reader()) as second,
    ):
        mine, theirs = await anext(first), await anext(second)
        assert theirs is mine
        assert data(mine) == [b"one\n", b"two\n"]
        assert len(log.shared) == 1
    assert len(log.shared) == 0  # nothing kept once a log has no readers


async def test_a_shared_batch_read_earlier_is_followed_by_what_came_after(log: Log) -> None:
    log.write(b"one\n")
    async with asyncio.timeout(TIMEOUT), contextlib.aclosing(log.reader()) as first:
        assert data(await anext(first)) == [b"one\n"]
        log.append(b"two\n")
        got = [c for batch in [b async for b in log.reader()] for c in data(batch)]
    assert got == [b"one\n", b"two\n"]


async def test_a_tail_cut_from_a_shared_batch_leaves_it_whole(log: Log) -> None:
    log.write(b"a\nb\nc\n")
    async with (
        asyncio.timeout(TIMEOUT),
        contextlib.aclosing(log.reader()) as whole,
        contextlib.aclosing(log.reader(Window(tail_lines=1))) as tail,
    ):
        everything = await anext(whole)
        assert data(await anext(tail)) == [b"c\n"]
        assert data(everything) == [b"a\nb\nc\n"]
        async with contextlib.aclosing(log.reader()) as later:
            assert data(await anext(later)) == [b"a\nb\nc\n"]
