"""Exec: a process run inside a running job, through a real server (docker exec's part)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
import pytest

from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc

from .conftest import Running, code_of

Stub = pb_grpc.JobServiceStub


async def _job(stub: Stub, argv: list[str], **spec: Any) -> pb.Job:
    request = pb.CreateJobRequest(spec=pb.JobSpec(argv=argv, **spec), start=True)
    job: pb.Job = await stub.CreateJob(request, timeout=10)
    assert job.state == pb.JOB_STATE_RUNNING, job.error
    return job


async def _line(stub: Stub, job: pb.Job) -> bytes:
    """The job's first line of output, once it is there."""
    request = pb.OutputRequest(id=job.id, follow=True)
    out = b""
    async for response in stub.StreamOutput(request, timeout=30):
        out += b"".join(c.data for c in response.chunks)
        if b"\n" in out:
            return out.split(b"\n", 1)[0]
    raise AssertionError(f"the job ended without a line: {out!r}")


def _start(job: pb.Job, argv: list[str], **kw: Any) -> pb.ExecRequest:
    return pb.ExecRequest(start=pb.ExecStart(id=job.id, argv=argv, **kw))


async def _run(
    stub: Stub, job: pb.Job, argv: list[str], *, stdin: bytes | None = None, **kw: Any
) -> tuple[bytes, bytes, pb.ExecEnd]:
    """Exec ``argv`` in ``job`` (``stdin``: sent, then EOF); its stdout, stderr, and end."""
    call = stub.Exec(timeout=60)
    await call.write(_start(job, argv, stdin=stdin is not None, **kw))
    if stdin is not None:
        await call.write(pb.ExecRequest(stdin=stdin))
        await call.write(pb.ExecRequest(close_stdin=True))
    await call.done_writing()
    return await _collect(call)


async def _collect(call: Any, *, started: bool = False) -> tuple[bytes, bytes, pb.ExecEnd]:
    out = {pb.STREAM_STDOUT: b"", pb.STREAM_STDERR: b""}
    first = True
    while True:
        response = await asyncio.wait_for(call.read(), 60)
        assert response is not grpc.aio.EOF, "the exec ended without saying how"
        if response.HasField("ended"):
            return out[pb.STREAM_STDOUT], out[pb.STREAM_STDERR], response.ended
        if first and not started:
            assert response.started, "the first response says the process started"
        elif response.HasField("output"):
            for chunk in response.output.chunks:
                out[chunk.stream] += chunk.data
        first = False


async def test_exec_sees_the_jobs_hostname_processes_and_files(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await _job(alice, ["sh", "-c", "hostname; echo secret > marker; exec sleep 1000"])
        hostname = await _line(alice, job)
        out, err, end = await _run(alice, job, ["sh", "-c", "hostname; cat marker; ps -e -o comm="])
        assert end.exit_code == 0, err
        lines = out.decode().split("\n")
        assert lines[0].encode() == hostname
        assert lines[1] == "secret"
        # The job's processes, and only them: its supervisor, its command, this exec.
        assert "sleep" in lines[2:], out
        assert "ps" in lines[2:], out
        assert len([x for x in lines[2:] if x]) <= 5, out
        # The exec's output is the caller's: none of it is in the job's log.
        log = b""
        async for response in alice.StreamOutput(pb.OutputRequest(id=job.id), timeout=30):
            log += b"".join(c.data for c in response.chunks)
        assert log == hostname + b"\n"


async def test_exit_codes_stdin_and_a_command_that_is_not_there(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await _job(alice, ["sleep", "1000"])
        *_, end = await _run(alice, job, ["sh", "-c", "exit 7"])
        assert (end.HasField("exit_code"), end.exit_code) == (True, 7)
        out, _, end = await _run(alice, job, ["cat"], stdin=b"hello\x00\xff\n")
        assert (out, end.exit_code) == (b"hello\x00\xff\n", 0)
        out, _, end = await _run(alice, job, ["wc", "-c"], stdin=b"")
        assert out == b"0\n"
        *_, end = await _run(alice, job, ["no-such-command-here"])
        assert end.reason == "not_found"
        assert "not found" in end.error
        assert not end.HasField("exit_code")
        # The job itself is untouched by all of it.
        assert (await alice.GetJob(pb.JobRequest(id=job.id), timeout=10)).state == (
            pb.JOB_STATE_RUNNING
        )


async def test_a_signal_reaches_the_process_and_not_the_job(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await _job(alice, ["sleep", "1000"])
        call = alice.Exec(timeout=60)
        script = 'trap "echo got; exit 3" TERM; echo ready; while :; do sleep 0.1; done'
        await call.write(_start(job, ["sh", "-c", script]))
        assert (await asyncio.wait_for(call.read(), 30)).started
        ready = await asyncio.wait_for(call.read(), 30)
        assert ready.output.chunks[0].data == b"ready\n"
        await call.write(pb.ExecRequest(signal=15))
        await call.done_writing()
        out, _, end = await _collect(call, started=True)
        assert (out, end.exit_code) == (b"got\n", 3)
        assert (await alice.GetJob(pb.JobRequest(id=job.id), timeout=10)).state == (
            pb.JOB_STATE_RUNNING
        )


async def test_a_terminal_of_the_jobs_own_with_the_callers_size(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await _job(alice, ["sleep", "1000"])
        window = pb.WindowSize(rows=33, cols=101)
        out, _, end = await _run(
            alice,
            job,
            ["sh", "-c", "tty; stty size; echo $TERM"],
            tty=True,
            window=window,
            term="vt100",
        )
        assert end.exit_code == 0
        lines = out.replace(b"\r\n", b"\n").decode().split("\n")
        assert lines[0].startswith("/dev/pts/"), out
        assert lines[1:3] == ["33 101", "vt100"], out


async def test_it_counts_against_the_jobs_pids_limit_and_ends_with_the_job(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await _job(alice, ["sleep", "1000"], limits=pb.Limits(pids=6))
        waiting = alice.Exec(timeout=60)
        await waiting.write(_start(job, ["sleep", "1000"]))
        assert (await asyncio.wait_for(waiting.read(), 30)).started
        # The job (1 task), the exec above (1) and this shell (1) leave room for 3 sleeps;
        # dash gives up at the fourth fork.
        script = "for i in 1 2 3 4 5 6; do sleep 1000 & echo started >&2; done"
        _, err, end = await _run(alice, job, ["sh", "-c", script])
        assert err.count(b"started") == 3, err
        assert b"Cannot fork" in err, err
        assert end.exit_code == 2
        # Stopping the job ends what runs inside it too: signalled with the job.
        await alice.StopJob(pb.StopJobRequest(id=job.id, grace_seconds=0), timeout=30)
        *_, end = await _collect(waiting, started=True)
        assert (end.HasField("signal"), end.signal) == (True, signal.SIGTERM)


async def test_an_ended_job_and_another_users_job_are_refused(api: Running) -> None:
    async with api.client("alice") as alice, api.client("bob") as bob:
        job = await _job(alice, ["sleep", "1000"])
        call = bob.Exec(timeout=30)
        await call.write(_start(job, ["true"]))
        await call.done_writing()
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
        await alice.StopJob(pb.StopJobRequest(id=job.id, grace_seconds=0), timeout=30)
        call = alice.Exec(timeout=30)
        await call.write(_start(job, ["true"]))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "it already stopped" in (refused.value.details() or "")
