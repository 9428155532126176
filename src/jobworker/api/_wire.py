"""OutputResponse messages encoded straight from log chunks.

The output stream is the hot path: building protobuf objects and then serializing them copies
every byte twice on the server; joining the wire format directly copies it once (measured in
docs/benchmarks.md (i)). The encoding is plain protobuf and a test checks it byte for byte
against the generated code.

    OutputResponse { repeated OutputChunk chunks = 1; uint64 offset = 2; }
    OutputChunk    { Stream stream = 1; bytes data = 2; int64 time_unix_nano = 3; }
"""

from __future__ import annotations

from collections.abc import Sequence

from ..runtime import Chunk
from ._convert import STREAMS

__all__ = [
    "decode_output_response",
    "encode_field",
    "encode_list_response",
    "encode_output_response",
]

_CHUNKS = b"\x0a"  # field 1, length-delimited
_STREAM = b"\x08"  # field 1, varint
_DATA = b"\x12"  # field 2, length-delimited
_TIME = b"\x18"  # field 3, varint
_OFFSET = b"\x10"  # field 2, varint


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_output_response(message: bytes) -> tuple[list[tuple[int, memoryview, int]], int]:
    """(stream, data, time_unix_nano) of each chunk in a serialized OutputResponse, and its
    offset; ``data`` is a view into ``message``, not a copy. Unknown fields are skipped, as
    protobuf does.

    Raises:
        ValueError: the bytes are not a well-formed OutputResponse.
    """
    buf = memoryview(message)
    out = []
    offset = 0
    pos, end = 0, len(buf)
    try:
        while pos < end:
            key, pos = _read_varint(buf, pos)
            if key == 0x10:
                offset, pos = _read_varint(buf, pos)
                continue
            if key != 0x0A:
                pos = _skip(buf, key, pos)
                continue
            size, pos = _read_varint(buf, pos)
            stop = pos + size
            stream = ts = 0
            data = buf[0:0]
            while pos < stop:
                field_key, pos = _read_varint(buf, pos)
                if field_key == 0x08:
                    stream, pos = _read_varint(buf, pos)
                elif field_key == 0x12:
                    length, pos = _read_varint(buf, pos)
                    data, pos = buf[pos : pos + length], pos + length
                elif field_key == 0x18:
                    ts, pos = _read_varint(buf, pos)
                else:
                    pos = _skip(buf, field_key, pos)
            if pos != stop:
                raise ValueError("chunk overruns its length")
            out.append((stream, data, ts))
    except IndexError:
        raise ValueError("truncated OutputResponse") from None
    return out, offset


def _skip(buf: memoryview, key: int, pos: int) -> int:
    wire_type = key & 7
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 2:
        length, pos = _read_varint(buf, pos)
        return pos + length
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_output_response(chunks: Sequence[Chunk], offset: int) -> bytes:
    """The serialized OutputResponse holding ``chunks`` and ``offset`` (timestamps are
    non-negative)."""
    parts: list[bytes] = []
    for chunk in chunks:
        head = _STREAM + _varint(STREAMS[chunk.stream])
        if chunk.data:
            head += _DATA + _varint(len(chunk.data))
        tail = _TIME + _varint(chunk.timestamp_ns) if chunk.timestamp_ns else b""
        parts += (_CHUNKS, _varint(len(head) + len(chunk.data) + len(tail)), head, chunk.data, tail)
    if offset:
        parts += (_OFFSET, _varint(offset))
    return b"".join(parts)


def encode_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field ``number`` holding ``payload``: an AttachResponse is one
    (1: an encoded OutputResponse, 2: an encoded Job)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_list_response(jobs: Sequence[bytes]) -> bytes:
    """The serialized ListJobsResponse ``{ repeated Job jobs = 1; }`` of serialized Jobs."""
    parts: list[bytes] = []
    for job in jobs:
        parts += (_CHUNKS, _varint(len(job)), job)
    return b"".join(parts)
