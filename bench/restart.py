"""Durable state figures: jobworkerd start-up with 10,000 ended jobs in its state dir, and
listing them.

The state dir is made from one real job: a job is run, and its directory (spec, run and exit
records, final usage, output log) is copied under 10,000 new ids, which is what 10,000 ended
jobs leave on disk, without spending minutes running them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jobworker.api  # noqa: F401  # isort: skip  (before grpc: TLS 1.3 only)

from api import alice_tls, jobworkerd, start_jobworkerd
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc
from jobworker.api.client import connect
from jobworker.certs import make_dev_pki
from table import Row, ms, pct, scratch


def _clone_jobs(state: Path, template: Path, n: int) -> None:
    meta = json.loads((template / "spec.json").read_text())
    # An ended job keeps its supervisor's dead control socket, which copytree cannot copy
    # (opening it fails with ENXIO); each clone gets a socket inode of its own instead.
    sockets = shutil.ignore_patterns("control.sock")
    has_socket = (template / "control.sock").exists()
    for i in range(n):
        job_id = str(uuid.uuid4())
        target = state / "jobs" / job_id
        shutil.copytree(template, target, ignore=sockets)
        if has_socket:
            os.mknod(target / "control.sock", stat.S_IFSOCK | 0o600)
        meta["id"] = job_id
        meta["created_ns"] += i
        (target / "spec.json").write_text(json.dumps(meta))


async def _list_times(port: int, pki: Path, n: int) -> list[float]:
    async with connect(f"127.0.0.1:{port}", alice_tls(pki)) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            reply = await stub.ListJobs(pb.ListJobsRequest(), timeout=30)
            samples.append(time.perf_counter() - t0)
        assert len(reply.jobs) > 0
    return samples


async def measure(jobs: int = 10_000) -> list[Row]:
    rows = []
    with scratch("jobworker-bench-restart-") as work:
        pki = work / "pki"
        make_dev_pki(pki)
        async with jobworkerd(work, pki) as (_port, _channel, stub):
            spec = pb.JobSpec(argv=["echo", "hello"])
            job = await stub.CreateJob(pb.CreateJobRequest(spec=spec, start=True), timeout=10)
            await stub.WaitJob(pb.JobRequest(id=job.id), timeout=30)
        state = work / "state"
        template = state / "jobs" / job.id
        await asyncio.to_thread(_clone_jobs, state, template, jobs - 1)
        # Cold start of the whole daemon (interpreter, imports, TLS set-up, reading every
        # job back), as an operator's restart: until it logs that it serves. The page cache
        # holds the files, as it would after a restart of the service (not of the host).
        bare = await asyncio.to_thread(_bare_start)
        t0 = time.perf_counter()
        server, port = await asyncio.to_thread(start_jobworkerd, work, pki)
        started = time.perf_counter() - t0
        try:
            times = await _list_times(port, pki, 20)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait()
    rows.append(
        Row(
            f"(o) jobworkerd start-up with {jobs:,} ended jobs",
            f"{started * 1e3:,.0f} ms",
            f"{bare * 1e3:,.0f} ms (`python -c 'import grpc'`)",
            "-",
            "< 2 s",
            started < 2.0,
        )
    )
    rows.append(
        Row(
            f"(p) ListJobs of {jobs:,} jobs, p50 / p99",
            ms(times),
            "-",
            "-",
            "< 200 ms",
            pct(times, 0.5) < 0.2,
        )
    )
    return rows


def _bare_start() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import grpc"], check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    for row in asyncio.run(measure(int(os.environ.get("JOBS", "10000")))):
        print(row)
