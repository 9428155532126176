"""One authorization chokepoint: every RPC, walked from the service's descriptor.

A new RPC fails here until it is declared through the chokepoint (``job_rpc``,
``job_stream`` or ``caller_rpc``) and, if it names a job, answers another user's job exactly
as an unknown one.
"""

from __future__ import annotations

from typing import Any

import grpc

from jobworker.api._errors import CODES, to_status
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._service import RPC_SCOPES
from jobworker.runtime import JobworkerError, RuntimeClosedError
from jobworker.runtime import _errors as runtime_errors

from .conftest import Running

UNKNOWN = "00000000-0000-4000-8000-000000000000"
SERVICE = pb.DESCRIPTOR.services_by_name["JobService"]


async def _outcome(stub: Any, method: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with ``request`` (as a stream of one for client-streaming RPCs) and
    read any response stream to its end; the status and details it finished with."""
    rpc = getattr(stub, method.name)
    call = rpc(iter([request]) if method.client_streaming else request, timeout=10)
    try:
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _naming(method: Any, job_id: str) -> Any:
    """A request of ``method`` that names ``job_id`` (for a bidirectional RPC, its start)."""
    request_type = getattr(pb, method.input_type.name)
    if method.client_streaming:
        start = method.input_type.fields_by_name["start"].message_type
        assert start is not None
        start_type = getattr(pb, start.name)
        return request_type(start=start_type(id=job_id, stdin=True))
    return request_type(id=job_id)


def test_every_rpc_goes_through_the_chokepoint() -> None:
    """Each RPC of the proto is declared job- or caller-scoped, and only RPCs whose request
    names no job may be caller-scoped."""
    for method in SERVICE.methods:
        assert method.name in RPC_SCOPES, f"{method.name} is not declared through the chokepoint"
        fields = {f.name for f in method.input_type.fields}
        start = method.input_type.fields_by_name.get("start")
        if method.client_streaming and start is not None and start.message_type is not None:
            # The first request names the job, in its start message.
            fields = {f.name for f in start.message_type.fields}
        if RPC_SCOPES[method.name] == "job":
            assert "id" in fields, f"{method.name} is job-scoped but its request names no job"
        else:
            assert "id" not in fields, f"{method.name} names a job but skips authorization"


async def test_another_users_job_is_not_found_on_every_job_rpc(api: Running) -> None:
    async with api.client("alice") as alice:
        job = await alice.CreateJob(
            pb.CreateJobRequest(spec=pb.JobSpec(argv=["sleep", "30"]), start=True), timeout=10
        )
    job_rpcs = [m for m in SERVICE.methods if RPC_SCOPES[m.name] == "job"]
    assert job_rpcs
    async with api.client("bob") as bob:
        for method in job_rpcs:
            foreign = await _outcome(bob, method, _naming(method, job.id))
            unknown = await _outcome(bob, method, _naming(method, UNKNOWN))
            assert foreign[0] == grpc.StatusCode.NOT_FOUND, method.name
            assert unknown[0] == grpc.StatusCode.NOT_FOUND, method.name
            # The same words either way, so the answer tells nothing about the id.
            assert foreign[1].replace(job.id, "ID") == unknown[1].replace(UNKNOWN, "ID")
        # Asking for another owner's jobs is refused out loud (whoever that owner is), and
        # bob's own listing does not hold alice's job.
        refused = await _outcome(
            bob, SERVICE.methods_by_name["ListJobs"], pb.ListJobsRequest(owner="alice")
        )
        assert refused[0] == grpc.StatusCode.PERMISSION_DENIED
        nobody = await _outcome(
            bob, SERVICE.methods_by_name["ListJobs"], pb.ListJobsRequest(owner="zed")
        )
        assert nobody == refused
        listed = await bob.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert [j.id for j in listed.jobs] == []
    # bob's calls changed nothing: alice's job still runs.
    async with api.client("alice") as alice:
        still = await alice.GetJob(pb.JobRequest(id=job.id), timeout=10)
    assert still.state == pb.JOB_STATE_RUNNING


async def test_authorization_reads_no_job_state(api: Running, monkeypatch: Any) -> None:
    """The owner check is an index lookup: a refused call never reaches the job's status
    (which reads its cgroup)."""

    async def must_not_run(_job_id: str) -> None:
        raise AssertionError("status read for a call that authorization refuses")

    async with api.client("alice") as alice:
        job = await alice.CreateJob(pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"])), timeout=10)
    monkeypatch.setattr(api.server.runtime, "status", must_not_run)
    async with api.client("bob") as bob:
        code, _ = await _outcome(bob, SERVICE.methods_by_name["GetJob"], pb.JobRequest(id=job.id))
    assert code == grpc.StatusCode.NOT_FOUND


def test_every_runtime_error_maps_to_a_deliberate_code() -> None:
    classes = [
        value
        for value in vars(runtime_errors).values()
        if isinstance(value, type) and issubclass(value, JobworkerError)
    ]
    assert len(classes) > 5
    for kind in classes:
        assert kind in CODES, f"{kind.__name__} has no deliberate gRPC code in _errors.CODES"
    assert to_status(RuntimeClosedError("closed"))[0] == grpc.StatusCode.UNAVAILABLE
