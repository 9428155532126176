"""The one place that formats jobctl's output: JSON objects and human tables."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from .._text import command_text, escape

if TYPE_CHECKING:
    from ._io import Io

__all__ = [
    "event_text",
    "exit_status_of",
    "info_json",
    "job_json",
    "json_text",
    "outcome",
    "rfc3339",
    "size_text",
    "status_text",
    "table_text",
]

_STATES = {1: "created", 2: "running", 3: "exited", 4: "stopped", 5: "failed"}
# run and wait exit as docker run does (jobctl --help shows the table).
JOBCTL_FAILED = 125
CANNOT_EXECUTE = 126
NOT_FOUND = 127


def rfc3339(ns: int, *, digits: str = "microseconds") -> str:
    """A time in nanoseconds since the epoch, as RFC 3339 in UTC ("...Z")."""
    seconds, rest = divmod(ns, 1_000_000_000)
    when = dt.datetime.fromtimestamp(seconds, tz=dt.UTC) + dt.timedelta(microseconds=rest // 1000)
    return when.isoformat(timespec=digits).replace("+00:00", "Z")


def _time(ts: Any) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return rfc3339(ts.ToNanoseconds(), digits="auto")


def _opt(msg: Any, field: str) -> Any:
    return getattr(msg, field) if msg.HasField(field) else None


def job_json(job: Any) -> dict[str, Any]:
    """The documented JSON object of a job (status --json, ls --json)."""
    limits = job.limits
    return {
        "id": job.id,
        "name": job.name or None,
        "owner": job.owner,
        "labels": dict(sorted(job.labels.items())),
        "argv": list(job.argv),
        "state": _STATES.get(job.state, "unknown"),
        "reason": job.reason or None,
        "exit_code": _opt(job, "exit_code"),
        "signal": _opt(job, "signal"),
        "oom_killed": job.oom_killed,
        "pids_limited": job.pids_limited,
        "output_truncated": job.output_truncated,
        "error": job.error or None,
        "pid": _opt(job, "pid"),
        "timeout_seconds": _opt(job, "timeout_seconds"),
        "created_at": _time(job.created_at),
        "started_at": _time(job.started_at),
        "ended_at": _time(job.ended_at),
        "limits": {
            "cpus": _opt(limits, "cpus"),
            "cpu_weight": _opt(limits, "cpu_weight"),
            "memory_bytes": _opt(limits, "memory_bytes"),
            "pids": _opt(limits, "pids"),
            "tmp_bytes": _opt(limits, "tmp_bytes"),
            "io": [
                {
                    "device": io.device or None,
                    "read_bps": _opt(io, "read_bps"),
                    "write_bps": _opt(io, "write_bps"),
                    "read_iops": _opt(io, "read_iops"),
                    "write_iops": _opt(io, "write_iops"),
                }
                for io in limits.io
            ],
            "enforced": job.limits_enforced,
        },
        "sandbox": {
            "uid": job.sandbox.uid,
            "gid": job.sandbox.gid,
            "root": job.sandbox.root,
            "seccomp": job.sandbox.seccomp,
            "tmp_bytes": job.sandbox.tmp_bytes,
        }
        if job.HasField("sandbox")
        else None,
        # null where the server did not say (a running job in a listing, or no cgroups):
        # zeros would read as "used nothing".
        "usage": {
            "cpu_seconds": job.usage.cpu_seconds,
            "memory_bytes": job.usage.memory_bytes,
            "memory_peak_bytes": _opt(job.usage, "memory_peak_bytes"),
            "io_read_bytes": job.usage.io_read_bytes,
            "io_write_bytes": job.usage.io_write_bytes,
        }
        if job.HasField("usage")
        else None,
    }


def exit_status_of(job: Any) -> int:
    """What `run` and `wait` exit with: the job's code, 128+N for signal N; for a job that
    could not start, 127 (not found), 126 (could not be executed) or 125 (lost by the
    server, not the command's doing)."""
    if job.HasField("exit_code"):
        return int(job.exit_code)
    if job.HasField("signal"):
        return 128 + int(job.signal)
    if job.reason == "not_found":
        return NOT_FOUND
    if job.reason == "lost":
        return JOBCTL_FAILED
    return CANNOT_EXECUTE


def info_json(info: Any, server: str) -> dict[str, Any]:
    """A ServerInfo as `jobctl info` shows it (``server``: the address it was reached at)."""
    from .. import __version__  # noqa: PLC0415 - only info needs it

    return {
        "name": info.name,
        "server": server,
        "labels": dict(info.labels),
        "server_version": info.version,
        "client_version": __version__,
        "caller": info.caller,
        "role": info.role,
        "cgroups": info.cgroups or None,
        "features": list(info.features),
        "cpus": info.cpus,
        "memory_bytes": info.memory_bytes,
        "running_jobs": info.running_jobs,
        "jobs": info.jobs,
        "default_timeout_seconds": info.default_timeout_seconds
        if info.HasField("default_timeout_seconds")
        else None,
        "max_timeout_seconds": info.max_timeout_seconds
        if info.HasField("max_timeout_seconds")
        else None,
    }


def outcome(job: dict[str, Any]) -> str:
    """How a job ended, in a few words ("exited 0", "killed by signal 9", "stopped by its
    timeout, signal 15", "failed: ..."); its state while it has not."""
    state = str(job["state"])
    if state == "failed":
        return f"failed: {escape(job['error'] or job['reason'] or 'unknown')}"
    if state not in ("exited", "stopped"):
        return state
    how = f"exit {job['exit_code']}" if job["exit_code"] is not None else f"signal {job['signal']}"
    notes = "".join(
        note
        for flag, note in (("oom_killed", " (OOM)"), ("pids_limited", " (pids limit hit)"))
        if job.get(flag)
    )
    if state == "stopped":
        by = " by its timeout" if job["reason"] == "timeout" else ""
        return f"stopped{by}, {how}{notes}"
    if job["exit_code"] is not None:
        return f"exited {job['exit_code']}{notes}"
    return f"killed by signal {job['signal']}{notes}"


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def _ago(iso: str | None, now: dt.datetime) -> str:
    if iso is None:
        return "-"
    seconds = int((now - dt.datetime.fromisoformat(iso)).total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


def _result(job: dict[str, Any]) -> str:
    reason = job.get("reason")
    if job["state"] == "failed":
        return f"failed ({reason.replace('_', ' ')})" if reason else "failed"
    text = ""
    if job["signal"] is not None:
        text = f"signal {job['signal']}"
    elif job["exit_code"] is not None:
        text = f"exit {job['exit_code']}"
    if job["oom_killed"]:
        text += " (OOM)"
    if job.get("pids_limited"):
        text += " (pids limit hit)"
    if reason == "timeout":
        text += " (timeout)"
    return text.strip()


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def table_text(jobs: list[dict[str, Any]], io: Io) -> str:
    """Aligned columns with relative times. On a narrow terminal only COMMAND shrinks
    (down to 10 characters; past that the lines wrap): no column is ever dropped. Color
    and bold only on a terminal, and never with NO_COLOR.

    Written out rather than with rich's Table: on 80 columns rich squeezed and dropped
    whole columns (OWNER, STATE, CREATED), and a listing must keep them.
    """
    now = dt.datetime.now(dt.UTC)
    # Across a fleet each job names its server first (HOST/ID addresses it).
    hosts = any("host" in job for job in jobs)
    headers = ("HOST",) * hosts + ("ID", "NAME", "OWNER", "STATE", "RESULT", "CREATED", "COMMAND")
    state_column = 3 + hosts
    rows = [
        (escape(job.get("host", "")),) * hosts
        + (
            job["id"][:12],
            escape(job.get("name") or "-"),
            escape(job["owner"]),
            job["state"],
            _result(job),
            _ago(job["created_at"], now),
            command_text(job["argv"]),
        )
        for job in jobs
    ]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers[:-1])]
    fixed = sum(widths) + 2 * len(widths)
    command_width = max([len(headers[-1]), *(len(r[-1]) for r in rows)])
    if io.out_tty and io.columns:
        command_width = min(command_width, max(io.columns - fixed, 10))
    styled = io.out_tty and not io.no_color
    colors = {"running": "32", "failed": "31", "stopped": "33"}

    def line(cells: tuple[str, ...], *, header: bool = False) -> str:
        parts = []
        for i, cell in enumerate(cells[:-1]):
            padded = cell.ljust(widths[i])
            if styled and not header and i == state_column and cell in colors:
                padded = f"\x1b[{colors[cell]}m{cell}\x1b[0m" + " " * (widths[i] - len(cell))
            parts.append(padded)
        parts.append(_fit(cells[-1], command_width))
        text = "  ".join(parts).rstrip()
        return f"\x1b[1m{text}\x1b[0m" if styled and header else text

    return line(headers, header=True) + "\n" + "".join(line(r) + "\n" for r in rows)


