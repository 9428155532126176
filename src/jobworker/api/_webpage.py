"""The web console's HTML, and jobs as the JSON its scripts read.

Pages are shells: what the server knows at the request is written in, every value escaped
(``html.escape``); the scripts in ``static/`` then keep them live. No page carries inline
script or style (the Content-Security-Policy forbids both), so data for a script rides in
``data-`` attributes.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any

from .._text import command_text
from ._proto import jobworker_pb2 as pb

__all__ = [
    "STATES",
    "Chrome",
    "error_page",
    "job_json",
    "job_page",
    "jobs_page",
    "start_page",
    "usage_json",
]

# The JobState numbers as the scripts show them.
STATES = {
    pb.JOB_STATE_CREATED: "created",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_EXITED: "exited",
    pb.JOB_STATE_STOPPED: "stopped",
    pb.JOB_STATE_FAILED: "failed",
}


class Chrome:
    """What every page shows around its body: the server and who is looking."""

    __slots__ = ("caller", "csrf", "role", "server")

    def __init__(self, server: str, caller: str, role: str, csrf: str) -> None:
        self.server, self.caller, self.role, self.csrf = server, caller, role, csrf


def _page(chrome: Chrome | None, title: str, body: str, script: str = "") -> str:
    who = ""
    if chrome is not None:
        who = (
            f'<span class="server">{escape(chrome.server)}</span>'
            f'<span class="who">{escape(chrome.caller)} ({escape(chrome.role)})</span>'
        )
    scripts = "".join(f'<script src="/static/{name}" defer></script>' for name in script.split())
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · jobworker</title>"
        '<link rel="stylesheet" href="/static/console.css">'
        '<link rel="stylesheet" href="/static/vendor/uPlot.min.css">'
        f"{scripts}</head><body>"
        '<a class="skip" href="#main">Skip to content</a>'
        '<header><a class="brand" href="/">jobworker</a>'
        '<nav aria-label="Console"><a href="/">Jobs</a><a href="/new">Start a job</a></nav>'
        f"{who}</header>"
        f'<main id="main" tabindex="-1">{body}</main>'
        '<dialog id="confirm" aria-labelledby="confirm-text"><form method="dialog">'
        '<p id="confirm-text"></p><div class="buttons">'
        '<button value="cancel" autofocus>Cancel</button>'
        '<button value="ok" class="danger" id="confirm-ok">Confirm</button></div></form></dialog>'
        "</body></html>"
    )


def _csrf(chrome: Chrome) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(chrome.csrf)}">'


def jobs_page(chrome: Chrome, owner: str) -> str:
    owner_filter = ""
    if chrome.role == "admin":
        owner_filter = (
            '<label>Owner <input name="owner" id="owner" autocomplete="off" '
            f'placeholder="everyone" value="{escape(owner)}"></label>'
            '<button type="submit">Filter</button>'
        )
    body = (
        '<h1>Jobs</h1><form class="filters" method="get" action="/" role="search">'
        f"{owner_filter}"
        '<label>State <select id="state-filter"><option value="">any</option>'
        + "".join(f'<option value="{s}">{s}</option>' for s in STATES.values())
        + "</select></label>"
        '<label>Find <input type="search" id="search" placeholder="id, name or command">'
        "</label></form>"
        '<p id="summary" role="status" aria-live="polite">Loading jobs…</p>'
        f'<table id="jobs" data-owner="{escape(owner)}"><thead><tr>'
        + "".join(
            f'<th scope="col">{h}</th>'
            for h in ("ID", "Name", "Owner", "Command", "State", "Exit", "Age", "CPU", "Memory")
        )
        + '</tr></thead><tbody></tbody></table><nav class="pager" aria-label="Pages">'
        '<button type="button" id="prev">Previous page</button><span id="page"></span>'
        '<button type="button" id="next">Next page</button></nav>'
    )
    return _page(chrome, "Jobs", body, "common.js list.js")


def _row(label: str, key: str, value: str = "") -> str:
    return f'<dt>{label}</dt><dd data-field="{key}">{escape(value)}</dd>'


def job_page(chrome: Chrome, job: pb.Job, grace: float) -> str:
    title = job.name or job.id[:8]
    state = STATES.get(job.state, "unknown")
    token = _csrf(chrome)
    actions = (
        f'<form method="post" action="/jobs/{job.id}/stop" class="action" '
        'data-confirm="Stop this job? It gets SIGTERM, then SIGKILL after the grace period.">'
        f'{token}<label>Grace (s) <input name="grace" type="number" min="0" max="3600" '
        f'step="any" value="{grace:g}" inputmode="decimal"></label>'
        '<button type="submit" data-when="running">Stop</button></form>'
        f'<form method="post" action="/jobs/{job.id}/kill" class="action" '
        'data-confirm="Kill this job now (SIGKILL)?">'
        f'{token}<button type="submit" class="danger" data-when="running">Kill</button></form>'
        f'<form method="post" action="/jobs/{job.id}/remove" class="action" '
        'data-confirm="Remove this job and its output? This cannot be undone.">'
        f'{token}<button type="submit" class="danger" data-when="ended">Remove</button></form>'
    )
    details = "".join(
        (
            _row("ID", "id", job.id),
            _row("Owner", "owner", job.owner),
            _row("Command", "command", command_text(job.argv)),
            _row("State", "state", state),
            _row("Exit", "exit"),
            _row("Reason", "reason", job.reason or job.error),
            _row("Created", "created"),
            _row("Started", "started"),
            _row("Ended", "ended"),
            _row("Timeout", "timeout"),
            _row("Limits", "limits"),
            _row("Sandbox", "sandbox"),
            _row("Labels", "labels", _labels(job.labels.items())),
        )
    )
    body = (
        f'<div class="title"><h1>Job {escape(title)}</h1>'
        f'<span class="state" data-state="{state}" id="state">{state}</span></div>'
        f'<div class="actions" data-job="{job.id}">{actions}</div>'
        f'<p id="notice" role="status" aria-live="polite"></p>'
        f'<section aria-labelledby="status-h"><h2 id="status-h">Status</h2>'
        f'<dl class="status">{details}</dl></section>'
        '<section aria-labelledby="usage-h"><h2 id="usage-h">Usage</h2>'
        '<div class="charts"><figure><figcaption>CPU (% of one core)</figcaption>'
        '<div id="cpu-chart" role="img" aria-label="CPU use over time"></div></figure>'
        "<figure><figcaption>Memory (MiB)</figcaption>"
        '<div id="mem-chart" role="img" aria-label="Memory use over time, with its limit">'
        '</div></figure></div><p id="usage-note"></p></section>'
        '<section aria-labelledby="output-h"><h2 id="output-h">Output</h2>'
        '<div class="output-tools"><button type="button" id="from-start">From the start</button>'
        '<button type="button" id="tail">Last 1,000 lines</button>'
        '<label>Show <select id="streams"><option value="">stdout and stderr</option>'
        '<option value="stdout">stdout only</option><option value="stderr">stderr only'
        "</option></select></label>"
        '<label><input type="checkbox" id="wrap" checked> Wrap lines</label>'
        '<span id="output-state" role="status" aria-live="polite"></span></div>'
        '<p class="legend">Standard error is in <span class="err">red</span>, '
        'jobworker\'s own notes in <span class="sys">purple italics</span>; '
        "to read one stream alone, choose it above.</p>"
        '<pre id="output" tabindex="0" aria-label="Job output" class="wrap"></pre>'
        '<div class="output-more" id="more" hidden><span id="more-text"></span>'
        '<button type="button" id="load-more">Load more</button>'
        '<button type="button" id="jump-end">Jump to the end</button></div></section>'
    )
    main = _page(chrome, f"Job {title}", body, "common.js vendor/uPlot.iife.min.js ansi.js job.js")
    return main.replace('<main id="main"', f'<main id="main" data-job="{job.id}"', 1)


def start_page(chrome: Chrome, values: dict[str, str], problem: str = "") -> str:
    def field(name: str, label: str, hint: str, *, area: bool = False) -> str:
        value = escape(values.get(name, ""))
        hint_id = f"{name}-hint"
        control = (
            f'<textarea id="{name}" name="{name}" rows="4" aria-describedby="{hint_id}">'
            f"{value}</textarea>"
            if area
            else f'<input id="{name}" name="{name}" value="{value}" '
            f'aria-describedby="{hint_id}" autocomplete="off">'
        )
        return (
            f'<div class="field"><label for="{name}">{label}</label>{control}'
            f'<small id="{hint_id}">{hint}</small></div>'
        )

    error = f'<p class="problem" role="alert">{escape(problem)}</p>' if problem else ""
    body = (
        f'<h1>Start a job</h1>{error}<form method="post" action="/jobs" class="start">'
        f"{_csrf(chrome)}"
        + field("argv", "Command", "One argument per line, the program first: no shell.", area=True)
        + field("env", "Environment", "NAME=value, one per line.", area=True)
        + field("name", "Name", "Optional: letters, digits, '.', '_' or '-'.")
        + field("labels", "Labels", "key=value, one per line.", area=True)
        + "<fieldset><legend>Limits</legend>"
        + field("cpus", "CPUs", "e.g. 0.5 (half a core); empty: the server's default.")
        + field("memory", "Memory", "e.g. 256M or 1G.")
        + field("pids", "Processes", "The most processes and threads, e.g. 100.")
        + field("timeout", "Timeout", "Stop it after this long, e.g. 10m.")
        + '</fieldset><button type="submit">Start</button></form>'
    )
    return _page(chrome, "Start a job", body, "common.js")


def error_page(status: int, message: str, chrome: Chrome | None = None) -> str:
    body = (
        f'<h1>{status}</h1><p class="problem" role="alert">{escape(message)}</p>'
        '<p><a href="/">Back to the jobs</a></p>'
    )
    return _page(chrome, f"Error {status}", body)


def _labels(items: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(items))


def _ms(stamp: Any) -> int | None:
    """A Timestamp in ms since the epoch; None when unset. Any: protobuf's Timestamp."""
    if not stamp.seconds and not stamp.nanos:
        return None
    return int(stamp.seconds * 1000 + stamp.nanos // 1_000_000)


def job_json(job: pb.Job, *, full: bool = False) -> dict[str, Any]:
    """What the scripts read of a job: the list's columns; ``full``, the job page's too."""
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "owner": job.owner,
        "command": command_text(job.argv),
        "state": STATES.get(job.state, "unknown"),
        "exit": job.exit_code if job.HasField("exit_code") else None,
        "signal": job.signal if job.HasField("signal") else None,
        "oom": job.oom_killed,
        "created": _ms(job.created_at),
        "ended": _ms(job.ended_at),
        "memoryLimit": job.limits.memory_bytes if job.limits.HasField("memory_bytes") else None,
    }
    if full:
        limits = job.limits
        out |= {
            "started": _ms(job.started_at),
            "reason": job.reason or job.error,
            "timeout": job.timeout_seconds if job.HasField("timeout_seconds") else None,
            "limits": {
                "cpus": limits.cpus if limits.HasField("cpus") else None,
                "pids": limits.pids if limits.HasField("pids") else None,
                "tmp": limits.tmp_bytes if limits.HasField("tmp_bytes") else None,
                "enforced": job.limits_enforced,
            },
            "sandbox": {
                "uid": job.sandbox.uid,
                "root": job.sandbox.root,
                "seccomp": job.sandbox.seccomp,
            }
            if job.HasField("sandbox")
            else None,
            "labels": _labels(job.labels.items()),
            "usage": {
                "cpu": job.usage.cpu_seconds,
                "peak": job.usage.memory_peak_bytes
                if job.usage.HasField("memory_peak_bytes")
                else None,
            }
            if job.HasField("usage")
            else None,
            "truncated": job.output_truncated,
            "pidsLimited": job.pids_limited,
        }
    return out


def usage_json(samples: Iterable[pb.UsageSample]) -> list[list[float]]:
    """Samples as [ms since the epoch, CPU seconds, memory bytes, pids] rows."""
    return [[s.time_unix_nano / 1e6, s.cpu_seconds, s.memory_bytes, s.pids] for s in samples]
