"""Connecting to jobworkerd: a mutual-TLS channel with the options the server is tuned for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import grpc

from ._proto import jobworker_pb2 as pb
from ._proto import jobworker_pb2_grpc as pb_grpc
from ._tls import MAX_FRAME_BYTES, TlsFiles, client_credentials
from ._wire import decode_output_response

__all__ = [
    "CHANNEL_OPTIONS",
    "JobServiceStub",
    "OutputPiece",
    "RunningJob",
    "connect",
    "pb",
    "start_run",
    "stream_output",
]

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


class RunningJob:
    """A RunJob call whose first response came: ``job``, as started. :meth:`pieces` then
    gives its output, and ``final`` is its final status once they are over (None until
    then, or if the call broke off: never ask for another RunJob, which would run the
    command again; go on with StreamOutput from the last piece's offset)."""

    __slots__ = ("_call", "final", "job")

    def __init__(self, call: Any, job: pb.Job) -> None:  # Any: grpc.aio's calls are untyped
        self._call = call
        self.job = job
        self.final: pb.Job | None = None

    async def pieces(self) -> AsyncIterator[OutputPiece]:
        """The job's output, as :func:`stream_output` gives it; the call is cancelled once
        this ends, fails or is closed (a caller cancelled while waiting for output, say).

        Raises:
            grpc.aio.AioRpcError: the call failed.
        """
        try:
            # read(), not iteration: the first response was read so (gRPC does not let one
            # call mix the two).
            while (response := await self._call.read()) is not grpc.aio.EOF:
                if response.HasField("ended"):
                    self.final = response.ended
                elif response.HasField("output"):
                    chunks, offset = response.output.chunks, response.output.offset
                    for i, chunk in enumerate(chunks, 1):
                        data = memoryview(chunk.data)
                        yield OutputPiece(
                            chunk.stream, data, chunk.time_unix_nano, offset, i == len(chunks)
                        )
        finally:
            self._call.cancel()


async def start_run(
    channel: grpc.aio.Channel, request: pb.RunJobRequest, *, timeout: float | None
) -> RunningJob | None:
    """Send ``request`` as a RunJob and wait ``timeout`` for its first response, the job as
    started; None if the server has no RunJob (UNIMPLEMENTED: it made nothing, and the
    caller may use CreateJob and StreamOutput instead).

    Raises:
        grpc.aio.AioRpcError: the call failed.
        TimeoutError: no first response within ``timeout`` (the job may have been made).
        ValueError: the first response was not the job's start.
    """
    call = channel.unary_stream(
        "/jobworker.v1.JobService/RunJob",
        request_serializer=pb.RunJobRequest.SerializeToString,
        response_deserializer=pb.RunJobResponse.FromString,
    )(request)
    try:
        async with asyncio.timeout(timeout):
            first = await call.read()
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise
    except BaseException:
        call.cancel()  # timed out, or the caller was cancelled: the stream must not stay open
        raise
    if first is grpc.aio.EOF or not first.HasField("started"):
        call.cancel()
        raise ValueError("the server answered RunJob with an unexpected message")
    return RunningJob(call, first.started)
