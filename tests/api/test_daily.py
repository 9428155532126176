"""What daily use needs from the API: names, labels and selectors, log windows with a resume
offset, a watch of all one's jobs, and the server's version."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

from jobworker import __version__
from jobworker.api._config import ServerIdentity
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc

from .conftest import Pki, Running, code_of, serving

SLEEP = ["sleep", "600"]


async def _create(stub: pb_grpc.JobServiceStub, argv: list[str], **spec: object) -> pb.Job:
    request = pb.CreateJobRequest(spec=pb.JobSpec(argv=argv, **spec), start=True)  # type: ignore[arg-type]
    job: pb.Job = await stub.CreateJob(request, timeout=10)
    return job


async def _ended(stub: pb_grpc.JobServiceStub, argv: list[str]) -> pb.Job:
    job = await _create(stub, argv)
    final: pb.Job = await stub.WaitJob(pb.JobRequest(id=job.id), timeout=30)
    assert final.state == pb.JOB_STATE_EXITED, final
    return final


async def _read(
    stub: pb_grpc.JobServiceStub, **request: object
) -> tuple[bytes, list[pb.OutputResponse]]:
    call = stub.StreamOutput(pb.OutputRequest(**request), timeout=30)  # type: ignore[arg-type]
    replies = [r async for r in call]
    return b"".join(c.data for r in replies for c in r.chunks), replies


async def test_names_are_unique_per_owner_and_checked_atomically(api: Running) -> None:
    async with api.client("alice") as alice, api.client("bob") as bob:
        attempts = await asyncio.gather(
            *(_create(alice, SLEEP, name="web") for _ in range(8)), return_exceptions=True
        )
        created = [a for a in attempts if isinstance(a, pb.Job)]
        refused = [a for a in attempts if isinstance(a, grpc.aio.AioRpcError)]
        assert len(created) == 1
        assert {e.code() for e in refused} == {grpc.StatusCode.ALREADY_EXISTS}
        assert "already has a job named 'web'" in (refused[0].details() or "")
        assert created[0].name == "web"
        # Another owner's namespace is their own.
        assert (await _create(bob, SLEEP, name="web")).name == "web"
        # Once the job is gone, the name is free again.
        await alice.StopJob(pb.StopJobRequest(id=created[0].id, grace_seconds=0), timeout=30)
        await alice.RemoveJob(pb.JobRequest(id=created[0].id), timeout=10)
        assert (await _create(alice, ["true"], name="web")).name == "web"
        for bad in ("-x", "a b", "x" * 64, "00000000-0000-4000-8000-000000000000", "\x1b[2J"):
            code = await code_of(
                alice.CreateJob(
                    pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"], name=bad)), timeout=10
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, bad


async def test_labels_select_jobs(api: Running) -> None:
    async with api.client("alice") as alice:
        web = await _create(alice, SLEEP, labels={"app": "web", "example.com/tier": "front"})
        db = await _create(alice, SLEEP, labels={"app": "db"})
        bare = await _create(alice, SLEEP)
        assert dict(web.labels) == {"app": "web", "example.com/tier": "front"}

        async def selected(selector: str) -> set[str]:
            reply = await alice.ListJobs(pb.ListJobsRequest(selector=selector), timeout=10)
            return {j.id for j in reply.jobs}

        assert await selected("app=web") == {web.id}
        assert await selected("app==web,example.com/tier") == {web.id}
        assert await selected("app!=web") == {db.id, bare.id}
        assert await selected("!app") == {bare.id}
        assert await selected("app in (web, db)") == {web.id, db.id}
        assert await selected("app notin (web)") == {db.id, bare.id}
        assert await selected("") == {web.id, db.id, bare.id}
        # ("app=" is valid: jobs whose label app is empty.)
        for bad in ("=x", "app in web", "a b", "app=\x1b[2J"):
            call = alice.ListJobs(pb.ListJobsRequest(selector=bad), timeout=10)
            assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT, bad
        bad_label = pb.JobSpec(argv=["true"], labels={"app": "no spaces"})
        call = alice.CreateJob(pb.CreateJobRequest(spec=bad_label), timeout=10)
        assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT


async def test_server_info_names_the_server_the_version_and_the_caller(
    tmp_path: Path, pki: Pki
) -> None:
    identity = ServerIdentity(name="web-1", labels={"role": "web", "zone": "a"})
    async with (
        serving(tmp_path, pki, identity=identity) as api,
        api.client("alice") as alice,
        api.client("bob") as bob,
        api.client("admin") as admin,
    ):
        for stub in (alice, bob):
            spec = pb.JobSpec(argv=["sleep", "600"])
            await stub.CreateJob(pb.CreateJobRequest(spec=spec, start=True), timeout=10)
        await alice.CreateJob(pb.CreateJobRequest(spec=pb.JobSpec(argv=["true"])), timeout=10)
        mine = await alice.GetServerInfo(pb.ServerInfoRequest(), timeout=10)
        theirs = await admin.GetServerInfo(pb.ServerInfoRequest(), timeout=10)
    assert (mine.version, mine.caller, mine.role) == (__version__, "alice", "user")
    assert (theirs.caller, theirs.role) == ("admin", "admin")
    assert not mine.HasField("max_timeout_seconds")
    assert (mine.name, dict(mine.labels)) == ("web-1", {"role": "web", "zone": "a"})
    assert mine.cgroups in ("v1", "v2", "hybrid")
    assert {"cgroups", "namespaces", "sandbox"} <= set(mine.features)
    assert mine.cpus >= 1
    assert mine.memory_bytes > 1 << 30
    # A user counts their own jobs; an admin, everyone's.
    assert (mine.running_jobs, mine.jobs) == (1, 2)
    assert (theirs.running_jobs, theirs.jobs) == (2, 3)


async def test_tail_returns_the_last_lines_of_many_records(api: Running) -> None:
    # Each line flushed on its own: hundreds of records, more than one tail mark apart.
    lines = "import sys\nfor i in range(2000): print(i, flush=True)\nprint('no newline', end='')"
    async with api.client("alice") as alice:
        job = await _ended(alice, [sys.executable, "-c", lines])
        whole, _ = await _read(alice, id=job.id)
        for n in (0, 1, 3, 2001, 5000):
            tail, _ = await _read(alice, id=job.id, tail_lines=n)
            expected = b"".join(whole.splitlines(keepends=True)[-n:]) if n else b""
            assert tail == expected, n
        one = await _ended(alice, ["sh", "-c", "printf 'a\\nb\\nc\\n'"])
        assert (await _read(alice, id=one.id, tail_lines=2))[0] == b"b\nc\n"
        assert (await _read(alice, id=one.id, tail_lines=2, streams=pb.OUTPUT_SELECTOR_STDERR))[
            0
        ] == b""


async def test_an_offset_resumes_where_a_response_left_off(api: Running) -> None:
    # 3 MiB in 1 MiB records: more than one message per read (2 MiB each at most).
    code = "import os\nfor i in range(3): os.write(1, bytes([65 + i]) * (1 << 20))"
    async with api.client("alice") as alice:
        job = await _ended(alice, [sys.executable, "-c", code])
        whole, replies = await _read(alice, id=job.id)
        assert len(whole) == 3 << 20
        seen = b""
        for reply in replies:
            seen += b"".join(c.data for c in reply.chunks)
            rest, _ = await _read(alice, id=job.id, offset=reply.offset)
            assert seen + rest == whole
        for bad in (0, 3, replies[0].offset + 1, replies[-1].offset + 1):
            call = alice.StreamOutput(pb.OutputRequest(id=job.id, offset=bad), timeout=10)
            assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT, bad
        both = pb.OutputRequest(id=job.id, offset=replies[0].offset, tail_lines=1)
        assert (
            await code_of(alice.StreamOutput(both, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        )


async def test_since_and_until_pick_output_by_time(api: Running) -> None:
    code = "import time\nprint('early', flush=True)\ntime.sleep(0.3)\nprint('late', flush=True)"
    async with api.client("alice") as alice:
        job = await _ended(alice, [sys.executable, "-c", code])
        _, replies = await _read(alice, id=job.id)
        chunks = [c for r in replies for c in r.chunks]
        late = next(c.time_unix_nano for c in chunks if c.data == b"late\n")
        assert (await _read(alice, id=job.id, since_unix_nano=late))[0] == b"late\n"
        assert (await _read(alice, id=job.id, until_unix_nano=late))[0] == b"early\n"
        # Following with an end time in the past ends at once, though the job runs on.
        running = await _create(alice, ["sh", "-c", "echo hi; exec sleep 600"])
        request = pb.OutputRequest(id=running.id, follow=True, until_unix_nano=late)
        replies = [r async for r in alice.StreamOutput(request, timeout=30)]
        assert [c.data for r in replies for c in r.chunks] == []


async def test_watch_jobs_sees_every_change_of_ones_own_jobs(api: Running) -> None:
    async with api.client("alice") as alice, api.client("bob") as bob, api.client("admin") as admin:
        mine = alice.WatchJobs(pb.WatchJobsRequest(), timeout=60)
        everyone = admin.WatchJobs(pb.WatchJobsRequest(), timeout=60)
        labelled = alice.WatchJobs(pb.WatchJobsRequest(selector="app=x"), timeout=60)
        # WatchJobs sends nothing until a change: this proves the watches are open.
        await _ended(bob, ["true"])
        first_of_everyone = await asyncio.wait_for(everyone.read(), 30)
        assert first_of_everyone.job.owner == "bob"
        job = await _ended(alice, ["true"])
        await alice.RemoveJob(pb.JobRequest(id=job.id), timeout=10)
        seen: list[tuple[str, int, bool]] = []
        while len(seen) < 4:
            event = await asyncio.wait_for(mine.read(), 30)
            seen.append((event.job.id, event.job.state, event.deleted))
        assert seen == [
            (job.id, pb.JOB_STATE_CREATED, False),
            (job.id, pb.JOB_STATE_RUNNING, False),
            (job.id, pb.JOB_STATE_EXITED, False),
            (job.id, pb.JOB_STATE_EXITED, True),
        ]
        # bob's job came first: had alice's watch seen it, it would lead the list.
        x = await _create(alice, ["true"], labels={"app": "x"})
        event = await asyncio.wait_for(labelled.read(), 30)
        assert (event.job.id, event.job.state) == (x.id, pb.JOB_STATE_CREATED)
        # With existing: the jobs there are first (alice's own, oldest first), then synced,
        # then changes. (x has ended first: no change of its may come between.)
        await alice.WaitJob(pb.JobRequest(id=x.id), timeout=30)
        listed = [j.id for j in (await alice.ListJobs(pb.ListJobsRequest(), timeout=10)).jobs]
        both = alice.WatchJobs(pb.WatchJobsRequest(existing=True), timeout=60)
        first = [await asyncio.wait_for(both.read(), 30) for _ in listed]
        assert [e.job.id for e in first] == listed
        assert (await asyncio.wait_for(both.read(), 30)).synced
        later = await _create(alice, ["true"])
        event = await asyncio.wait_for(both.read(), 30)
        assert (event.job.id, event.synced) == (later.id, False)
        for call in (mine, everyone, labelled, both):
            call.cancel()
        refused = bob.WatchJobs(pb.WatchJobsRequest(owner="alice"), timeout=10)
        assert await code_of(refused) == grpc.StatusCode.PERMISSION_DENIED
