"""The web console's jobs list at 10,000 jobs (issue 19), in headless chromium.

(z)  First paint of the list: from navigation start to the first page of rows drawn with
     all 10,000 jobs loaded (list.js marks it), against the first contentful paint of the
     console's smallest page (a 404, no data) in the same browser and run. Target: < 1 s.
(z') One live update: from a job's start (its started_at, the server's clock) to the list
     drawn with it running (the browser's clock; one host, one clock). Target: < 100 ms.

A real jobworkerd process with the web console on; the jobs are created, not started (the
list's cost is the jobs, not what they run). Run alone: `.venv/bin/python bench/web.py`.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from playwright.async_api import Page, async_playwright, expect

import jobworker.api  # noqa: F401 - first: it pins gRPC's TLS settings before grpc loads
from api import start_jobworkerd
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc
from jobworker.api._tls import TlsFiles
from jobworker.api.client import connect
from jobworker.certs import make_dev_pki
from jobworker.identity import Role
from table import Row, scratch

JOBS = 10_000
LOADS = 5
UPDATES = 20
CHROMIUM = "/usr/bin/chromium"
DRAWN = (
    "() => performance.getEntriesByName('jobs-drawn')"
    ".map(e => performance.timeOrigin + e.startTime)"
)
FIRST_DRAWN = "() => performance.getEntriesByName('jobs-drawn')[0].startTime"
# Paint entries may be recorded after the load event: wait for it.
FCP = """() => new Promise((done) => new PerformanceObserver((list, observer) => {
  const fcp = list.getEntriesByName('first-contentful-paint')[0];
  if (fcp) { observer.disconnect(); done(fcp.startTime); }
}).observe({type: 'paint', buffered: true}))"""


async def _create(stub: pb_grpc.JobServiceStub, n: int) -> None:
    spec = pb.JobSpec(argv=["true"])
    for first in range(0, n, 200):
        batch = min(200, n - first)
        await asyncio.gather(
            *(stub.CreateJob(pb.CreateJobRequest(spec=spec), timeout=60) for _ in range(batch))
        )


async def _first_paints(page: Page, origin: str) -> tuple[list[float], list[float]]:
    lists, anchors = [], []
    for _ in range(LOADS):
        await page.goto(f"{origin}/jobs/00000000-0000-4000-8000-000000000000")
        anchors.append(await page.evaluate(FCP))
        await page.goto(origin + "/")
        await expect(page.locator("#summary")).to_contain_text(f"{JOBS} jobs", timeout=30_000)
        lists.append(await page.evaluate(FIRST_DRAWN))
    return lists, anchors


async def _updates(page: Page, stub: pb_grpc.JobServiceStub) -> list[float]:
    delays = []
    for _ in range(UPDATES):
        job = await stub.CreateJob(pb.CreateJobRequest(spec=pb.JobSpec(argv=["sleep", "60"])))
        state = page.locator(f'tr[data-id="{job.id}"] .state')
        await expect(state).to_have_text("created", timeout=30_000)
        started = await stub.StartJob(pb.JobRequest(id=job.id), timeout=30)
        await expect(state).to_have_text("running", timeout=30_000)
        at = started.started_at.seconds * 1e3 + started.started_at.nanos / 1e6
        drawn = [t for t in await page.evaluate(DRAWN) if t >= at]
        delays.append(min(drawn) - at)
        await stub.StopJob(pb.StopJobRequest(id=job.id, grace_seconds=0), timeout=30)
    return delays


async def _browse(
    work: Path, origin: str, stub: pb_grpc.JobServiceStub
) -> tuple[list[float], list[float], list[float]]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = await browser.new_context(
            ignore_https_errors=True,
            client_certificates=[
                {
                    "origin": origin,
                    "certPath": str(work / "pki/alice.pem"),
                    "keyPath": str(work / "pki/alice.key"),
                }
            ],
        )
        page = await context.new_page()
        lists, anchors = await _first_paints(page, origin)
        await page.goto(origin + "/")
        summary = page.locator("#summary")
        await expect(summary).to_contain_text(f"{JOBS} jobs", timeout=30_000)
        delays = await _updates(page, stub)
        await browser.close()
    return lists, anchors, delays


async def measure() -> list[Row]:
    with scratch("jobworker-bench-web-") as work:
        make_dev_pki(work / "pki", {"alice": Role.USER})
        log: list[str] = []
        proc, port = start_jobworkerd(work, work / "pki", '[web]\nlisten = "127.0.0.1:0"\n', log)
        try:
            line = next(x for x in log if "web console on" in x)
            origin = line.split("web console on ")[1].split()[0]
            files = TlsFiles(work / "pki/ca.pem", work / "pki/alice.pem", work / "pki/alice.key")
            async with connect(f"127.0.0.1:{port}", files) as channel:
                stub = pb_grpc.JobServiceStub(channel)
                await _create(stub, JOBS)
                lists, anchors, delays = await _browse(work, origin, stub)
        finally:
            proc.terminate()
            proc.wait(30)
    paint, anchor = statistics.median(lists), statistics.median(anchors)
    update = statistics.median(delays)
    return [
        Row(
            f"(z) jobs list first paint, {JOBS:,} jobs, headless chromium (median of {LOADS})",
            f"{paint:.0f} ms",
            f"{anchor:.0f} ms (first paint of a page with no data)",
            f"{paint / anchor:.1f}x",
            "< 1 s",
            paint < 1000,
        ),
        Row(
            f"(z') one live update in that list: job started -> drawn (p50 / max of {UPDATES})",
            f"{update:.0f} / {max(delays):.0f} ms",
            "-",
            "-",
            "< 100 ms",
            update < 100,
        ),
    ]


if __name__ == "__main__":
    for row in asyncio.run(measure()):
        print(f"{row.name}: {row.ours}; anchor {row.anchor}; {row.ratio}; ok={row.ok}")
