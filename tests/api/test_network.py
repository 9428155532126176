"""Over the network: big and concurrent streams, cancellation, a dying server, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc
from jobworker.api.client import connect, stream_output
from jobworker.api.server import ServiceLimits

from ..conftest import TEST_PATHS, cgroup_dirs, make_config, next_job_made, opened
from ..runtime.helpers import PY
from .conftest import Pki, Running, serving

JOBWORKERD = str(Path(sys.executable).parent / "jobworkerd")


async def collect_output(stub: pb_grpc.JobServiceStub, job_id: str) -> bytes:
    out = bytearray()
    async for reply in stub.StreamOutput(pb.OutputRequest(id=job_id, follow=True), timeout=120):
        for chunk in reply.chunks:
            out += chunk.data
    return bytes(out)


async def test_100mb_stream_arrives_complete_and_exact(api: Running) -> None:
    code = "import os\nblock = bytes(range(256)) * 4096\nfor _ in range(100): os.write(1, block)"
    expected = hashlib.sha256(bytes(range(256)) * 4096 * 100).hexdigest()
    tls = api.pki.files("alice")
    async with connect(f"127.0.0.1:{api.port}", tls) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        job = await stub.CreateJob(
            pb.CreateJobRequest(spec=pb.JobSpec(argv=[PY, "-c", code]), start=True), timeout=10
        )
        # Through the lean client decoder (memoryviews), as a CLI writing to stdout would.
        request = pb.OutputRequest(id=job.id, follow=True)
        data = b"".join([bytes(p.data) async for p in stream_output(channel, request, timeout=120)])
    assert len(data) == 100 * 1024 * 1024
    assert hashlib.sha256(data).hexdigest() == expected


async def test_100_concurrent_followers_get_identical_output(tmp_path: Path, pki: Pki) -> None:
    code = "import os\nfor i in range(3000): os.write(1 + i % 2, b'line %d\\n' % i)"
    limits = ServiceLimits(max_streams_per_user=128)
    async with serving(tmp_path, pki, limits=limits) as api, api.client("alice") as stub:
        job = await stub.CreateJob(
            pb.CreateJobRequest(spec=pb.JobSpec(argv=[PY, "-c", code])), timeout=10
        )
        followers = [asyncio.ensure_future(collect_output(stub, job.id)) for _ in range(100)]
        await stub.StartJob(pb.JobRequest(id=job.id), timeout=10)
        results = await asyncio.wait_for(asyncio.gather(*followers), 120)
    assert len(results[0]) == sum(len(b"line %d\n" % i) for i in range(3000))
    assert all(r == results[0] for r in results)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_cancelled_stream_frees_server_resources(api: Running) -> None:
    service, runtime = api.server.service, api.server.runtime
    async with asyncio.timeout(30), api.client("alice") as stub:
        job = await stub.CreateJob(
            pb.CreateJobRequest(spec=pb.JobSpec(argv=["yes"]), start=True), timeout=10
        )
        await stub.GetJob(pb.JobRequest(id=job.id), timeout=10)  # the connection is up
        await next_job_made(runtime)
        fds, tasks = _fds(), len(asyncio.all_tasks())
        call = stub.StreamOutput(pb.OutputRequest(id=job.id, follow=True))
        await call.read()
        assert not service.no_streams.is_set()
        call.cancel()
        await service.no_streams.wait()
        # Let the finished handler task be collected: yields to the loop, no timer.
        for _ in range(100):
            if len(asyncio.all_tasks()) <= tasks:
                break
            await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) <= tasks
        assert _fds() == fds
        assert runtime.notifier.watch_count == 0


# ------------------------------------------------------------------ a real jobworkerd process
def subtree_for(state: Path) -> str:
    """The cgroup subtree of the test servers on ``state``: their own, never the default
    one a jobworkerd of the host (the systemd unit, a demo) may hold; the same for every
    restart on that state dir."""
    return "jobworker-test-" + hashlib.sha256(str(state).encode()).hexdigest()[:8]


def jobworkerd_argv(pki: Pki, listen: str, state: Path, server: str = "") -> list[str]:
    """jobworkerd on ``state``, with a config file beside it: a cgroup subtree of its own,
    the host paths the test suite shows its jobs (see conftest.TEST_PATHS), and ``server``
    as the body of its [server] table."""
    config = state.parent / f"{state.name}.toml"
    shown = ", ".join(f'"{b.path}:{"rw" if b.writable else "ro"}"' for b in TEST_PATHS["*"])
    config.write_text(
        f"[server]\n{server}\n"
        f'[cgroups]\nsubtree = "{subtree_for(state)}"\n'
        f'[sandbox]\npaths = {{ "*" = [{shown}] }}\n'
    )
    return [
        JOBWORKERD,
        "--config",
        str(config),
        "--listen",
        listen,
        "--state-dir",
        str(state),
        "--ca",
        str(pki.dir / "ca.pem"),
        "--cert",
        str(pki.dir / "server.pem"),
        "--key",
        str(pki.dir / "server.key"),
    ]


class Daemon:
    def __init__(
        self, tmp_path: Path, pki: Pki, *extra: str, server: str = "", listen: str = "127.0.0.1:0"
    ) -> None:
        self.state = tmp_path / "state"
        self.proc = subprocess.Popen(
            [*jobworkerd_argv(pki, listen, self.state, server), *extra],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = 0
        self.log: list[str] = []
        self._ready = threading.Event()
        # Drain the log for the server's whole life, so it never blocks on a full pipe.
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                self.log.append(line)
                if "serving on" in line:
                    self.port = int(line.split("serving on ")[1].split()[0].rsplit(":", 1)[1])
                    self._ready.set()
        self._ready.set()

    def wait_ready(self) -> int:
        """Wait until the server's log says where it serves; return the port."""
        self._ready.wait()
        if not self.port:
            raise AssertionError(f"jobworkerd exited before serving: {''.join(self.log)}")
        return self.port

    def join(self) -> None:
        self._reader.join()

    def kill_jobs(self) -> None:
        """End the jobs this server left running, through their supervisors' pidfds."""
        for run in self.state.glob("jobs/*/run.json"):
            if not (run.parent / "exit.json").exists():
                pid = json.loads(run.read_text())["supervisor_pid"]
                with contextlib.suppress(ProcessLookupError):
                    fd = os.pidfd_open(pid)
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    os.close(fd)


