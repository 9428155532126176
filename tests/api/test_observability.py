"""What an operator watches: the Prometheus endpoint, the audit line of every RPC, JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobworker import __version__
from jobworker.api._logs import TextFormatter
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api.client import connect
from jobworker.identity import fingerprint

from ..runtime.helpers import PY
from .conftest import Pki, Running, cert_pool, code_of, serving
from .test_auth import _cert
from .test_network import daemon, drain, stub_for

MIB = 1 << 20
OOM = pb.JobSpec(
    argv=[PY, "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"],
    limits=pb.Limits(memory_bytes=32 * MIB),
)


async def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return str(reply.read().decode())

    text = await asyncio.wait_for(asyncio.to_thread(get), 15)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _port(running: Running) -> int:
    assert running.server.metrics is not None
    assert running.server.metrics.port is not None
    return running.server.metrics.port


async def test_metrics_are_off_by_default(api: Running) -> None:
    assert api.server.metrics is None


async def test_metrics_follow_jobs_streams_and_rpcs(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki, metrics_listen="127.0.0.1:0") as running:
        port = _port(running)
        before = await _scrape(port)
        assert _value(before, "jobworker_build_info", version=__version__) == 1
        for state in ("created", "running", "exited", "stopped", "failed"):
            assert _value(before, "jobworker_jobs", state=state) == 0
        async with running.client() as stub:
            done = await stub.CreateJob(
                pb.CreateJobRequest(spec=pb.JobSpec(argv=["echo", "hello"]), start=True),
                timeout=10,
            )
            await stub.WaitJob(pb.JobRequest(id=done.id), timeout=30)
            missing = stub.GetJob(pb.JobRequest(id="0" * 32), timeout=10)
            assert await code_of(missing) == grpc.StatusCode.NOT_FOUND
            sleeper = await stub.CreateJob(
                pb.CreateJobRequest(
                    spec=pb.JobSpec(argv=["sh", "-c", "echo up; exec sleep 600"]), start=True
                ),
                timeout=10,
            )
            follow = stub.StreamOutput(pb.OutputRequest(id=sleeper.id, follow=True), timeout=60)
            assert (await follow.read()).chunks[0].data == b"up\n"
            during = await _scrape(port)
            await stub.StopJob(pb.StopJobRequest(id=sleeper.id, grace_seconds=0), timeout=30)
            await drain(follow)
            assert await follow.code() == grpc.StatusCode.OK
            oom = await stub.CreateJob(pb.CreateJobRequest(spec=OOM, start=True), timeout=10)
            ended = await stub.WaitJob(pb.JobRequest(id=oom.id), timeout=60)
            assert ended.oom_killed
            async with asyncio.timeout(10):
                await running.server.service.no_streams.wait()
        after = await _scrape(port)

    assert _value(during, "jobworker_jobs", state="running") == 1
    assert _value(during, "jobworker_jobs", state="exited") == 1
    assert _value(during, "jobworker_output_streams") == 1
    assert _value(after, "jobworker_output_streams") == 0
    assert _value(after, "jobworker_jobs", state="running") == 0
    assert _value(after, "jobworker_jobs", state="stopped") == 1
    assert _value(after, "jobworker_jobs", state="exited") == 2
    assert _value(after, "jobworker_job_starts_total", result="running") == 3
    assert _value(after, "jobworker_job_ends_total", result="exited") == 2
    assert _value(after, "jobworker_job_ends_total", result="stopped") == 1
    assert _value(after, "jobworker_job_start_seconds_count") == 3
    assert 0 < _value(after, "jobworker_job_start_seconds_sum") < 30
    assert _value(after, "jobworker_oom_kills_total") == 1
    assert _value(after, "jobworker_streamed_bytes_total") >= len(b"hello\nup\n")
    assert _value(after, "jobworker_rpcs_total", method="GetJob", code="NOT_FOUND") == 1
    assert _value(after, "jobworker_rpcs_total", method="CreateJob", code="OK") == 3
    assert _value(after, "jobworker_rpcs_total", method="StreamOutput", code="OK") == 1


@pytest.fixture
def audit_lines() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("jobworker.audit")
    handler = Keep()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_every_rpc_gets_an_audit_line_denied_ones_too(
    tmp_path: Path, pki: Pki, audit_lines: list[logging.LogRecord]
) -> None:
    bob = fingerprint(_cert(pki, "bob"))
    alice = fingerprint(_cert(pki, "alice"))
    async with serving(tmp_path, pki, pool=cert_pool(tmp_path, revoked=[bob])) as running:
        async with running.client("alice") as stub:
            job = await stub.CreateJob(
                pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"]), start=True), timeout=10
            )
            await stub.WaitJob(pb.JobRequest(id=job.id), timeout=30)
        async with running.client("admin") as stub:
            bad = stub.StopJob(pb.StopJobRequest(id=job.id), timeout=10)
            assert await code_of(bad) == grpc.StatusCode.FAILED_PRECONDITION
        async with running.client("bob") as stub:
            denied = stub.GetJob(pb.JobRequest(id=job.id), timeout=10)
            assert await code_of(denied) == grpc.StatusCode.UNAUTHENTICATED
    fields = [record.fields for record in audit_lines]  # type: ignore[attr-defined]
    assert [(f["rpc"], f["user"], f["code"]) for f in fields] == [
        ("CreateJob", "alice", "OK"),
        ("WaitJob", "alice", "OK"),
        ("StopJob", "admin", "FAILED_PRECONDITION"),
        ("GetJob", "bob", "UNAUTHENTICATED"),
    ]
    assert all(f["job"] == job.id for f in fields)
    assert all(f["peer"].startswith("ipv4:127.0.0.1:") for f in fields)
    assert fields[0]["fingerprint"] == alice
    assert fields[0]["role"] == "user"
    assert fields[2]["role"] == "admin"
    assert "already" in fields[2]["error"]
    assert fields[3]["fingerprint"] == bob
    assert fields[3]["error"] == "the client certificate has been revoked"


async def test_a_run_jobs_audit_line_names_the_job_it_made_and_its_command(
    api: Running, audit_lines: list[logging.LogRecord]
) -> None:
    async with api.client("alice") as stub:
        request = pb.RunJobRequest(spec=pb.JobSpec(argv=["echo", "hi"]))
        responses = [r async for r in stub.RunJob(request, timeout=10)]
    fields = [record.fields for record in audit_lines]  # type: ignore[attr-defined]
    assert [(f["rpc"], f["user"], f["code"]) for f in fields] == [("RunJob", "alice", "OK")]
    assert fields[0]["job"] == responses[0].started.id
    assert fields[0]["argv"] == "echo hi"


@pytest.mark.usefixtures("subreaper")
async def test_json_log_lines(tmp_path: Path, pki: Pki) -> None:
    async with daemon(tmp_path, pki, "--log-format", "json") as d:
        channel, stub = stub_for(pki, d.port)
        async with channel:
            missing = stub.GetJob(pb.JobRequest(id="0" * 32), timeout=10)
            assert await code_of(missing) == grpc.StatusCode.NOT_FOUND
        d.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(d.proc.wait), 60) == 0
        await asyncio.wait_for(asyncio.to_thread(d.join), 60)
    entries = [json.loads(line) for line in d.log]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["message"].startswith("serving on") for e in entries)
    audit = [e for e in entries if e["logger"] == "jobworker.audit"]
    assert [(e["rpc"], e["user"], e["code"], e["job"]) for e in audit] == [
        ("GetJob", "alice", "NOT_FOUND", "0" * 32)
    ]


async def test_deleting_a_created_job_is_no_failure(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki, metrics_listen="127.0.0.1:0") as running:
        port = _port(running)
        async with running.client() as stub:
            job = await stub.CreateJob(
                pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"])), timeout=10
            )
            during = await _scrape(port)
            await stub.RemoveJob(pb.JobRequest(id=job.id), timeout=10)
            gone = stub.GetJob(pb.JobRequest(id=job.id), timeout=10)
            assert await code_of(gone) == grpc.StatusCode.NOT_FOUND
        after = await _scrape(port)
    assert _value(during, "jobworker_jobs", state="created") == 1
    assert _value(after, "jobworker_jobs", state="created") == 0
    assert _value(after, "jobworker_jobs", state="failed") == 0
    assert _value(after, "jobworker_job_ends_total", result="failed") == 0


async def test_audit_lines_cannot_be_forged_and_carry_the_command(
    tmp_path: Path, pki: Pki, audit_lines: list[logging.LogRecord]
) -> None:
    """Control characters a client sends (in an id, in argv) are escaped in the text audit
    log: one record stays one printable line. CreateJob's line carries its argv."""
    async with serving(tmp_path, pki) as running, running.client("alice") as stub:
        forged = "x\x0bfake=1\x00\n2026 INFO jobworker.audit: rpc GetJob OK user=admin"
        assert await code_of(stub.GetJob(pb.JobRequest(id=forged), timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        spec = pb.JobSpec(argv=["echo", "\x1b]0;pwned\x07", "two words"])
        await stub.CreateJob(pb.CreateJobRequest(spec=spec), timeout=10)
    formatter = TextFormatter()
    lines = [formatter.format(r) for r in audit_lines]
    for line in lines:
        assert line.isprintable(), line
    get = next(line for line in lines if "rpc GetJob" in line)
    assert "\\x0b" in get or "\\u000b" in get
    create = next(line for line in lines if "rpc CreateJob" in line)
    assert "argv=" in create
    assert "pwned" in create
    assert "\\x1b" in create or "\\u001b" in create


async def test_an_unparseable_request_is_invalid_argument_and_audited(
    tmp_path: Path, pki: Pki, audit_lines: list[logging.LogRecord]
) -> None:
    async with (
        serving(tmp_path, pki) as running,
        connect(f"127.0.0.1:{running.port}", running.pki.files("alice")) as ch,
    ):
        garbage = ch.unary_unary(
            "/jobworker.v1.JobService/GetJob",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await garbage(b"\xff\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid JobRequest message" in (caught.value.details() or "")
    audited = [r for r in audit_lines if r.getMessage() == "rpc GetJob INVALID_ARGUMENT"]
    assert audited
    assert getattr(audited[0], "fields", {})["user"] == "alice"


async def test_attach_and_exec_are_audited_and_their_input_is_not(
    tmp_path: Path, pki: Pki, audit_lines: list[logging.LogRecord]
) -> None:
    async with serving(tmp_path, pki) as running, running.client("alice") as stub:
        spec = pb.JobSpec(argv=["cat"], stdin=pb.STDIN_MODE_PIPE)
        job = await stub.CreateJob(pb.CreateJobRequest(spec=spec, start=True), timeout=10)
        call = stub.Exec(timeout=30)
        await call.write(pb.ExecRequest(start=pb.ExecStart(id=job.id, argv=["cat"], stdin=True)))
        await call.write(pb.ExecRequest(stdin=b"exec-secret\n"))
        await call.write(pb.ExecRequest(close_stdin=True))
        await call.done_writing()
        async for response in call:
            if response.HasField("ended"):
                assert response.ended.exit_code == 0
        call = stub.Attach(timeout=30)
        await call.write(pb.AttachRequest(start=pb.AttachStart(id=job.id, stdin=True)))
        await call.write(pb.AttachRequest(stdin=b"attach-secret\n"))
        await call.write(pb.AttachRequest(close_stdin=True))
        await call.done_writing()
        async for _ in call:
            pass
    fields = [r.fields for r in audit_lines]  # type: ignore[attr-defined]
    events = [(f["rpc"], f.get("event"), f["user"]) for f in fields if "event" in f]
    assert events == [
        ("Exec", "begin", "alice"),
        ("Exec", "end", "alice"),
        ("Attach", "begin", "alice"),
        ("Attach", "end", "alice"),
    ]
    exec_end = next(f for f in fields if f.get("event") == "end" and f["rpc"] == "Exec")
    assert (exec_end["argv"], exec_end["stdin"], exec_end["exit_code"]) == (["cat"], True, 0)
    # Keystrokes and piped input are never recorded.
    text = repr(fields) + "".join(r.getMessage() for r in audit_lines)
    assert "secret" not in text
