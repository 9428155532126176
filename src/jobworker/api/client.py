"""Connecting to jobworkerd: a mutual-TLS channel with the options the server is tuned for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc

from ._proto import jobworker_pb2 as pb
from ._proto import jobworker_pb2_grpc as pb_grpc
from ._tls import MAX_FRAME_BYTES, TlsFiles, client_credentials
from ._wire import decode_output_response

__all__ = ["CHANNEL_OPTIONS", "JobServiceStub", "OutputPiece", "connect", "pb", "stream_output"]

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [("grpc.http2.max_frame_size", MAX_FRAME_BYTES)]
JobServiceStub = pb_grpc.JobServiceStub


def connect(target: str, tls: TlsFiles, *, server_name: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` ("host:port"), presenting ``tls.cert`` and verifying
    the server against ``tls.ca`` (and its name against ``server_name`` if given).

    Raises:
        TlsError: a certificate or key file cannot be read.
    """
    options = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, client_credentials(tls), options)


class OutputPiece(NamedTuple):
    """One chunk of output as :func:`stream_output` yields it. ``offset`` is where the log
    was read up to once this chunk's message is written out (``last``: this is its last
    chunk): pass it as ``OutputRequest.offset`` to go on after it."""

    stream: int
    data: memoryview
    time_unix_nano: int
    offset: int
    last: bool


async def stream_output(
    channel: grpc.aio.Channel, request: pb.OutputRequest, *, timeout: float | None = None
) -> AsyncIterator[OutputPiece]:
    """StreamOutput, yielding each chunk with ``data`` a view into the received message:
    what a client that writes output straight out needs, without the two copies protobuf
    objects would make.

    Raises:
        grpc.aio.AioRpcError: the call failed (status code and message from the server).
    """
    call = channel.unary_stream(
        "/jobworker.v1.JobService/StreamOutput",
        request_serializer=pb.OutputRequest.SerializeToString,
        response_deserializer=None,
    )(request, timeout=timeout)
    async for message in call:
        chunks, offset = decode_output_response(message)
        for i, (stream, data, ts) in enumerate(chunks, 1):
            yield OutputPiece(stream, data, ts, offset, i == len(chunks))