async def drain(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


def _children() -> list[int]:
    """This process's children (each thread keeps a list of its own)."""
    found = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{task}/children") as f:
            found += [int(pid) for pid in f.read().split()]
    return found


def _reap_orphans(timeout: float = 60.0) -> None:
    """Reap every child of this process (a killed server's orphans: its launcher and the
    supervisors, handed to us as subreaper) as they exit. One still running after
    ``timeout`` is what an earlier test leaked: an error naming it, not a hang.

    Raises:
        AssertionError: a child is still running at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        children = _children()
        if not children:
            return
        pidfds = []
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                pidfds.append(os.pidfd_open(pid))
        try:
            left = deadline - time.monotonic()
            if left <= 0 or (pidfds and not select.select(pidfds, [], [], left)[0]):
                raise AssertionError(f"children still running after {timeout:g} s: {children}")
        finally:
            for fd in pidfds:
                os.close(fd)


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path, pki: Pki, *extra: str, server: str = "") -> AsyncIterator[Daemon]:
    d = Daemon(tmp_path, pki, *extra, server=server)
    try:
        await asyncio.wait_for(asyncio.to_thread(d.wait_ready), 60)
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.wait()
        await asyncio.to_thread(d.join)
        d.kill_jobs()
        await asyncio.to_thread(_reap_orphans)
        await take_back(d.state)


async def take_back(state: Path) -> None:
    """Remove what a server killed with its jobs left: a runtime opened on its state dir
    (with its cgroup subtree) sees the jobs ended, removes their cgroups and, at close, the
    subtree, and ``opened`` checks that nothing is left."""
    if (state / "jobs").is_dir():
        async with opened(make_config(state, cgroup_subtree=subtree_for(state))):
            pass


def stub_for(
    pki: Pki, port: int, user: str = "alice"
) -> tuple[grpc.aio.Channel, pb_grpc.JobServiceStub]:
    creds = grpc.ssl_channel_credentials(
        (pki.dir / "ca.pem").read_bytes(),
        (pki.dir / f"{user}.key").read_bytes(),
        (pki.dir / f"{user}.pem").read_bytes(),
    )
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
    return channel, pb_grpc.JobServiceStub(channel)


@pytest.mark.usefixtures("subreaper")
async def test_server_death_gives_connected_client_unavailable(tmp_path: Path, pki: Pki) -> None:
    async with daemon(tmp_path, pki) as d:
        channel, stub = stub_for(pki, d.port)
        async with channel:
            job = await stub.CreateJob(
                pb.CreateJobRequest(spec=pb.JobSpec(argv=["yes"]), start=True), timeout=10
            )
            call = stub.StreamOutput(pb.OutputRequest(id=job.id, follow=True))
            await call.read()
            d.proc.kill()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(drain(call), 10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.usefixtures("subreaper")
async def test_sigterm_shuts_down_cleanly_and_jobs_keep_running(tmp_path: Path, pki: Pki) -> None:
    async with daemon(tmp_path, pki) as d:
        channel, stub = stub_for(pki, d.port)
        async with channel:
            job = await stub.CreateJob(
                pb.CreateJobRequest(spec=pb.JobSpec(argv=["sleep", "600"]), start=True),
                timeout=10,
            )
            follow = stub.StreamOutput(pb.OutputRequest(id=job.id, follow=True))
            d.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(asyncio.to_thread(d.proc.wait), 30) == 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(drain(follow), 10)
            assert err.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        supervisor = json.loads((d.state / "jobs" / job.id / "run.json").read_text())
        fd = os.pidfd_open(supervisor["supervisor_pid"])  # still there: the job outlived us
        os.close(fd)
        assert not (d.state / "jobs" / job.id / "exit.json").exists()


async def test_start_up_errors_are_one_clear_line(tmp_path: Path, pki: Pki) -> None:
    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            JOBWORKERD, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, err.decode()

    tls = ["--ca", str(pki.dir / "ca.pem"), "--cert", str(pki.dir / "server.pem")]
    state = ["--state-dir", str(tmp_path / "state")]
    code, err = await run(*tls, "--key", str(tmp_path / "missing.key"), *state)
    assert code == 1
    assert err.strip().splitlines() == [
        f"jobworkerd: cannot read the key {tmp_path}/missing.key: No such file or directory"
    ]
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    key = ["--key", str(pki.dir / "server.key")]
    code, err = await run(*tls, *key, "--state-dir", str(blocker / "state"))
    assert code == 1
    assert "Traceback" not in err
    assert err.startswith("jobworkerd: cannot open the runtime")
    assert len(err.strip().splitlines()) == 1


async def test_port_in_use_is_one_clear_line(api: Running, pki: Pki, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *jobworkerd_argv(pki, f"127.0.0.1:{api.port}", tmp_path / "state2"),
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith(f"jobworkerd: cannot listen on 127.0.0.1:{api.port}")
    assert "Traceback" not in err.decode()


async def test_health_and_reflection_are_served(api: Running) -> None:
    ca, cert, key = api.pki.files("alice").read()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    async with grpc.aio.secure_channel(f"127.0.0.1:{api.port}", creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="jobworker.v1.JobService"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "jobworker.v1.JobService" in names
    assert "grpc.health.v1.Health" in names


async def test_a_flood_of_silent_connections_does_not_stop_service(
    tmp_path: Path, pki: Pki
) -> None:
    """300 connections that never finish a handshake, against a server with 256 fds: the
    server closes them after its handshake timeout, caps how many it holds, and a real
    client is served meanwhile; a job that ends during the flood is recorded."""
    server = 'handshake_timeout = "1s"\nmax_connections = 100'
    async with daemon(tmp_path, pki, server=server) as d:
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (256, 256))
        channel, stub = stub_for(pki, d.port)
        async with channel:
            job = await stub.CreateJob(
                pb.CreateJobRequest(spec=pb.JobSpec(argv=["sleep", "1"]), start=True), timeout=10
            )
            silent = []
            try:
                for _ in range(300):
                    sock = socket.create_connection(("127.0.0.1", d.port), timeout=5)
                    sock.setblocking(False)
                    silent.append(sock)
                # Served despite the flood (the server drops the silent ones within 1 s).
                final = await stub.WaitJob(pb.JobRequest(id=job.id), timeout=30)
                listed = await stub.ListJobs(pb.ListJobsRequest(), timeout=30)
                # Every silent connection is closed by the server: EOF on each.
                closed = await asyncio.wait_for(asyncio.to_thread(_all_closed, silent), 30)
            finally:
                for sock in silent:
                    sock.close()
        # A clean stop after the flood: the end of the job that ended during it was dealt
        # with in full (its cgroup removed, and with it the server's subtree).
        d.proc.terminate()
        assert await asyncio.wait_for(asyncio.to_thread(d.proc.wait), 30) == 0
    assert cgroup_dirs(subtree_for(d.state)) == []
    assert final.state == pb.JOB_STATE_EXITED
    assert [j.id for j in listed.jobs] == [job.id]
    assert closed == len(silent)
    assert "Task exception was never retrieved" not in "".join(d.log)


def _all_closed(socks: list[socket.socket]) -> int:
    """Wait (select) until the peer has closed every socket; return how many."""
    pending = set(socks)
    while pending:
        readable, _, _ = select.select(list(pending), [], [], 30)
        if not readable:
            break
        for sock in readable:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                pending.discard(sock)
    return len(socks) - len(pending)
