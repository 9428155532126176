"""The output log parser on hand-built files: torn tails, big records, stream filters."""

from __future__ import annotations

import os
import time
from pathlib import Path

from jobworker.runtime import Stream
from jobworker.runtime._logformat import HEADER, MAGIC
from jobworker.runtime._output import BATCH, LOOKAHEAD, _read_batch, log_end

BOTH = frozenset({Stream.STDOUT, Stream.STDERR, Stream.SYSTEM})


def record(stream: Stream, data: bytes, ts: int = 1) -> bytes:
    return HEADER.pack(len(data), stream, ts) + data


def read_all(path: Path, streams: frozenset[Stream]) -> tuple[list[tuple[Stream, bytes]], int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out: list[tuple[Stream, bytes]] = []
        offset = len(MAGIC)
        while True:
            chunks, new = _read_batch(fd, offset, streams, BATCH)
            out += [(c.stream, c.data) for c in chunks]
            if new == offset:
                return out, offset
            offset = new
    finally:
        os.close(fd)


def test_small_and_large_records_in_order(tmp_path: Path) -> None:
    big = os.urandom(3 * LOOKAHEAD + 5)
    log = tmp_path / "log"
    log.write_bytes(
        MAGIC
        + record(Stream.STDOUT, b"a")
        + record(Stream.STDERR, big)
        + record(Stream.STDOUT, b"")
        + record(Stream.SYSTEM, b"note")
    )
    got, _ = read_all(log, BOTH)
    assert got == [
        (Stream.STDOUT, b"a"),
        (Stream.STDERR, big),
        (Stream.STDOUT, b""),
        (Stream.SYSTEM, b"note"),
    ]


def test_unwanted_large_record_is_skipped(tmp_path: Path) -> None:
    big = b"e" * (2 * LOOKAHEAD)
    log = tmp_path / "log"
    log.write_bytes(MAGIC + record(Stream.STDERR, big) + record(Stream.STDOUT, b"out"))
    got, _ = read_all(log, frozenset({Stream.STDOUT, Stream.SYSTEM}))
    assert got == [(Stream.STDOUT, b"out")]


def test_torn_tail_is_not_delivered_until_complete(tmp_path: Path) -> None:
    body = b"x" * (LOOKAHEAD + 100)
    full = record(Stream.STDOUT, body, time.time_ns())
    log = tmp_path / "log"
    for cut in (3, len(HEADER.pack(0, 1, 0)), len(full) - 1):
        log.write_bytes(MAGIC + record(Stream.STDOUT, b"first") + full[:cut])
        got, offset = read_all(log, BOTH)
        assert got == [(Stream.STDOUT, b"first")]
        assert offset == len(MAGIC) + len(record(Stream.STDOUT, b"first"))
    log.write_bytes(MAGIC + record(Stream.STDOUT, b"first") + full)
    got, _ = read_all(log, BOTH)
    assert got == [(Stream.STDOUT, b"first"), (Stream.STDOUT, body)]


def test_many_small_records_span_lookahead_reads(tmp_path: Path) -> None:
    lines = [b"line %d\n" % i for i in range(5000)]
    log = tmp_path / "log"
    log.write_bytes(MAGIC + b"".join(record(Stream(1 + i % 2), d) for i, d in enumerate(lines)))
    got, _ = read_all(log, BOTH)
    assert [d for _, d in got] == lines


def test_log_end_stops_before_a_record_still_being_written(tmp_path: Path) -> None:
    """ "Only new output" starts at a record boundary, even when the log's size falls
    inside a record the supervisor is writing."""
    log = tmp_path / "output.log"
    first = HEADER.pack(3, Stream.STDOUT, 1) + b"abc"
    partial = HEADER.pack(10, Stream.STDOUT, 2) + b"half"
    log.write_bytes(MAGIC + first + partial)
    assert log_end(str(log)) == len(MAGIC) + len(first)
    assert log_end(str(tmp_path / "none")) == len(MAGIC)
