"""The hand-built OutputResponse encoding equals protobuf's, byte for byte."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jobworker.api._convert import STREAMS
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._wire import (
    decode_output_response,
    encode_list_response,
    encode_output_response,
)
from jobworker.runtime import Chunk, Stream

chunks = st.lists(
    st.builds(
        Chunk,
        stream=st.sampled_from(list(Stream)),
        data=st.binary(max_size=300),
        timestamp_ns=st.integers(min_value=0, max_value=2**63 - 1),
    ),
    max_size=5,
)


offsets = st.integers(min_value=0, max_value=2**64 - 1)


@given(chunks, offsets)
def test_encoding_matches_protobuf(batch: list[Chunk], offset: int) -> None:
    expected = pb.OutputResponse(
        chunks=[
            pb.OutputChunk(stream=STREAMS[c.stream], data=c.data, time_unix_nano=c.timestamp_ns)
            for c in batch
        ],
        offset=offset,
    ).SerializeToString(deterministic=True)
    assert encode_output_response(batch, offset) == expected
    decoded = pb.OutputResponse.FromString(encode_output_response(batch, offset))
    assert [(c.data, c.time_unix_nano) for c in decoded.chunks] == [
        (c.data, c.timestamp_ns) for c in batch
    ]
    assert decoded.offset == offset


def test_big_chunk_length_varint() -> None:
    big = Chunk(Stream.STDOUT, b"x" * 300_000, 1)
    assert pb.OutputResponse.FromString(encode_output_response([big], 0)).chunks[0].data == big.data


@given(chunks, offsets)
def test_decoding_matches_protobuf(batch: list[Chunk], offset: int) -> None:
    wire = pb.OutputResponse(
        chunks=[
            pb.OutputChunk(stream=STREAMS[c.stream], data=c.data, time_unix_nano=c.timestamp_ns)
            for c in batch
        ],
        offset=offset,
    ).SerializeToString()
    decoded, decoded_offset = decode_output_response(wire)
    assert [(s, bytes(d), t) for s, d, t in decoded] == [
        (STREAMS[c.stream], c.data, c.timestamp_ns) for c in batch
    ]
    assert decoded_offset == offset


def test_truncated_message_is_an_error() -> None:
    wire = encode_output_response([Chunk(Stream.STDOUT, b"abcdef", 5)], 99)
    for cut in range(1, len(wire)):
        try:
            decoded, _offset = decode_output_response(wire[:cut])
        except ValueError:
            continue
        # A cut that lands between whole fields can still parse; it must not invent data.
        assert all(len(d) <= 6 for _, d, _ in decoded)


@given(st.lists(st.text(min_size=1, max_size=40), max_size=5))
def test_list_response_matches_protobuf(ids: list[str]) -> None:
    jobs = [pb.Job(id=i, owner="o", argv=["a", i], exit_code=len(i)) for i in ids]
    encoded = encode_list_response([j.SerializeToString() for j in jobs])
    assert encoded == pb.ListJobsResponse(jobs=jobs).SerializeToString()
    assert list(pb.ListJobsResponse.FromString(encoded).jobs) == jobs
