"""Random requests at a real server: it never crashes and every reply is a documented code."""

from __future__ import annotations

from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.api._proto import jobworker_pb2 as pb

from .conftest import Running, code_of

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
U64 = st.integers(min_value=0, max_value=2**64 - 1)
text = st.text(max_size=40)
ids = st.one_of(st.uuids().map(str), text)

limits = st.builds(
    pb.Limits,
    cpus=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    cpu_weight=st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)),
    memory_bytes=st.one_of(st.none(), U64),
    pids=st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)),
    io=st.lists(
        st.builds(
            pb.IOLimit,
            device=st.one_of(text, st.just("254:0"), st.just("8:0")),
            read_bps=st.one_of(st.none(), U64),
            write_iops=st.one_of(st.none(), U64),
        ),
        max_size=2,
    ),
)
specs = st.builds(
    pb.JobSpec,
    argv=st.lists(text, max_size=4),
    env=st.dictionaries(text, text, max_size=3),
    workdir=st.one_of(text, st.sampled_from(["/", "/tmp", "/nope", "rel"])),
    limits=limits,
    host_network=st.booleans(),
)

requests = st.one_of(
    st.tuples(st.just("CreateJob"), st.builds(pb.CreateJobRequest, spec=specs)),
    st.tuples(
        st.just("StartJobs"), st.builds(pb.StartJobsRequest, specs=st.lists(specs, max_size=3))
    ),
    st.tuples(st.just("GetJob"), st.builds(pb.JobRequest, id=ids)),
    st.tuples(st.just("StartJob"), st.builds(pb.JobRequest, id=ids)),
    st.tuples(
        st.just("StopJob"),
        st.builds(
            pb.StopJobRequest, id=ids, grace_seconds=st.floats(allow_nan=True, allow_infinity=True)
        ),
    ),
    st.tuples(
        st.just("SignalJob"),
        st.builds(pb.SignalJobRequest, id=ids, signal=st.integers(-(2**31), 2**31 - 1)),
    ),
    st.tuples(st.just("ListJobs"), st.builds(pb.ListJobsRequest, owner=text)),
    st.tuples(
        st.just("StreamOutput"),
        st.builds(
            pb.OutputRequest,
            id=ids,
            streams=st.integers(0, 2**31 - 1),
            follow=st.just(False),
        ),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(call=requests)
async def test_random_requests_get_documented_codes(api: Running, call: tuple[str, Any]) -> None:
    name, request = call
    async with api.client("alice") as stub:
        code = await code_of(getattr(stub, name)(request, timeout=10))
        assert code in DOCUMENTED, f"{name} -> {code}"
        # Still alive and answering.
        assert await code_of(stub.ListJobs(pb.ListJobsRequest(), timeout=10)) == grpc.StatusCode.OK
