"""Attach: input to a job's stdin pipe and its output as it comes, through a real server."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import grpc

from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc

from .conftest import Running, code_of

PIPE = pb.STDIN_MODE_PIPE


async def _start(stub: pb_grpc.JobServiceStub, argv: list[str], stdin: int = PIPE) -> pb.Job:
    spec = pb.JobSpec(argv=argv, stdin=stdin)  # type: ignore[arg-type]
    job: pb.Job = await stub.CreateJob(pb.CreateJobRequest(spec=spec, start=True), timeout=10)
    return job


def _start_request(job_id: str, *, stdin: bool = True, from_start: bool = True) -> pb.AttachRequest:
    return pb.AttachRequest(start=pb.AttachStart(id=job_id, stdin=stdin, from_start=from_start))


async def _collect(call: Any, *, accepted: bool = False) -> tuple[bytes, pb.Job]:
    """Read an attach to its end (``accepted``: its first response was read already): the
    output, and the final status it ended with."""
    out = b""
    if not accepted:
        first = await asyncio.wait_for(call.read(), 60)
        assert first is not grpc.aio.EOF
        assert first.attached, "the first response says the attach is accepted"
    while True:
        response = await asyncio.wait_for(call.read(), 60)
        assert response is not grpc.aio.EOF, "the attach ended without the job's status"
        if response.HasField("ended"):
            return out, response.ended
        out += b"".join(c.data for c in response.output.chunks)


async def test_input_reaches_the_job_and_eof_is_passed_on(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await _start(alice, ["cat"])
        assert job.stdin == PIPE
        call = alice.Attach(timeout=60)
        await call.write(_start_request(job.id))
        await call.write(pb.AttachRequest(stdin=b"hello\n"))
        await call.write(pb.AttachRequest(stdin=b"\x00binary\xff\n"))
        await call.write(pb.AttachRequest(close_stdin=True))
        await call.done_writing()
        out, final = await _collect(call)
        # The client has stopped sending, so the call ends with the status at once.
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        assert out == b"hello\n\x00binary\xff\n"
        assert (final.state, final.exit_code) == (pb.JOB_STATE_EXITED, 0)
        # EOF with nothing before it: wc sees an empty stdin.
        empty = await _start(alice, ["wc", "-c"])
        call = alice.Attach(timeout=60)
        await call.write(_start_request(empty.id))
        await call.write(pb.AttachRequest(close_stdin=True))
        await call.done_writing()
        assert (await _collect(call))[0] == b"0\n"


async def test_100_mb_of_random_input_arrives_byte_exact(api: Running) -> None:
    data = os.urandom(100 << 20)
    async with api.client("alice") as alice:
        job = await _start(alice, ["sha256sum"])
        call = alice.Attach(timeout=120)
        await call.write(_start_request(job.id))
        view = memoryview(data)
        for at in range(0, len(data), 1 << 20):
            await call.write(pb.AttachRequest(stdin=bytes(view[at : at + (1 << 20)])))
        await call.write(pb.AttachRequest(close_stdin=True))
        await call.done_writing()
        out, final = await _collect(call)
    assert out == hashlib.sha256(data).hexdigest().encode() + b"  -\n"
    assert final.exit_code == 0


async def test_attach_refuses_input_where_there_is_no_stdin(api: Running) -> None:
    async with api.client("alice") as alice:
        none = await _start(alice, ["sleep", "600"], stdin=pb.STDIN_MODE_NONE)
        call = alice.Attach(iter([_start_request(none.id)]), timeout=10)
        try:
            await code_of(call)
        finally:
            call.cancel()
        refused = alice.Attach(iter([_start_request(none.id)]), timeout=10)
        assert await code_of(refused) == grpc.StatusCode.FAILED_PRECONDITION
        ended = await _start(alice, ["true"])
        await alice.WaitJob(pb.JobRequest(id=ended.id), timeout=30)
        late = alice.Attach(iter([_start_request(ended.id)]), timeout=10)
        assert await code_of(late) == grpc.StatusCode.FAILED_PRECONDITION
        # Watching only is fine on either; from an ended job it is its output and status.
        watch = alice.Attach(iter([_start_request(ended.id, stdin=False)]), timeout=10)
        assert (await _collect(watch))[1].state == pb.JOB_STATE_EXITED
        bad_first = alice.Attach(iter([pb.AttachRequest(stdin=b"x")]), timeout=10)
        assert await code_of(bad_first) == grpc.StatusCode.INVALID_ARGUMENT


async def test_two_attachers_share_output_and_input_in_arrival_order(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await _start(alice, ["cat"])
        first, second = alice.Attach(timeout=60), alice.Attach(timeout=60)
        await first.write(_start_request(job.id))
        await second.write(_start_request(job.id))
        assert (await asyncio.wait_for(second.read(), 30)).attached
        await first.write(pb.AttachRequest(stdin=b"one\n"))
        # The second's input follows once the first's has come back: arrival order.
        seen = b""
        while b"one\n" not in seen:
            response = await asyncio.wait_for(second.read(), 30)
            seen += b"".join(c.data for c in response.output.chunks)
        await second.write(pb.AttachRequest(stdin=b"two\n"))
        await second.write(pb.AttachRequest(close_stdin=True))
        await first.done_writing()
        await second.done_writing()
        out_first, final = await _collect(first)
        out_second, _ = await _collect(second, accepted=True)
    assert out_first == b"one\ntwo\n"
    assert seen + out_second == b"one\ntwo\n"
    assert final.exit_code == 0


async def test_a_job_that_never_reads_holds_back_the_sender_not_the_server(api: Running) -> None:
    """Flow control: what the server takes is bounded by the pipe and gRPC's window, so a
    sender pushing 256 MiB at a job that never reads stalls; stop still works and the attach
    ends with the final status."""
    async with api.client("alice") as alice:
        job = await _start(alice, ["sleep", "600"])
        call = alice.Attach(timeout=120)
        await call.write(_start_request(job.id))
        chunk = b"x" * (1 << 20)
        sent = 0
        under_way = asyncio.Event()

        async def push() -> None:
            nonlocal sent
            for _ in range(256):
                await call.write(pb.AttachRequest(stdin=chunk))
                sent += len(chunk)
                under_way.set()

        pushing = asyncio.ensure_future(push())
        await asyncio.wait_for(under_way.wait(), 60)
        # A deadline, not a synchronisation: in these seconds it would finish if the
        # server buffered what the job does not read.
        done, _ = await asyncio.wait({pushing}, timeout=3)
        assert not done, f"{sent >> 20} MiB accepted by a job that reads nothing"
        # The pipe's 1 MiB and the windows of gRPC and both ends' sockets: tens of MiB at
        # most under load (measured 5-20), never the 256 MiB sent.
        assert sent <= 64 << 20, f"{sent >> 20} MiB"
        stopped = await alice.StopJob(pb.StopJobRequest(id=job.id, grace_seconds=0), timeout=30)
        assert stopped.state == pb.JOB_STATE_STOPPED
        _, final = await _collect(call)
        assert final.state == pb.JOB_STATE_STOPPED
        # What the job no longer reads is drained and dropped: the sender is never left
        # blocked on a write (whose failure would fail its reads too).
        await asyncio.wait_for(pushing, 60)
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF


async def test_an_attach_can_signal_the_job_without_sending_input(api: Running) -> None:
    async with api.client("alice") as alice:
        script = 'trap "echo got USR1; exit 3" USR1; echo ready; while :; do sleep 0.1; done'
        job = await _start(alice, ["sh", "-c", script], stdin=pb.STDIN_MODE_NONE)
        call = alice.Attach(timeout=60)
        await call.write(_start_request(job.id, stdin=False))
        assert (await asyncio.wait_for(call.read(), 30)).attached
        seen = b""
        while b"ready" not in seen:  # the trap is set
            response = await asyncio.wait_for(call.read(), 30)
            seen += b"".join(c.data for c in response.output.chunks)
        await call.write(pb.AttachRequest(signal=10))
        await call.done_writing()
        out, final = await _collect(call, accepted=True)
        assert b"got USR1\n" in out, out  # (its sleep, signalled too, may be reported)
        assert (final.state, final.exit_code) == (pb.JOB_STATE_EXITED, 3)


async def test_input_before_the_start_is_refused(api: Running) -> None:
    async with api.client("alice") as alice:
        for rpc in (alice.Attach, alice.Exec):
            call = rpc(timeout=30)
            await call.write(pb.AttachRequest(stdin=b"too early"))
            await call.done_writing()
            assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