def size_text(value: float | None) -> str:
    """A size for a person: 1.5 GiB, 12.0 MiB, 512 B; "-" for none."""
    if value is None:
        return "-"
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if value >= 1024**power:
            return f"{value / 1024**power:.1f} {unit}"
    return f"{value:.0f} B"


def _limits_text(limits: dict[str, Any]) -> str:
    parts = []
    if limits["cpus"] is not None:
        parts.append(f"cpus {limits['cpus']:g}")
    if limits["memory_bytes"] is not None:
        parts.append(f"memory {size_text(limits['memory_bytes'])}")
    if limits["pids"] is not None:
        parts.append(f"pids {limits['pids']}")
    if limits.get("tmp_bytes") is not None:
        parts.append(f"tmp {size_text(limits['tmp_bytes'])}")
    parts += [f"io {io['device'] or 'workdir disk'}" for io in limits["io"]]
    text = ", ".join(parts) or "none"
    return text if limits["enforced"] else f"{text} (NOT enforced: the server runs without cgroups)"


def _sandbox_text(sandbox: dict[str, Any] | None) -> str:
    if sandbox is None:
        return "-"
    seccomp = "seccomp on" if sandbox["seccomp"] else "seccomp off"
    return (
        f"uid {sandbox['uid']}, gid {sandbox['gid']}, root {sandbox['root']}, {seccomp}, "
        f"private tmp {size_text(sandbox['tmp_bytes'])}"
    )


