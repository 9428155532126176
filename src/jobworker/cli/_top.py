"""`jobctl top`: a live table of running jobs' usage, refreshed in place like `docker stats`.

Each refresh lists the running jobs and asks their last two samples (ListUsage, one call for
all; with ``--json``, each job's every sample of the last few seconds, GetUsage, so none is
skipped): CPU % is the CPU time between its last two samples over the time
between them (100% is one CPU, as docker counts), memory is the last sample's against the
job's limit, IO the rates between the two samples, PIDS the last count. On a terminal each
frame is drawn over the last; elsewhere frames follow each other, and ``--no-stream`` prints
one. ``--json`` prints the samples themselves: with ``--no-stream`` one array (per job, its
recent samples), else one JSON object per new sample per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from .._text import escape
from ..api.client import pb
from ._client import Session
from ._io import Io
from ._render import json_text, size_text

__all__ = ["top"]

# How far back each refresh asks: a few sampling intervals, so two samples are there.
_LOOK_BACK_NS = 5 * 10**9
_CLEAR = b"\x1b[H\x1b[2J"


async def top(s: Session, args: argparse.Namespace, io: Io) -> int:
    """Raises CliError: a call failed."""
    seen: dict[str, int] = {}  # job id -> time of the last sample printed (--json stream)
    while True:
        jobs = await _running(s, args.jobs)
        usages = await _usages(s, jobs, every=args.json)
        if args.json:
            await io.out(_json(jobs, usages, seen, stream=not args.no_stream).encode())
        else:
            frame = _table(jobs, usages).encode()
            await io.out(_CLEAR + frame if io.out_tty and not args.no_stream else frame)
        if args.no_stream:
            return 0
        await asyncio.sleep(args.interval)


async def _running(s: Session, refs: list[str]) -> list[pb.Job]:
    listed = (await s.call("ListJobs", pb.ListJobsResponse, pb.ListJobsRequest())).jobs
    running = [j for j in listed if j.state == pb.JOB_STATE_RUNNING]
    if not refs:
        return running
    wanted = {await s.resolve(ref) for ref in refs}
    return [j for j in running if j.id in wanted]


async def _usages(s: Session, jobs: list[pb.Job], *, every: bool) -> list[list[Any]]:
    """Each job's recent samples, oldest first (Any: protobuf's UsageSample); ``every``:
    all of the last few seconds', else the last two."""
    if every:
        since = time.time_ns() - _LOOK_BACK_NS
        return await asyncio.gather(*(_samples(s, j.id, since) for j in jobs))
    recent = await s.call("ListUsage", pb.ListUsageResponse, pb.ListUsageRequest())
    by_id = {u.id: list(u.samples) for u in recent.jobs}
    return [by_id.get(j.id, []) for j in jobs]


async def _samples(s: Session, job_id: str, since: int) -> list[Any]:
    request = pb.UsageRequest(id=job_id, since_unix_nano=since)
    return list((await s.call("GetUsage", pb.UsageResponse, request)).samples)


def _rates(samples: list[Any]) -> tuple[float | None, float | None, float | None]:
    """CPU %, read and write bytes/s between the last two samples (None: fewer than two)."""
    if len(samples) < 2:
        return None, None, None
    a, b = samples[-2], samples[-1]
    seconds = (b.time_unix_nano - a.time_unix_nano) / 1e9
    if seconds <= 0:
        return None, None, None
    return (
        100 * (b.cpu_seconds - a.cpu_seconds) / seconds,
        (b.io_read_bytes - a.io_read_bytes) / seconds,
        (b.io_write_bytes - a.io_write_bytes) / seconds,
    )


def _table(jobs: list[pb.Job], usages: list[list[Any]]) -> str:
    headers = ("ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "IO READ/WRITE /s", "PIDS")
    rows = []
    for job, samples in zip(jobs, usages, strict=True):
        cpu, read, write = _rates(samples)
        last = samples[-1] if samples else None
        limit = job.limits.memory_bytes if job.limits.HasField("memory_bytes") else None
        memory = last.memory_bytes if last is not None else None
        percent = f"{100 * memory / limit:.1f}%" if memory is not None and limit else "-"
        rows.append(
            (
                job.id[:12],
                escape(job.name or "-"),
                f"{cpu:.1f}%" if cpu is not None else "-",
                f"{size_text(memory)} / {size_text(limit) if limit else 'no limit'}",
                percent,
                f"{size_text(read)} / {size_text(write)}",
                str(last.pids) if last is not None else "-",
            )
        )
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in [headers, *rows]
    )


def _sample_json(sample: Any) -> dict[str, Any]:
    return {
        "time_unix_nano": sample.time_unix_nano,
        "cpu_seconds": sample.cpu_seconds,
        "memory_bytes": sample.memory_bytes,
        "io_read_bytes": sample.io_read_bytes,
        "io_write_bytes": sample.io_write_bytes,
        "pids": sample.pids,
    }


def _json(
    jobs: list[pb.Job], usages: list[list[Any]], seen: dict[str, int], *, stream: bool
) -> str:
    if not stream:
        return json_text(
            [
                {"id": j.id, "name": j.name or None, "samples": [_sample_json(x) for x in u]}
                for j, u in zip(jobs, usages, strict=True)
            ]
        )
    lines = []
    for job, samples in zip(jobs, usages, strict=True):
        for sample in samples:
            if sample.time_unix_nano > seen.get(job.id, 0):
                seen[job.id] = sample.time_unix_nano
                lines.append(json.dumps({"id": job.id, **_sample_json(sample)}) + "\n")
    return "".join(lines)
