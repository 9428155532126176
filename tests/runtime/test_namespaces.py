"""Each job's own namespaces and unprivileged user, observed from inside and outside."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from jobworker.runtime import JobSpec, NotPermittedError, RunAs, Runtime, State
from jobworker.runtime.cgroups import detect

from ..conftest import make_config
from .helpers import collect, joined, py

NAMESPACES = ("pid", "mnt", "net", "uts", "ipc", "cgroup")

PROBE = """
import json, os, socket
NAMESPACES = ("pid", "mnt", "net", "uts", "ipc", "cgroup")
report = {
    "pid": os.getpid(),
    "uid": os.getuid(),
    "gid": os.getgid(),
    "groups": os.getgroups(),
    "hostname": socket.gethostname(),
    "net": sorted(os.listdir("/sys/class/net")),
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "no_new_privs": [
        l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")
    ][0],
    "cgroup_files_visible": os.path.exists("/sys/fs/cgroup/cgroup.procs")
        or os.path.exists("/sys/fs/cgroup/memory"),
    "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES},
    "cgroups": [l.split(":", 2)[2].strip() for l in open("/proc/self/cgroup")],
}
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
c = socket.create_connection(s.getsockname(), timeout=5)
report["loopback_works"] = True
c.close(); s.close()
try:
    socket.create_connection(("127.0.0.1", int(os.environ["HOST_PORT"])), timeout=5).close()
    report["host_listener"] = "reached"
except OSError as e:
    report["host_listener"] = type(e).__name__
try:
    open("/proc/1/ns/net").close()
    report["can_open_init_ns"] = True
except OSError:
    report["can_open_init_ns"] = False
print(json.dumps(report))
"""


async def _probe(runtime: Runtime, **kw: object) -> dict[str, object]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        async with asyncio.timeout(30):
            job = await runtime.run(py(PROBE, env={"HOST_PORT": str(port)}, **kw))
            final = await runtime.wait(job.id)
            out = joined(await collect(runtime, job.id))
    assert final.exit_code == 0, out
    report: dict[str, object] = json.loads(out)
    report["job_id"] = job.id
    return report


async def test_job_sees_its_own_namespaces(runtime: Runtime) -> None:
    report = await _probe(runtime)
    assert report["pid"] == 2  # PID 1 is the job's supervisor
    assert report["procs"] == [1, 2]  # only the job's own processes in its /proc
    assert report["net"] == ["lo"]
    assert report["loopback_works"] is True
    assert report["host_listener"] == "ConnectionRefusedError"
    assert report["hostname"] == f"job-{str(report['job_id'])[:8]}"
    assert report["hostname"] != socket.gethostname()
    host_ns = {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES}
    job_ns = report["ns"]
    assert isinstance(job_ns, dict)
    for kind in NAMESPACES:
        assert job_ns[kind] != host_ns[kind], f"the job shares the host's {kind} namespace"
    # Its cgroup namespace is rooted at its own cgroups: it sees itself at "/" in each
    # hierarchy it was moved into (made before the move, it would see "/<its id>" there).
    cgroups = report["cgroups"]
    assert isinstance(cgroups, list)
    assert cgroups, "no /proc/self/cgroup lines"
    assert all(path == "/" for path in cgroups), cgroups


async def test_job_runs_unprivileged(runtime: Runtime) -> None:
    report = await _probe(runtime)
    # A uid:gid of its own (systemd DynamicUser-like), no supplementary groups.
    assert report["uid"] == report["gid"]
    assert 1_900_000_000 <= int(str(report["uid"])) <= 1_900_065_535
    assert report["groups"] in ([], [report["gid"]])
    assert report["no_new_privs"] == "1"
    # Sandboxed: on cgroup v2 a view of the job's own cgroup only; else nothing.
    assert report["cgroup_files_visible"] is (detect().kind == "v2")
    assert report["can_open_init_ns"] is False  # cannot setns() back out


async def test_host_network_only_where_configured(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state", host_network_owners=frozenset({"ops"}))
    async with asyncio.timeout(30), await Runtime.open(config) as rt:
        with pytest.raises(NotPermittedError, match="host network"):
            await rt.run(py("pass", owner="dev", host_network=True))
        report = await _probe(rt, owner="ops", host_network=True)
    assert report["host_listener"] == "reached"


MOUNT_TMPFS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
target = os.environ["TARGET"]
if libc.mount(b"jwtest", target.encode(), b"tmpfs", 0, None) != 0:
    raise OSError(ctypes.get_errno(), "mount")
print(any(" " + target + " " in line for line in open("/proc/self/mountinfo")))
"""


async def test_mount_inside_job_is_invisible_on_host(tmp_path: Path, public_dir: Path) -> None:
    # Without the sandbox: inside it, even uid 0 has no capability and seccomp refuses
    # mount(2) (tests/runtime/test_sandbox.py).
    config = make_config(
        tmp_path / "state",
        owner_run_as={"admin": RunAs(0, 0)},
        allow_root=True,
        sandbox=False,
    )
    target = str(public_dir)
    async with asyncio.timeout(30), await Runtime.open(config) as rt:
        job = await rt.run(py(MOUNT_TMPFS, owner="admin", env={"TARGET": target}))
        final = await rt.wait(job.id)
        out = joined(await collect(rt, job.id))
    assert final.exit_code == 0, out
    assert out == b"True\n"  # the job saw its mount...
    host_mounts = Path("/proc/self/mountinfo").read_text()
    assert f" {target} " not in host_mounts  # ...the host does not


async def test_root_needs_allow_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allow_root"):
        make_config(tmp_path, owner_run_as={"admin": RunAs(0, 0)})


async def test_namespace_setup_failure_is_a_failed_job(runtime: Runtime, public_dir: Path) -> None:
    # The job's user cannot chdir into a root-only directory: the reason reaches the status.
    private = public_dir / f"jw-private-{os.getpid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    try:
        async with asyncio.timeout(30):
            job = await runtime.run(JobSpec(["/bin/true"], cwd=str(private)))
    finally:
        private.rmdir()
    assert job.state is State.FAILED
    assert "Permission denied" in (job.error or "")
