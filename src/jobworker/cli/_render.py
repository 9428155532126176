"""The one place that formats jobctl's output: JSON objects and human tables."""

from __future__ import annotations

import datetime as dt
import io as io_module
import json
from typing import TYPE_CHECKING, Any

from .._text import escape

if TYPE_CHECKING:
    from ._io import Io

__all__ = ["exit_status_of", "job_json", "json_text", "rfc3339", "status_text", "table_text"]

_STATES = {1: "created", 2: "running", 3: "exited", 4: "stopped", 5: "failed"}
# A job that could not be started exits like a shell's "command not found".
FAILED_EXIT = 127


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
        "owner": job.owner,
        "argv": list(job.argv),
        "state": _STATES.get(job.state, "unknown"),
        "exit_code": _opt(job, "exit_code"),
        "signal": _opt(job, "signal"),
        "oom_killed": job.oom_killed,
        "pids_limited": job.pids_limited,
        "error": job.error or None,
        "created_at": _time(job.created_at),
        "started_at": _time(job.started_at),
        "ended_at": _time(job.ended_at),
        "limits": {
            "cpus": _opt(limits, "cpus"),
            "memory_bytes": _opt(limits, "memory_bytes"),
            "pids": _opt(limits, "pids"),
            "tmp_bytes": _opt(limits, "tmp_bytes"),
            "io": [
                {
                    "device": io.device or None,
                    "read_bps": _opt(io, "read_bps"),
                    "write_bps": _opt(io, "write_bps"),
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
    """What `run` and `wait` exit with: the job's code, 128+N for signal N, 127 if it failed."""
    if job.HasField("exit_code"):
        return int(job.exit_code)
    if job.HasField("signal"):
        return 128 + int(job.signal)
    return FAILED_EXIT


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
    if job["state"] == "failed":
        return "failed"
    if job["signal"] is not None:
        return (
            f"signal {job['signal']}"
            + (" (OOM)" if job["oom_killed"] else "")
            + (" (pids limit hit)" if job.get("pids_limited") else "")
        )
    if job["exit_code"] is not None:
        return f"exit {job['exit_code']}"
    return ""


def table_text(jobs: list[dict[str, Any]], io: Io) -> str:
    """Aligned columns with relative times; color only on a terminal, never with NO_COLOR."""
    from rich.console import Console  # noqa: PLC0415 - rich costs ~50 ms; only tables need it
    from rich.table import Table  # noqa: PLC0415 - as above
    from rich.text import Text  # noqa: PLC0415 - as above

    now = dt.datetime.now(dt.UTC)
    rows = [
        (
            job["id"][:12],
            escape(job["owner"]),
            job["state"],
            _result(job),
            _ago(job["created_at"], now),
            _command(job["argv"]),
        )
        for job in jobs
    ]
    headers = ("ID", "OWNER", "STATE", "RESULT", "CREATED", "COMMAND")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, header in enumerate(headers[:-1]):
        # Never squeezed: a narrow terminal cuts the command, as docker ps does.
        width = max([len(header), *(len(row[i]) for row in rows)])
        table.add_column(header, no_wrap=True, min_width=width)
    table.add_column(headers[-1], no_wrap=True, overflow="ellipsis")
    colors = {"running": "green", "failed": "red", "stopped": "yellow"}
    for row in rows:
        state = row[2]
        # Text(), not a markup string: a command such as "[red]x" is shown, not styled.
        table.add_row(
            Text(row[0]),
            Text(row[1]),
            Text(state, style=colors.get(state, "")),
            *(Text(cell) for cell in row[3:]),
        )
    text = io_module.StringIO()
    console = Console(
        file=text,
        force_terminal=io.out_tty,
        no_color=io.no_color,
        # Into a pipe or a file, nothing is cut (rich would assume 80 columns).
        width=io.columns if io.out_tty and io.columns else 1 << 16,
    )
    console.print(table)
    return text.getvalue()


def _command(argv: list[str]) -> str:
    """argv for a person: joined by spaces, every control character escaped (an argv may
    carry terminal sequences meant for whoever lists it, an admin included)."""
    return " ".join(escape(arg) for arg in argv)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if value >= 1024**power:
            return f"{value / 1024**power:.1f} {unit}"
    return f"{value} B"


def _limits_text(limits: dict[str, Any]) -> str:
    parts = []
    if limits["cpus"] is not None:
        parts.append(f"cpus {limits['cpus']:g}")
    if limits["memory_bytes"] is not None:
        parts.append(f"memory {_bytes(limits['memory_bytes'])}")
    if limits["pids"] is not None:
        parts.append(f"pids {limits['pids']}")
    if limits.get("tmp_bytes") is not None:
        parts.append(f"tmp {_bytes(limits['tmp_bytes'])}")
    parts += [f"io {io['device'] or 'workdir disk'}" for io in limits["io"]]
    text = ", ".join(parts) or "none"
    return text if limits["enforced"] else f"{text} (NOT enforced: the server runs without cgroups)"


def _sandbox_text(sandbox: dict[str, Any] | None) -> str:
    if sandbox is None:
        return "-"
    seccomp = "seccomp on" if sandbox["seccomp"] else "seccomp off"
    return (
        f"uid {sandbox['uid']}, gid {sandbox['gid']}, root {sandbox['root']}, {seccomp}, "
        f"private tmp {_bytes(sandbox['tmp_bytes'])}"
    )


def status_text(job: dict[str, Any]) -> str:
    now = dt.datetime.now(dt.UTC)
    usage = job["usage"]
    rows = [
        ("id", job["id"]),
        ("owner", escape(job["owner"])),
        ("command", _command(job["argv"])),
        ("state", job["state"] + (f" ({_result(job)})" if _result(job) else "")),
        ("error", escape(job["error"] or "-")),
        ("created", f"{job['created_at']} ({_ago(job['created_at'], now)})"),
        ("started", job["started_at"] or "-"),
        ("ended", job["ended_at"] or "-"),
        ("cpu", f"{usage['cpu_seconds']:.2f} s" if usage else "-"),
        (
            "memory",
            f"{_bytes(usage['memory_bytes'])} (peak {_bytes(usage['memory_peak_bytes'])})"
            if usage
            else "-",
        ),
        (
            "io",
            f"read {_bytes(usage['io_read_bytes'])}, written {_bytes(usage['io_write_bytes'])}"
            if usage
            else "-",
        ),
        ("limits", _limits_text(job["limits"])),
        ("sandbox", _sandbox_text(job["sandbox"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{key:<{width}}  {value}\n" for key, value in rows)
