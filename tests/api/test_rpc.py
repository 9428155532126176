"""Every RPC through a real server: authorization, status codes, bad input."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobworker.api._config import host_limits
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc
from jobworker.api.server import ServiceLimits
from jobworker.runtime import Limits

from ..runtime.helpers import PY
from .conftest import Pki, Running, code_of, serving

UNKNOWN = "00000000-0000-4000-8000-000000000000"
SLEEP = pb.JobSpec(argv=["sleep", "600"])


async def details_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def every_job_rpc(stub: pb_grpc.JobServiceStub, job_id: str) -> dict[str, Any]:
    return {
        "StartJob": stub.StartJob(pb.JobRequest(id=job_id), timeout=10),
        "StopJob": stub.StopJob(pb.StopJobRequest(id=job_id, grace_seconds=0), timeout=10),
        "SignalJob": stub.SignalJob(pb.SignalJobRequest(id=job_id, signal=15), timeout=10),
        "GetJob": stub.GetJob(pb.JobRequest(id=job_id), timeout=10),
        "WaitJob": stub.WaitJob(pb.JobRequest(id=job_id), timeout=10),
        "WatchJob": stub.WatchJob(pb.JobRequest(id=job_id), timeout=10),
        "StreamOutput": stub.StreamOutput(pb.OutputRequest(id=job_id), timeout=10),
    }


async def test_run_a_job_end_to_end(api: Running) -> None:
    async with api.client("alice") as stub:
        job = await stub.CreateJob(
            pb.CreateJobRequest(
                spec=pb.JobSpec(argv=["sh", "-c", "echo out; echo err >&2; exit 3"]), start=True
            ),
            timeout=10,
        )
        assert job.owner == "alice"
        final = await stub.WaitJob(pb.JobRequest(id=job.id), timeout=10)
        assert final.state == pb.JOB_STATE_EXITED
        assert final.exit_code == 3
        assert final.HasField("usage")
        chunks = [
            c
            async for r in stub.StreamOutput(pb.OutputRequest(id=job.id, follow=True), timeout=10)
            for c in r.chunks
        ]
    assert b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDOUT) == b"out\n"
    assert b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDERR) == b"err\n"
    assert all(c.time_unix_nano > 0 for c in chunks)


async def test_run_job_starts_streams_and_ends_in_one_call(api: Running) -> None:
    """RunJob: the job as started, then its output, then its final status; nothing after."""
    spec = pb.JobSpec(argv=["sh", "-c", "echo out; echo err >&2; exit 3"])
    async with api.client("alice") as stub:
        responses = [r async for r in stub.RunJob(pb.RunJobRequest(spec=spec), timeout=10)]
        kinds = [r.WhichOneof("response") for r in responses]
        assert kinds[0] == "started"
        assert kinds[-1] == "ended"
        assert set(kinds[1:-1]) == {"output"}
        started, ended = responses[0].started, responses[-1].ended
        assert started.owner == "alice"
        assert started.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_EXITED)
        assert (ended.id, ended.state, ended.exit_code) == (started.id, pb.JOB_STATE_EXITED, 3)
        chunks = [c for r in responses[1:-1] for c in r.output.chunks]
        assert b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDOUT) == b"out\n"
        assert b"".join(c.data for c in chunks if c.stream == pb.STREAM_STDERR) == b"err\n"
        # The same job as any other: its output is there to read again.
        again = [
            c
            async for r in stub.StreamOutput(pb.OutputRequest(id=started.id), timeout=10)
            for c in r.chunks
        ]
        assert [c.data for c in again] == [c.data for c in chunks]


async def test_run_job_of_a_command_that_cannot_start_says_so_first_and_last(
    api: Running,
) -> None:
    async with api.client("alice") as stub:
        call = stub.RunJob(pb.RunJobRequest(spec=pb.JobSpec(argv=["/no/such/cmd"])), timeout=10)
        responses = [r async for r in call]
    assert [r.WhichOneof("response") for r in responses] == ["started"]
    assert responses[0].started.state == pb.JOB_STATE_FAILED
    assert responses[0].started.reason == "not_found"


async def test_run_job_streams_only_what_is_asked_and_refuses_bad_requests_before_running(
    api: Running,
) -> None:
    spec = pb.JobSpec(argv=["sh", "-c", "echo out; echo err >&2"])
    async with api.client("alice") as stub:
        request = pb.RunJobRequest(spec=spec, streams=pb.OUTPUT_SELECTOR_STDERR)
        responses = [r async for r in stub.RunJob(request, timeout=10)]
        chunks = [c for r in responses if r.HasField("output") for c in r.output.chunks]
        assert [(c.stream, c.data) for c in chunks] == [(pb.STREAM_STDERR, b"err\n")]
        for bad in (
            pb.RunJobRequest(spec=spec, streams=7),  # type: ignore[arg-type]
            pb.RunJobRequest(spec=pb.JobSpec(argv=[])),
        ):
            assert await code_of(stub.RunJob(bad, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        listed = await stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert len(listed.jobs) == 1  # the first request's only


async def test_create_then_start_and_watch(api: Running) -> None:
    async with api.client("alice") as stub:
        job = await stub.CreateJob(pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"])), timeout=10)
        assert job.state == pb.JOB_STATE_CREATED
        watch = stub.WatchJob(pb.JobRequest(id=job.id), timeout=10)
        first = await watch.read()
        assert first.state == pb.JOB_STATE_CREATED
        await stub.StartJob(pb.JobRequest(id=job.id), timeout=10)
        rest = []
        while (change := await watch.read()) is not grpc.aio.EOF:
            rest.append(change.state)
    assert rest == [pb.JOB_STATE_RUNNING, pb.JOB_STATE_EXITED]


async def test_other_users_jobs_are_not_found_on_every_rpc(api: Running) -> None:
    async with api.client("alice") as alice, api.client("bob") as bob:
        job = await alice.CreateJob(pb.CreateJobRequest(spec=SLEEP, start=True), timeout=10)
        for name, call in every_job_rpc(bob, job.id).items():
            assert await code_of(call) == grpc.StatusCode.NOT_FOUND, name
        # Exactly what an unknown id gets: nothing reveals that alice's job exists.
        theirs = await details_of(bob.GetJob(pb.JobRequest(id=job.id), timeout=10))
        unknown = await details_of(bob.GetJob(pb.JobRequest(id=UNKNOWN), timeout=10))
        assert theirs[1].replace(job.id, "ID") == unknown[1].replace(UNKNOWN, "ID")
        refused = await details_of(bob.ListJobs(pb.ListJobsRequest(owner="alice"), timeout=10))
        assert refused == (
            grpc.StatusCode.PERMISSION_DENIED,
            "only admins may list other owners' jobs; leave out the owner to see your own",
        )
        mine = await bob.ListJobs(pb.ListJobsRequest(owner="bob"), timeout=10)
        assert list(mine.jobs) == []
        still = await alice.GetJob(pb.JobRequest(id=job.id), timeout=10)
        assert still.state == pb.JOB_STATE_RUNNING


async def test_admin_sees_and_stops_everything(api: Running) -> None:
    async with api.client("alice") as alice, api.client("bob") as bob, api.client("admin") as admin:
        a = await alice.CreateJob(pb.CreateJobRequest(spec=SLEEP, start=True), timeout=10)
        b = await bob.CreateJob(pb.CreateJobRequest(spec=SLEEP, start=True), timeout=10)
        everyone = await admin.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert {j.id for j in everyone.jobs} == {a.id, b.id}
        only_bob = await admin.ListJobs(pb.ListJobsRequest(owner="bob"), timeout=10)
        assert [j.id for j in only_bob.jobs] == [b.id]
        mine = await alice.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert [j.id for j in mine.jobs] == [a.id]
        stopped = await admin.StopJob(pb.StopJobRequest(id=a.id, grace_seconds=1), timeout=30)
        assert stopped.state == pb.JOB_STATE_STOPPED
        signalled = await admin.SignalJob(pb.SignalJobRequest(id=b.id, signal=9), timeout=10)
        assert signalled.owner == "bob"
        final = await admin.WaitJob(pb.JobRequest(id=b.id), timeout=10)
        assert final.signal == signal.SIGKILL


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (pb.JobSpec(argv=[]), "argv is empty"),
        (pb.JobSpec(argv=["ls", "a\0b"]), "NUL"),
        (pb.JobSpec(argv=["x" * 200_000]), "longer than"),
        (pb.JobSpec(argv=["ls"], env={"A=B": "1"}), "contains '='"),
        (pb.JobSpec(argv=["ls"], workdir="relative"), "not absolute"),
        (pb.JobSpec(argv=["ls"], workdir="/no/such/dir"), "does not exist"),
        (pb.JobSpec(argv=["ls"], limits=pb.Limits(cpus=-1)), "cpus"),
        (pb.JobSpec(argv=["ls"], limits=pb.Limits(cpus=float("nan"))), "cpus"),
        (pb.JobSpec(argv=["ls"], limits=pb.Limits(memory_bytes=10)), "memory"),
        (
            pb.JobSpec(argv=["ls"], limits=pb.Limits(io=[pb.IOLimit(device="sda", read_bps=1)])),
            "MAJ:MIN",
        ),
    ],
)
async def test_bad_specs_are_invalid_argument(
    api: Running, spec: pb.JobSpec, fragment: str
) -> None:
    async with api.client("alice") as stub:
        code, details = await details_of(stub.CreateJob(pb.CreateJobRequest(spec=spec), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details


async def test_other_invalid_arguments(api: Running) -> None:
    async with api.client("alice") as stub:
        job = await stub.CreateJob(pb.CreateJobRequest(spec=SLEEP, start=True), timeout=10)
        for call in (
            stub.GetJob(pb.JobRequest(id="not-a-uuid"), timeout=10),
            stub.GetJob(pb.JobRequest(id=""), timeout=10),
            stub.SignalJob(pb.SignalJobRequest(id=job.id, signal=0), timeout=10),
            stub.SignalJob(pb.SignalJobRequest(id=job.id, signal=4096), timeout=10),
            stub.StopJob(pb.StopJobRequest(id=job.id, grace_seconds=-1), timeout=10),
        ):
            assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            await code_of(
                stub.StreamOutput(pb.OutputRequest(id=job.id, streams=7), timeout=10)  # type: ignore[arg-type]
            )
        ) == grpc.StatusCode.INVALID_ARGUMENT


async def test_ended_jobs_are_failed_precondition(api: Running) -> None:
    async with api.client("alice") as stub:
        job = await stub.CreateJob(
            pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"]), start=True), timeout=10
        )
        await stub.WaitJob(pb.JobRequest(id=job.id), timeout=10)
        code, details = await details_of(stub.StopJob(pb.StopJobRequest(id=job.id), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "already exited with code 0" in details
        assert (
            await code_of(stub.StartJob(pb.JobRequest(id=job.id), timeout=10))
            == grpc.StatusCode.FAILED_PRECONDITION
        )


async def test_start_several_commands_in_one_call(api: Running) -> None:
    async with api.client("alice") as stub:
        reply = await stub.StartJobs(
            pb.StartJobsRequest(
                specs=[
                    pb.JobSpec(argv=["true"]),
                    pb.JobSpec(argv=[]),
                    pb.JobSpec(argv=["no-such-cmd"]),
                ]
            ),
            timeout=10,
        )
    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds == ["job", "error", "job"]
    assert reply.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.results[2].job.state == pb.JOB_STATE_FAILED
    assert "not found" in reply.results[2].job.error


async def test_server_caps_are_resource_exhausted(tmp_path: Path, pki: Pki) -> None:
    limits = ServiceLimits(max_active_jobs_per_user=2, max_streams_per_user=1)
    async with (
        serving(tmp_path, pki, limits=limits, max_message_bytes=64 * 1024) as running,
        running.client("alice") as stub,
        running.client("bob") as bob,
    ):
        first = await stub.CreateJob(pb.CreateJobRequest(spec=SLEEP, start=True), timeout=10)
        await stub.CreateJob(pb.CreateJobRequest(spec=SLEEP, start=True), timeout=10)
        code, details = await details_of(
            stub.CreateJob(pb.CreateJobRequest(spec=SLEEP), timeout=10)
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in details
        assert (
            await code_of(bob.CreateJob(pb.CreateJobRequest(spec=SLEEP), timeout=10))
            == grpc.StatusCode.OK
        )
        watch = stub.WatchJob(pb.JobRequest(id=first.id), timeout=10)
        await watch.read()  # the one stream alice may have is now open
        follow = stub.StreamOutput(pb.OutputRequest(id=first.id, follow=True), timeout=30)
        assert await code_of(follow) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # RunJob is a stream too: refused before it makes a job.
        run = bob.RunJob(pb.RunJobRequest(spec=SLEEP), timeout=30)
        assert (await run.read()).started.state == pb.JOB_STATE_RUNNING  # bob's one stream
        again = bob.RunJob(pb.RunJobRequest(spec=SLEEP), timeout=30)
        assert await code_of(again) == grpc.StatusCode.RESOURCE_EXHAUSTED
        listed = await bob.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert len(listed.jobs) == 2  # his CreateJob's and the first RunJob's
        run.cancel()
        watch.cancel()
        big = pb.JobSpec(argv=["echo", "x" * 100_000])
        assert (
            await code_of(bob.CreateJob(pb.CreateJobRequest(spec=big), timeout=10))
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (pb.Limits(cpus=1e9), "cpus limit 1e+09 CPUs is above the server maximum"),
        (pb.Limits(cpus=64), "cpus limit 64 CPUs is above the server maximum"),
        (pb.Limits(pids=4294967295), "pids limit 4294967295 tasks is above the server maximum"),
        (pb.Limits(memory_bytes=1 << 40), "memory limit 1024Gi (1099511627776 bytes) is above"),
    ],
)
async def test_values_the_host_cannot_honour_are_refused_before_anything_is_made(
    tmp_path: Path, pki: Pki, limits: pb.Limits, message: str
) -> None:
    """With the shipped defaults (maxima from the host's size): INVALID_ARGUMENT naming the
    allowed range, no job created, and no server internals (cgroup paths) in the words."""
    _, maxima = host_limits()
    runtime = {"max_limits": maxima}
    async with serving(tmp_path, pki, runtime=runtime) as running, running.client() as stub:
        spec = pb.JobSpec(argv=["true"], limits=limits)
        code, details = await details_of(
            stub.CreateJob(pb.CreateJobRequest(spec=spec, start=True), timeout=10)
        )
        listed = await stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert "ask for at most" in details
    assert "/sys/fs/cgroup" not in details
    assert list(listed.jobs) == []


async def test_the_shipped_defaults_limit_every_job(tmp_path: Path, pki: Pki) -> None:
    defaults, _ = host_limits()
    runtime = {"default_limits": defaults}
    async with serving(tmp_path, pki, runtime=runtime) as running, running.client() as stub:
        job = await stub.CreateJob(
            pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"]), start=True), timeout=10
        )
    assert job.limits.pids == 1024
    assert job.limits.cpus >= 1
    assert 0 < job.limits.memory_bytes <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


async def test_the_jobs_quota_holds_under_a_burst_of_concurrent_creates(
    tmp_path: Path, pki: Pki
) -> None:
    """400 concurrent CreateJob calls from one user against a quota of 20: exactly 20
    jobs exist, and every other call is RESOURCE_EXHAUSTED."""
    limits = ServiceLimits(max_active_jobs_per_user=20)
    async with serving(tmp_path, pki, limits=limits) as running, running.client("alice") as stub:
        calls = [
            stub.CreateJob(pb.CreateJobRequest(spec=SLEEP, start=True), timeout=60)
            for _ in range(400)
        ]
        codes = await asyncio.gather(*(code_of(c) for c in calls))
        listed = await stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert codes.count(grpc.StatusCode.OK) == 20
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 380
    assert len([j for j in listed.jobs if j.state == pb.JOB_STATE_RUNNING]) == 20


async def test_host_network_is_permission_denied_unless_allowed(tmp_path: Path, pki: Pki) -> None:
    runtime = {"host_network_owners": frozenset({"admin"})}
    async with serving(tmp_path, pki, runtime=runtime) as running:
        spec = pb.JobSpec(argv=["true"], host_network=True)
        async with running.client("alice") as alice, running.client("admin") as admin:
            assert (
                await code_of(alice.CreateJob(pb.CreateJobRequest(spec=spec), timeout=10))
                == grpc.StatusCode.PERMISSION_DENIED
            )
            assert (
                await code_of(admin.CreateJob(pb.CreateJobRequest(spec=spec), timeout=10))
                == grpc.StatusCode.OK
            )


async def test_limit_above_server_maximum(tmp_path: Path, pki: Pki) -> None:
    runtime = {"max_limits": Limits(memory_bytes=64 << 20)}
    async with serving(tmp_path, pki, runtime=runtime) as running, running.client("alice") as stub:
        spec = pb.JobSpec(argv=["true"], limits=pb.Limits(memory_bytes=128 << 20))
        code, details = await details_of(stub.CreateJob(pb.CreateJobRequest(spec=spec), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "above the server maximum" in details


async def test_python_job_output_has_timestamps_in_order(api: Running) -> None:
    code = "import sys\nfor i in range(100): print(i, flush=True)"
    async with api.client("alice") as stub:
        job = await stub.CreateJob(
            pb.CreateJobRequest(spec=pb.JobSpec(argv=[PY, "-c", code]), start=True), timeout=10
        )
        await stub.WaitJob(pb.JobRequest(id=job.id), timeout=30)
        responses = [r async for r in stub.StreamOutput(pb.OutputRequest(id=job.id), timeout=10)]
    data = b"".join(c.data for r in responses for c in r.chunks)
    assert data == b"".join(b"%d\n" % i for i in range(100))
    stamps = [c.time_unix_nano for r in responses for c in r.chunks]
    assert stamps == sorted(stamps)
    # Small writes travel batched: fewer messages than writes.
    assert len(responses) < 100
    await asyncio.sleep(0)


async def test_unexpected_error_is_internal_with_a_reference(
    api: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_job_id: str) -> None:
        raise ZeroDivisionError("a secret detail the client must not see")

    monkeypatch.setattr(api.server.runtime, "owner_of", broken)  # an injected fault
    async with api.client("alice") as stub:
        code, details = await details_of(stub.GetJob(pb.JobRequest(id=UNKNOWN), timeout=10))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in details
    assert "Traceback" not in details
    reference = details.split("reference ")[1].split()[0]
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None


async def test_a_client_going_away_mid_stream_logs_nothing_above_debug(
    api: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A follower that stops reading and then cancels leaves the server blocked sending
    to it; the cancel is normal and must log nothing above debug (gRPC logs it at ERROR
    with a traceback otherwise)."""
    endless = pb.JobSpec(argv=[PY, "-c", "import os\nwhile True: os.write(1, b'x' * 65536)"])
    caplog.set_level(logging.DEBUG)
    async with api.client("alice") as stub, api.client("alice") as reader:
        job = await stub.CreateJob(pb.CreateJobRequest(spec=endless, start=True), timeout=10)
        for _ in range(3):
            call = stub.StreamOutput(pb.OutputRequest(id=job.id, follow=True), timeout=60)
            await asyncio.wait_for(call.read(), 10)  # streaming; then never read again
            # While another follower reads 16 MiB, the server fills this one's window
            # (at most a few MiB) and then waits to send.
            read = 0
            other = reader.StreamOutput(pb.OutputRequest(id=job.id, follow=True), timeout=60)
            async with asyncio.timeout(30):
                async for reply in other:
                    read += sum(len(c.data) for c in reply.chunks)
                    if read >= 16 << 20:
                        break
            other.cancel()
            call.cancel()
        async with asyncio.timeout(30):
            await api.server.runtime.no_output_readers()
        await stub.StopJob(pb.StopJobRequest(id=job.id, grace_seconds=0), timeout=10)
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG and r.name.startswith("grpc")]
    assert loud == [], [r.getMessage() for r in loud]
