"""Readers of one log at the same offset share one read (``_output.SharedReads``)."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest

from jobworker.runtime import Stream
from jobworker.runtime._logformat import HEADER, MAGIC
from jobworker.runtime._output import Batch, ReadBudget, SharedReads, Window, read_log

OUT = frozenset({Stream.STDOUT})


def record(data: bytes) -> bytes:
    return HEADER.pack(len(data), Stream.STDOUT, 1) + data


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool


def reader(
    log: Path,
    shared: SharedReads,
    executor: concurrent.futures.Executor,
    window: Window | None = None,
) -> AsyncGenerator[Batch, None]:
    return read_log(
        str(log),
        OUT,
        follow=False,
        has_ended=lambda: True,
        subscribe=lambda _event: contextlib.nullcontext(),
        executor=executor,
        budget=ReadBudget(1 << 20),
        shared=shared,
        window=window,
    )


def data(batch: Batch) -> list[bytes]:
    return [c.data for c in batch.chunks]


async def test_two_readers_at_one_offset_get_one_batch(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = tmp_path / "log"
    log.write_bytes(MAGIC + record(b"one\n") + record(b"two\n"))
    shared = SharedReads()
    async with (
        contextlib.aclosing(reader(log, shared, executor)) as first,
        contextlib.aclosing(reader(log, shared, executor)) as second,
    ):
        mine, theirs = await anext(first), await anext(second)
        assert theirs is mine
        assert data(mine) == [b"one\n", b"two\n"]
        assert len(shared) == 1
    assert len(shared) == 0  # nothing kept once a log has no readers


async def test_a_shared_batch_read_earlier_is_followed_by_what_came_after(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = tmp_path / "log"
    log.write_bytes(MAGIC + record(b"one\n"))
    shared = SharedReads()
    async with contextlib.aclosing(reader(log, shared, executor)) as first:
        assert data(await anext(first)) == [b"one\n"]
        with log.open("ab") as f:
            f.write(record(b"two\n"))
        got = [c for batch in [b async for b in reader(log, shared, executor)] for c in data(batch)]
    assert got == [b"one\n", b"two\n"]


async def test_a_tail_cut_from_a_shared_batch_leaves_it_whole(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = tmp_path / "log"
    log.write_bytes(MAGIC + record(b"a\nb\nc\n"))
    shared = SharedReads()
    async with (
        contextlib.aclosing(reader(log, shared, executor)) as whole,
        contextlib.aclosing(reader(log, shared, executor, Window(tail_lines=1))) as tail,
    ):
        everything = await anext(whole)
        assert data(await anext(tail)) == [b"c\n"]
        assert data(everything) == [b"a\nb\nc\n"]
        async with contextlib.aclosing(reader(log, shared, executor)) as later:
            assert data(await anext(later)) == [b"a\nb\nc\n"]
