"""The tenant sandbox, tried as hostile tenants would: real jobs, real mounts, real seccomp.

Jobs here run the host's own programs (/bin/sh, /usr/bin/python3), which the read-only host
view shows, so nothing depends on where this checkout lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from jobworker.runtime import (
    Bind,
    InvalidSpecError,
    JobSpec,
    Limits,
    NotPermittedError,
    RunAs,
    Runtime,
    State,
)
from jobworker.runtime._jobdir import NEW_ROOT
from jobworker.runtime._linux import mount, umount
from jobworker.runtime.cgroups import detect

from ..conftest import make_config, opened
from .helpers import collect, joined, read_until

HOST_PY = "/usr/bin/python3"
MIB = 1 << 20


def _host_py(code: str, **kw: object) -> JobSpec:
    return JobSpec([HOST_PY, "-c", textwrap.dedent(code)], **kw)  # type: ignore[arg-type]


def _mounts() -> set[str]:
    """The host's mount points (this process's mount namespace)."""
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def _world_writable_dirs() -> list[str]:
    """The host's world-writable directories, found now (3 levels down, one filesystem
    walk that skips the kernel's pseudo filesystems)."""
    found = []
    skip = {"/proc", "/sys", "/dev/pts", "/run/user"}
    for top in ("/tmp", "/var", "/dev", "/run", "/srv", "/opt", "/home", "/mnt", "/media"):
        base_depth = top.count("/")
        for root, dirs, _files in os.walk(top):
            if root in skip or root.count("/") - base_depth >= 3:
                dirs[:] = []
                continue
            try:
                mode = os.lstat(root).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode) and mode & stat.S_IWOTH:
                found.append(root)
    return sorted(set(found))


async def _spare_ready(rt: Runtime) -> None:
    """Wait until the launcher holds a spare root (a mount namespace descriptor among its
    open files; checked every 10 ms, 30 s at most: nothing announces it)."""
    async with asyncio.timeout(30):
        while "mnt" not in _launcher_holds(rt):  # noqa: ASYNC110 - /proc cannot be watched
            await asyncio.sleep(0.01)


def _launcher_holds(rt: Runtime) -> set[str]:
    """The kinds of the launcher's open files ("mnt" for a mount namespace, "pipe", ...)."""
    kinds = set()
    for fd in Path(f"/proc/{rt._launcher._proc.pid}/fd").iterdir():  # noqa: SLF001 - as above
        with contextlib.suppress(FileNotFoundError):  # closed since it was listed
            kinds.add(os.readlink(fd).split(":")[0])
    return kinds


def _took_a_spare(state_dir: Path, job_id: str) -> bool:
    """Whether the job's root was the spare: a job building its own makes it in its
    directory."""
    return not (state_dir / "jobs" / job_id / NEW_ROOT).exists()


@pytest_asyncio.fixture(params=["spare root", "own root"])
async def sandboxed(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Runtime]:
    """A runtime whose jobs see nothing of the host's beyond its read-only root: its first
    job on the root the launcher built ahead (``_spare``), or every job building its own."""
    spare = request.param == "spare root"
    async with opened(make_config(tmp_path / "state", owner_paths={}, spare_roots=spare)) as rt:
        if spare:
            await _spare_ready(rt)
        yield rt


async def test_a_host_network_job_never_takes_a_spare_root(tmp_path: Path) -> None:
    """A spare root's /sys is made by each job for its own network; a job on the host's
    network builds its own root, which shows the host's /sys."""
    state = tmp_path / "state"
    config = make_config(state, owner_paths={}, host_network_owners=frozenset({"ops"}))
    async with opened(config) as rt:
        await _spare_ready(rt)
        spec = JobSpec(["/bin/ls", "/sys/class/net"], owner="ops", host_network=True)
        job = await rt.run(spec)
        async with asyncio.timeout(30):
            final = await rt.wait(job.id)
            out = joined(await collect(rt, job.id)).decode()
    assert final.exit_code == 0, out
    assert sorted(out.split()) == sorted(os.listdir("/sys/class/net"))
    assert not _took_a_spare(state, job.id)