def _labels_text(labels: dict[str, str]) -> str:
    return ", ".join(f"{escape(k)}={escape(v)}" for k, v in labels.items()) or "-"


def _duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def status_text(job: dict[str, Any]) -> str:
    now = dt.datetime.now(dt.UTC)
    usage = job["usage"]
    notes = [
        note
        for flag, note in (
            ("oom_killed", "the OOM killer killed a process"),
            ("pids_limited", "a fork failed for the pids limit"),
            ("output_truncated", "output over the server's cap was discarded"),
        )
        if job.get(flag)
    ]
    rows = [
        ("id", job["id"]),
        ("name", escape(job.get("name") or "-")),
        ("owner", escape(job["owner"])),
        ("labels", _labels_text(job.get("labels") or {})),
        ("command", command_text(job["argv"])),
        ("state", job["state"] + (f" ({_result(job)})" if _result(job) else "")),
        ("reason", (job.get("reason") or "-").replace("_", " ")),
        ("error", escape(job["error"] or "-")),
        ("notes", "; ".join(notes) or "-"),
        ("pid", str(job["pid"]) if job.get("pid") is not None else "-"),
        ("timeout", _duration_text(job.get("timeout_seconds"))),
        ("created", f"{job['created_at']} ({_ago(job['created_at'], now)})"),
        ("started", job["started_at"] or "-"),
        ("ended", job["ended_at"] or "-"),
        ("cpu", f"{usage['cpu_seconds']:.2f} s" if usage else "-"),
        (
            "memory",
            f"{size_text(usage['memory_bytes'])} (peak {size_text(usage['memory_peak_bytes'])})"
            if usage
            else "-",
        ),
        (
            "io",
            f"read {size_text(usage['io_read_bytes'])}, "
            f"written {size_text(usage['io_write_bytes'])}"
            if usage
            else "-",
        ),
        ("limits", _limits_text(job["limits"])),
        ("sandbox", _sandbox_text(job["sandbox"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{key:<{width}}  {value}\n" for key, value in rows)


def event_text(job: dict[str, Any], ns: int, *, deleted: bool) -> str:
    """One line of `jobctl events`: when, which job, what happened, its command."""
    what = "deleted" if deleted else outcome(job)
    name = escape(job["name"]) if job.get("name") else "-"
    return (
        f"{rfc3339(ns)}  {job['id'][:12]}  {name}  {escape(job['owner'])}  {what}  "
        f"{command_text(job['argv'])}\n"
    )
