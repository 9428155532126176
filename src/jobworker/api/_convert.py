"""Between runtime values and protobuf messages, validating what comes off the network."""

from __future__ import annotations

import datetime as dt
import math
import uuid

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ..runtime import (
    ExecSpec,
    InvalidSpecError,
    IOLimit,
    JobSpec,
    JobStatus,
    Limits,
    Sample,
    SandboxInfo,
    State,
    Stream,
    Usage,
)
from ._proto import jobworker_pb2 as pb

__all__ = [
    "exec_spec_from_pb",
    "job_id",
    "job_to_pb",
    "limits_to_pb",
    "spec_from_pb",
    "usage_to_pb",
]

_STATES = {
    State.CREATED: pb.JOB_STATE_CREATED,
    State.RUNNING: pb.JOB_STATE_RUNNING,
    State.EXITED: pb.JOB_STATE_EXITED,
    State.STOPPED: pb.JOB_STATE_STOPPED,
    State.FAILED: pb.JOB_STATE_FAILED,
}
STREAMS = {
    Stream.STDOUT: pb.STREAM_STDOUT,
    Stream.STDERR: pb.STREAM_STDERR,
    Stream.SYSTEM: pb.STREAM_SYSTEM,
}
_MAX_U32 = (1 << 32) - 1
_STDIN_FROM_PB = {
    pb.STDIN_MODE_NONE: "none",
    pb.STDIN_MODE_PIPE: "pipe",
    pb.STDIN_MODE_TTY: "tty",
}
_STDIN_TO_PB = {mode: number for number, mode in _STDIN_FROM_PB.items()}


def job_id(raw: str) -> str:
    """The canonical form of a job id from a request.

    Raises:
        InvalidSpecError: it is not a UUID.
    """
    try:
        parsed = uuid.UUID(raw)
    except (ValueError, TypeError):
        raise InvalidSpecError(f"malformed job id {raw[:64]!r}; ids are UUIDs") from None
    return str(parsed)


def _optional(message: Message, field: str) -> int | None:
    if not message.HasField(field):
        return None
    value = getattr(message, field)
    return int(value)


def limits_from_pb(limits: pb.Limits) -> Limits:
    """Raises InvalidSpecError for out-of-range values."""
    cpus = limits.cpus if limits.HasField("cpus") else None
    if cpus is not None and not math.isfinite(cpus):
        raise InvalidSpecError("cpus must be a finite number")
    weight = _optional(limits, "cpu_weight")
    io = tuple(
        IOLimit(
            device=item.device or None,
            read_bps=_optional(item, "read_bps"),
            write_bps=_optional(item, "write_bps"),
            read_iops=_optional(item, "read_iops"),
            write_iops=_optional(item, "write_iops"),
        )
        for item in limits.io
    )
    return Limits(
        cpus=cpus,
        cpu_weight=weight,
        memory_bytes=_optional(limits, "memory_bytes"),
        pids=_optional(limits, "pids"),
        io=io,
        tmp_bytes=_optional(limits, "tmp_bytes"),
    )


def spec_from_pb(spec: pb.JobSpec, owner: str) -> JobSpec:
    """The runtime spec of a request, owned by the caller.

    Raises:
        InvalidSpecError: the spec is malformed (the message names the field).
    """
    return JobSpec(
        argv=tuple(spec.argv),
        env=dict(spec.env),
        cwd=spec.workdir or None,
        owner=owner,
        limits=limits_from_pb(spec.limits),
        host_network=spec.host_network,
        image=spec.image or None,
        seccomp=not spec.seccomp_unconfined,
        name=spec.name or None,
        labels=dict(spec.labels),
        timeout_s=spec.timeout_seconds if spec.HasField("timeout_seconds") else None,
        stdin=_STDIN_FROM_PB.get(spec.stdin, "unknown"),
        window=(spec.window.rows or 24, spec.window.cols or 80),
        term=spec.term or "xterm",
    )


def exec_spec_from_pb(start: pb.ExecStart) -> ExecSpec:
    """The runtime's spec of an Exec's first request.

    Raises:
        InvalidSpecError: it is malformed (the message names the field).
    """
    return ExecSpec(
        argv=tuple(start.argv),
        env=dict(start.env),
        cwd=start.workdir or None,
        stdin=start.stdin,
        tty=start.tty,
        window=(start.window.rows or 24, start.window.cols or 80),
        term=start.term or "xterm",
    )


def usage_to_pb(sample: Sample) -> pb.UsageSample:
    return pb.UsageSample(
        time_unix_nano=sample.time_ns,
        cpu_seconds=sample.cpu_seconds,
        memory_bytes=sample.memory_bytes,
        io_read_bytes=sample.io_read_bytes,
        io_write_bytes=sample.io_write_bytes,
        pids=sample.pids,
    )


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ts(when: dt.datetime | None) -> Timestamp | None:
    """``when`` (timezone-aware, as the runtime's are) as a Timestamp: by integer
    arithmetic, exact, and a fifth of FromDatetime's cost (which converts through a time
    tuple), seen in every status a reply carries."""
    if when is None:
        return None
    delta = when - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def limits_to_pb(limits: Limits) -> pb.Limits:
    out = pb.Limits(
        io=[
            pb.IOLimit(
                device=io.device or "",
                read_bps=io.read_bps,
                write_bps=io.write_bps,
                read_iops=io.read_iops,
                write_iops=io.write_iops,
            )
            for io in limits.io
        ]
    )
    if limits.cpus is not None:
        out.cpus = limits.cpus
    if limits.cpu_weight is not None:
        out.cpu_weight = limits.cpu_weight
    if limits.memory_bytes is not None:
        out.memory_bytes = limits.memory_bytes
    if limits.pids is not None:
        out.pids = min(limits.pids, _MAX_U32)
    if limits.tmp_bytes is not None:
        out.tmp_bytes = limits.tmp_bytes
    return out


def _sandbox_to_pb(sandbox: SandboxInfo | None) -> pb.Sandbox | None:
    if sandbox is None:
        return None
    return pb.Sandbox(
        uid=sandbox.uid,
        gid=sandbox.gid,
        root=sandbox.image or "host, read-only",
        seccomp=sandbox.seccomp,
        tmp_bytes=sandbox.tmp_bytes,
    )


def _usage_to_pb(usage: Usage | None) -> pb.Usage | None:
    if usage is None:
        return None
    return pb.Usage(
        cpu_seconds=usage.cpu_seconds,
        memory_bytes=usage.memory_bytes,
        memory_peak_bytes=usage.memory_peak_bytes,
        io_read_bytes=usage.io_read_bytes,
        io_write_bytes=usage.io_write_bytes,
    )


def job_to_pb(status: JobStatus) -> pb.Job:
    return pb.Job(
        id=status.id,
        owner=status.owner,
        argv=list(status.argv),
        state=_STATES[status.state],
        exit_code=status.exit_code,
        signal=status.signal,
        oom_killed=status.oom_killed,
        error=status.error or "",
        created_at=_ts(status.created_at),
        started_at=_ts(status.started_at),
        ended_at=_ts(status.ended_at),
        pid=status.pid,
        output_truncated=status.output_truncated,
        limits=limits_to_pb(status.limits),
        limits_enforced=status.limits_enforced,
        usage=_usage_to_pb(status.usage),
        sandbox=_sandbox_to_pb(status.sandbox),
        pids_limited=status.pids_limited,
        name=status.name or "",
        labels=dict(status.labels),
        timeout_seconds=status.timeout_s,
        reason=status.reason or "",
        stdin=_STDIN_TO_PB[status.stdin],
    )