async def test_a_supervisor_holds_nothing_of_the_launchers(tmp_path: Path) -> None:
    """The launcher's own descriptors (its mount table watch, a spare being built) stay
    out of the supervisors it forks, which outlive it."""
    state = tmp_path / "state"
    async with opened(make_config(state, owner_paths={})) as rt:
        await _spare_ready(rt)
        job = await rt.run(_host_py("import time; print('up', flush=True); time.sleep(600)"))
        await read_until(rt, job.id, b"up")
        supervisor = json.loads((state / "jobs" / job.id / "run.json").read_text())
        fds = Path(f"/proc/{supervisor['supervisor_pid']}/fd")
        links = [os.readlink(fd) for fd in fds.iterdir()]
        assert not [link for link in links if link.endswith("/mountinfo")], links
        assert not [link for link in links if link.startswith("mnt:")], links
        await rt.stop(job.id, grace=0)


async def test_a_spare_root_is_taken_and_never_hides_a_newer_mount(tmp_path: Path) -> None:
    """The launcher's spare root is a copy of the host's mounts when it was built: a job
    takes it, and a mount made on the host since throws it away (the job then sees the
    mount, as a job building its own root does)."""
    place = Path(tempfile.mkdtemp(prefix="jobworker-test-", dir="/mnt"))
    place.chmod(0o755)
    mounted = False
    try:
        state = tmp_path / "state"
        async with opened(make_config(state, owner_paths={})) as rt:
            await _spare_ready(rt)
            job = await rt.run(JobSpec(["/bin/ls", "-A", str(place)]))
            async with asyncio.timeout(30):
                await rt.wait(job.id)
                assert joined(await collect(rt, job.id)) == b""
            assert _took_a_spare(state, job.id)
            await _spare_ready(rt)
            mount("tmpfs", str(place), "tmpfs", 0, "size=64k,mode=0755")
            mounted = True
            (place / "marker").write_text("fresh")
            job = await rt.run(JobSpec(["/bin/cat", f"{place}/marker"]))
            async with asyncio.timeout(30):
                final = await rt.wait(job.id)
                out = joined(await collect(rt, job.id))
            assert (final.exit_code, out) == (0, b"fresh")
            assert not _took_a_spare(state, job.id)
    finally:
        if mounted:
            umount(str(place))
        place.rmdir()


SPARE_PROBE = """
import json, os, socket, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
socket.create_connection(s.getsockname(), timeout=5).close()
print(json.dumps({
    "hostname": socket.gethostname(),
    "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "net", "uts", "ipc")},
}), flush=True)
time.sleep(600)
"""


async def test_jobs_on_spare_roots_each_have_namespaces_of_their_own(tmp_path: Path) -> None:
    """A spare holds network (its loopback up), UTS and IPC namespaces made ahead besides
    its mount one: each job that takes one has them alone, its loopback working and its own
    hostname set."""
    state = tmp_path / "state"
    reports = []
    async with opened(make_config(state, owner_paths={})) as rt:
        # The first job stays while the second runs: a namespace's inode number is given
        # again once the namespace is freed.
        jobs = []
        for _ in range(2):
            await _spare_ready(rt)
            assert {"mnt", "net", "uts", "ipc"} <= _launcher_holds(rt)
            async with asyncio.timeout(30):
                job = await rt.run(_host_py(SPARE_PROBE))
                jobs.append(job.id)
                out = await read_until(rt, job.id, b"\n")
            assert _took_a_spare(state, job.id)
            report = json.loads(out)
            assert report["hostname"] == f"job-{job.id[:8]}"
            reports.append(report["ns"])
        for job_id in jobs:
            await rt.stop(job_id, grace=0)
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "net", "uts", "ipc")}
    for kind, ours in host.items():
        assert len({ours, reports[0][kind], reports[1][kind]}) == 3, kind


# Run in a process of its own: SpareRoots forks its builder, which a threaded test process
# must not do. Prints what take() gave after a host mount made during a build, and after a
# build with no mount during it.
SPARE_RACE = r"""
import select, sys
from jobworker.runtime._linux import mount, umount
from jobworker.runtime._spare import SpareRoots

at, place = sys.argv[1], sys.argv[2]
poller = select.poll()
spares = SpareRoots(at, (), poller)


def settle():
    # Until the build in flight has reported (its socket is the poller's only other fd).
    while spares._builder is not None:
        for fd, _event in poller.poll(30_000):
            spares.handle(fd)


spares.refill()
mount("tmpfs", place, "tmpfs", 0, "size=64k")  # before the launcher has seen the report
try:
    settle()
    print("after a mount during the build:", spares.take())
finally:
    umount(place)
for fd, _event in poller.poll(0):  # the unmount's event, before the next build
    spares.handle(fd)
spares.refill()
settle()
spare = spares.take()
print("after a quiet build:", spare is not None and len(spare.namespaces) == 4)
spares.close()
"""


