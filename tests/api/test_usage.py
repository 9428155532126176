"""GetUsage and WatchUsage through a real server: samples of a job's real cgroup."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

from jobworker.api._proto import jobworker_pb2 as pb

from .conftest import Pki, code_of, end_stdin, serving

HOLD = (
    "import sys\n"
    "held = bytearray(48 << 20)\n"
    "for i in range(0, len(held), 4096): held[i] = 1\n"
    "print('holding', flush=True)\n"
    "sys.stdin.read()\n"
)


async def test_usage_is_sampled_followed_and_authorized(tmp_path: Path, pki: Pki) -> None:
    async with (
        serving(tmp_path, pki, runtime={"usage_interval": 0.1}) as api,
        api.client("alice") as alice,
        api.client("bob") as bob,
    ):
        spec = pb.JobSpec(argv=[sys.executable, "-c", HOLD], stdin=pb.STDIN_MODE_PIPE)
        job = await alice.CreateJob(pb.CreateJobRequest(spec=spec, start=True), timeout=10)
        seen: list[pb.UsageSample] = []
        watch = alice.WatchUsage(pb.UsageRequest(id=job.id), timeout=60)
        async for response in watch:
            seen += response.samples
            if seen[-1].memory_bytes >= 48 << 20 and len(seen) >= 2:
                break
        watch.cancel()
        times = [s.time_unix_nano for s in seen]
        assert times == sorted(set(times))
        assert seen[-1].pids >= 1
        got = await alice.GetUsage(pb.UsageRequest(id=job.id), timeout=10)
        assert list(got.samples[: len(seen)]) == seen
        later = await alice.GetUsage(
            pb.UsageRequest(id=job.id, since_unix_nano=seen[-1].time_unix_nano), timeout=10
        )
        assert all(s.time_unix_nano > seen[-1].time_unix_nano for s in later.samples)
        one = await alice.GetUsage(pb.UsageRequest(id=job.id, step_seconds=3600), timeout=10)
        assert len(one.samples) == 1
        assert one.samples[0].memory_bytes >= 48 << 20
        # Authorized as every RPC: another user's job is not found, and a bad step is said.
        assert await code_of(bob.GetUsage(pb.UsageRequest(id=job.id), timeout=10)) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert await code_of(bob.WatchUsage(pb.UsageRequest(id=job.id), timeout=10)) == (
            grpc.StatusCode.NOT_FOUND
        )
        bad = alice.GetUsage(pb.UsageRequest(id=job.id, step_seconds=-1), timeout=10)
        assert await code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT
        # ListUsage: the caller's running jobs' latest two samples; an admin's: any owner's.
        mine = (await alice.ListUsage(pb.ListUsageRequest(), timeout=10)).jobs
        assert [u.id for u in mine] == [job.id]
        assert len(mine[0].samples) == 2
        assert mine[0].samples[0].time_unix_nano < mine[0].samples[1].time_unix_nano
        assert not (await bob.ListUsage(pb.ListUsageRequest(), timeout=10)).jobs
        other = bob.ListUsage(pb.ListUsageRequest(owner="alice"), timeout=10)
        assert await code_of(other) == grpc.StatusCode.PERMISSION_DENIED
        async with api.client("admin") as admin:
            seen_by_admin = await admin.ListUsage(pb.ListUsageRequest(owner="alice"), timeout=10)
        assert [u.id for u in seen_by_admin.jobs] == [job.id]
        # The stream ends when the job does.
        await end_stdin(alice, job.id)
        async with asyncio.timeout(30):
            async for _ in alice.WatchUsage(pb.UsageRequest(id=job.id), timeout=30):
                pass