def test_a_mount_made_while_a_spare_is_built_throws_that_build_away(tmp_path: Path) -> None:
    """A build that was under way when the host's mount table changed may have copied the
    table before the change: it must not be handed to a job. The mount is made before any
    report is read, so the order is fixed whichever of the two processes runs first."""
    place = tmp_path / "place"
    place.mkdir()
    (tmp_path / "spare").mkdir()
    try:
        out = subprocess.run(
            [sys.executable, "-c", SPARE_RACE, str(tmp_path / "spare"), str(place)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if os.path.ismount(place):  # the script was killed before its own unmount
            umount(str(place))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "after a mount during the build: None",
        "after a quiet build: True",
    ]


# Writes a marker into every place given, then stops itself until SIGCONT; then reports
# every marker it can see in those places, and its uid.
MATRIX = r"""
me=$1; shift
for d in "$@" /tmp /var/tmp /dev/shm /run/lock /job "$HOME"; do
  if (echo "$me" > "$d/marker-$me") 2>/dev/null; then echo "wrote $d"; fi
done
echo written
kill -STOP $$
for d in "$@" /tmp /var/tmp /dev/shm /run/lock /job; do
  for f in "$d"/marker-*; do
    [ -e "$f" ] && echo "seen $f $(cat "$f" 2>&1)"
  done
done
echo "uid $(id -u) gid $(id -g) groups $(id -G)"
"""


async def test_two_tenants_cannot_reach_each_other_or_the_host(sandboxed: Runtime) -> None:
    rt = sandboxed
    places = _world_writable_dirs()
    assert "/tmp" in places
    mounts_before = _mounts()
    async with asyncio.timeout(60):
        jobs = {
            owner: await rt.run(
                JobSpec(["/bin/sh", "-c", MATRIX, "sh", owner, *places], owner=owner)
            )
            for owner in ("alice", "bob")
        }
        for job in jobs.values():
            await read_until(rt, job.id, b"written")
        for job in jobs.values():
            await rt.signal(job.id, signal.SIGCONT)
        finals = {owner: await rt.wait(job.id) for owner, job in jobs.items()}
        out = {o: joined(await collect(rt, j.id)).decode() for o, j in jobs.items()}
        await rt.settled()
    for owner, other in (("alice", "bob"), ("bob", "alice")):
        assert finals[owner].state is State.EXITED, out[owner]
        assert "wrote /tmp" in out[owner]  # its own private /tmp is writable...
        assert f"marker-{other}" not in out[owner]  # ...and holds nothing of the other's
    for place in places:
        for owner in ("alice", "bob"):
            assert not os.path.exists(f"{place}/marker-{owner}"), f"{owner} wrote {place}"
    sandboxes = {o: f.sandbox for o, f in finals.items()}
    assert sandboxes["alice"] is not None
    assert sandboxes["bob"] is not None
    assert sandboxes["alice"].uid != sandboxes["bob"].uid
    assert 0 not in (sandboxes["alice"].uid, sandboxes["bob"].uid)
    for owner, box in sandboxes.items():
        assert box is not None
        assert f"uid {box.uid} gid {box.gid} groups {box.gid}\n" in out[owner]
    # Both uids are free again, and no tmpfs or other mount is left on the host.
    assert rt._life.uids.in_use == 0  # noqa: SLF001 - the allocator's own count
    assert _mounts() == mounts_before


SECCOMP_PROBE = r"""
import ctypes, errno, json, os, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {  # x86_64
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155,
    "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "io_uring_setup": 425, "kexec_load": 246, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "acct": 163,
    "quotactl": 179, "settimeofday": 164, "clock_settime": 227, "open_by_handle_at": 304,
    "name_to_handle_at": 303, "iopl": 172, "ioperm": 173, "open_tree": 428, "fsopen": 430,
    "move_mount": 429, "mount_setattr": 442,
}
ARGS = {"unshare": (0x10000000,), "setns": (0, 0)}
result = {}
for name, nr in NR.items():
    ret = libc.syscall(nr, *ARGS.get(name, (0, 0, 0, 0, 0)))
    result[name] = errno.errorcode.get(ctypes.get_errno(), "0") if ret == -1 else "ok"
ret = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER|SIGCHLD)
result["clone_newuser"] = errno.errorcode.get(ctypes.get_errno(), "0") if ret == -1 else "ok"
ret = libc.syscall(435, 0, 0)  # clone3
result["clone3"] = errno.errorcode.get(ctypes.get_errno(), "0") if ret == -1 else "ok"
ret = libc.personality(0x0040000)  # ADDR_NO_RANDOMIZE
result["personality_aslr_off"] = errno.errorcode.get(ctypes.get_errno()) if ret == -1 else "ok"
result["personality_query"] = "ok" if libc.personality(0xFFFFFFFF) != -1 else "refused"
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
KEYS = ("Seccomp", "CapBnd", "CapEff", "CapAmb", "CapPrm", "NoNewPrivs")
result["status"] = {k: status[k].strip() for k in KEYS}
t = threading.Thread(target=lambda: result.__setitem__("thread", "ran"))
t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
result["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(result))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
@pytest.mark.parametrize("owner", ["tenant", "root-mapped"])
async def test_seccomp_and_capabilities(tmp_path: Path, owner: str) -> None:
    config = make_config(
        tmp_path / "state",
        owner_paths={},
        owner_run_as={"root-mapped": RunAs(0, 0)},
        allow_root=True,
    )
    async with asyncio.timeout(60), await Runtime.open(config) as rt:
        job = await rt.run(_host_py(SECCOMP_PROBE, owner=owner))
        final = await rt.wait(job.id)
        out = joined(await collect(rt, job.id))
    assert final.exit_code == 0, out
    result = json.loads(out)
    assert result["status"]["Seccomp"] == "2"
    assert result["status"]["NoNewPrivs"] == "1"
    for caps in ("CapBnd", "CapEff", "CapAmb", "CapPrm"):
        assert int(result["status"][caps], 16) == 0, (caps, result["status"])
    denied = {k: v for k, v in result.items() if k not in ("status", "thread", "fork")}
    expected = dict.fromkeys(denied, "EPERM")
    expected["clone3"] = "ENOSYS"
    expected["personality_query"] = "ok"
    assert denied == expected
    assert result["thread"] == "ran"
    assert result["fork"] == 7


ORDINARY = r"""
set -e
cd /job
printf 'int main(void){return 0;}\n' > /tmp/t.c
gcc -o /tmp/t /tmp/t.c && /tmp/t && echo compiled
git init -q repo && echo git-ok
ls /usr/bin > /dev/null && sort /etc/passwd | head -1 > /dev/null && echo coreutils-ok
python3 -c 'import threading as t; x=t.Thread(target=print, args=("threads-ok",)); x.start()'
"""


@pytest.mark.skipif(
    not (shutil.which("gcc") and shutil.which("git")), reason="needs gcc and git (./dev installs)"
)
async def test_ordinary_programs_run_in_the_sandbox(sandboxed: Runtime) -> None:
    async with asyncio.timeout(120):
        job = await sandboxed.run(JobSpec(["/bin/sh", "-c", ORDINARY]))
        final = await sandboxed.wait(job.id)
        out = joined(await collect(sandboxed, job.id))
    assert final.exit_code == 0, out
    assert out.split() == [b"compiled", b"git-ok", b"coreutils-ok", b"threads-ok"]


PROC_SYS = r"""
import json, os
r = {}
for name in ("kcore", "keys", "timer_list", "sched_debug"):
    p = "/proc/" + name
    r[name] = open(p, "rb").read(64) if os.path.exists(p) else b""
r = {k: v.decode() for k, v in r.items()}
r["acpi"] = os.listdir("/proc/acpi") if os.path.isdir("/proc/acpi") else []
opts = {}
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    opts[fields[4]] = fields[5].split(",")
for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/sys", "/", "/usr"):
    r["ro " + p] = "ro" in opts.get(p, ["ro"])
r["cgroup"] = sorted(os.listdir("/sys/fs/cgroup"))
r["cgroup_dirs"] = [n for n in r["cgroup"] if os.path.isdir("/sys/fs/cgroup/" + n)]
r["own_cgroup"] = open("/proc/self/cgroup").read().split("\n")[0]
procs = "/sys/fs/cgroup/cgroup.procs"
r["cgroup_procs"] = open(procs).read().split() if os.path.exists(procs) else None
r["home"] = os.listdir("/home")
r["root"] = os.listdir("/root")
r["run_user"] = os.listdir("/run/user") if os.path.isdir("/run/user") else []
r["dev"] = sorted(os.listdir("/dev"))
print(json.dumps(r))
"""


async def test_proc_sys_and_dev_are_narrowed(sandboxed: Runtime) -> None:
    async with asyncio.timeout(60):
        job = await sandboxed.run(_host_py(PROC_SYS))
        final = await sandboxed.wait(job.id)
        out = joined(await collect(sandboxed, job.id))
    assert final.exit_code == 0, out
    r = json.loads(out)
    for name in ("kcore", "keys", "timer_list", "sched_debug"):
        assert r[name] == "", name
    assert r["acpi"] == []
    for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/sys", "/", "/usr"):
        assert r["ro " + path], f"{path} is writable"
    if detect().kind == "v2":
        # A cgroup2 view rooted at the job's own cgroup: only its processes.
        # A pid outside the reader's PID namespace reads 0: none may be there, and no
        # other cgroup (a job's own has no children) may be listed.
        assert "cgroup.procs" in r["cgroup"]
        assert r["cgroup_procs"]
        assert all(0 < int(p) < 10 for p in r["cgroup_procs"]), r["cgroup_procs"]
        assert r["cgroup_dirs"] == []
        assert r["own_cgroup"] == "0::/"
    else:
        assert r["cgroup"] == []
    assert r["home"] == []
    assert r["root"] == []
    assert r["run_user"] == []
    devices = ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin"]
    assert r["dev"] == sorted([*devices, "stdout", "tty", "urandom", "zero"])


async def test_the_disk_is_bounded_by_the_tmp_size(sandboxed: Runtime, tmp_path: Path) -> None:
    free_before = shutil.disk_usage(tmp_path).free
    limits = Limits(memory_bytes=256 * MIB, tmp_bytes=100 * MIB)
    script = "dd if=/dev/zero of=/tmp/fill bs=1M count=2048 2>&1; ls -l /tmp/fill"
    async with asyncio.timeout(120):
        job = await sandboxed.run(JobSpec(["/bin/sh", "-c", script], limits=limits))
        final = await sandboxed.wait(job.id)
        out = joined(await collect(sandboxed, job.id)).decode()
    assert final.exit_code == 0, out
    assert "No space left on device" in out or final.oom_killed
    assert final.sandbox is not None
    assert final.sandbox.tmp_bytes == 100 * MIB
    # Nothing of it reached the host's disk.
    assert free_before - shutil.disk_usage(tmp_path).free < 50 * MIB


HIDDEN = r"""
for p in "$STATE" "$SECRETS" /home /root; do echo "$p: $(ls -A "$p" 2>&1 | tr '\n' ' ')"; done
cat "$SECRETS/server.key" 2>&1 | head -1
echo x > /srv-ro/new 2>&1 || echo ro-refused
echo x > /srv-rw/new && echo rw-ok
cat /srv-ro/data
"""


async def test_hidden_and_exposed_paths(public_dir: Path) -> None:
    # All in a directory the job is shown and may enter, so only the sandbox hides them.
    secrets = public_dir / "tls"
    secrets.mkdir(mode=0o755)
    (secrets / "server.key").write_text("PRIVATE KEY\n")
    (secrets / "server.key").chmod(0o644)
    shown_ro, shown_rw = Path(f"/srv-ro-{os.getpid()}"), Path(f"/srv-rw-{os.getpid()}")
    for d in (shown_ro, shown_rw):
        d.mkdir(mode=0o777)
        d.chmod(0o777)
    (shown_ro / "data").write_text("shared data\n")
    state = public_dir / "state"
    config = make_config(
        state,
        hide_paths=(str(secrets),),
        owner_paths={
            "*": (Bind(str(public_dir), writable=False),),
            "alice": (Bind(str(shown_ro), writable=False), Bind(str(shown_rw), writable=True)),
        },
    )
    script = HIDDEN.replace("/srv-ro", str(shown_ro)).replace("/srv-rw", str(shown_rw))
    try:
        async with asyncio.timeout(60), await Runtime.open(config) as rt:
            env = {"STATE": str(state), "SECRETS": str(secrets)}
            job = await rt.run(JobSpec(["/bin/sh", "-c", script], env=env, owner="alice"))
            final = await rt.wait(job.id)
            out = joined(await collect(rt, job.id)).decode()
            with pytest.raises(InvalidSpecError, match="does not exist inside the job"):
                await rt.run(JobSpec(["true"], cwd=str(shown_rw), owner="bob"))
        assert final.exit_code == 0, out
        lines = out.splitlines()
        assert lines[:4] == [f"{state}: ", f"{secrets}: ", "/home: ", "/root: "]
        assert "PRIVATE KEY" not in out
        assert "ro-refused" in out
        assert "rw-ok" in out
        assert "shared data" in out
        assert (shown_rw / "new").read_text() == "x\n"
        assert not (shown_ro / "new").exists()
    finally:
        shutil.rmtree(shown_ro)
        shutil.rmtree(shown_rw)


@pytest.fixture
def busybox_image(tmp_path: Path) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox-static (./dev installs it)")
    root = tmp_path / "image"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    # Relative links: `busybox --install -s` would point them at this host path.
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for name in ("etc", "var", "run"):
        (root / name).mkdir()
    (root / "etc" / "image-release").write_text("busybox test image\n")
    root.chmod(0o755)
    return root


async def test_a_busybox_image(tmp_path: Path, busybox_image: Path) -> None:
    config = make_config(tmp_path / "state", images={"busybox": str(busybox_image)})
    async with asyncio.timeout(60), await Runtime.open(config) as rt:
        job = await rt.run(
            JobSpec(
                ["/bin/sh", "-c", "ls /; cat /etc/image-release; ls /usr 2>&1"], image="busybox"
            )
        )
        final = await rt.wait(job.id)
        out = joined(await collect(rt, job.id)).decode()
        with pytest.raises(
            InvalidSpecError, match="unknown image 'alpine'; the server's images: busybox"
        ):
            await rt.run(JobSpec(["true"], image="alpine"))
    assert "busybox test image" in out, final
    listed = out.split("busybox test image")[0].split()
    assert "bin" in listed
    assert "usr" not in listed  # the host's /usr is not there
    assert final.sandbox is not None
    assert final.sandbox.image == "busybox"


async def test_seccomp_can_be_turned_off_only_where_configured(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "state", owner_paths={}, seccomp_optional_owners=frozenset({"ci"})
    )
    async with asyncio.timeout(60), await Runtime.open(config) as rt:
        with pytest.raises(NotPermittedError, match="without the seccomp filter"):
            await rt.run(JobSpec(["true"], owner="dev", seccomp=False))
        job = await rt.run(
            JobSpec(["grep", "Seccomp:", "/proc/self/status"], owner="ci", seccomp=False)
        )
        await rt.wait(job.id)
        out = joined(await collect(rt, job.id))
    assert out.split() == [b"Seccomp:", b"0"]


async def test_uids_and_walls_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state", owner_paths={})
    async with asyncio.timeout(60):
        first = await Runtime.open(config)
        job = await first.run(JobSpec(["/bin/sh", "-c", "echo ready; exec sleep 600"]))
        await read_until(first, job.id, b"ready")
        await first.close()
        second = await Runtime.open(config)
        try:
            status = await second.status(job.id)
            assert status.state is State.RUNNING
            assert status.sandbox == job.sandbox
            assert second._life.uids.in_use == 1  # noqa: SLF001 - its uid stays taken
            other = await second.run(JobSpec(["id", "-u"]))
            await second.wait(other.id)
            assert other.sandbox is not None
            assert job.sandbox is not None
            assert other.sandbox.uid != job.sandbox.uid
            final = await second.stop(job.id, grace=0)
            assert final.state is State.STOPPED
        finally:
            await second.close()
            # The first runtime's launcher stayed for its running job; it goes once the
            # job has ended.
            for rt in (first, second):
                await asyncio.to_thread(rt._launcher._proc.wait, 30)  # noqa: SLF001
    assert second._life.uids.in_use == 0  # noqa: SLF001
