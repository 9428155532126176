"""Fixtures shared by every test: a real runtime on a temporary state dir."""

from __future__ import annotations

# First: jobworker.api pins gRPC's TLS settings, which must happen before grpc is imported.
import jobworker.api  # noqa: F401  # isort: skip

import asyncio
import contextlib
import getpass
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from jobworker.runtime import Bind, JobEndedError, Runtime, RuntimeConfig, State
from jobworker.runtime.cgroups import detect

IN_V2VM = os.environ.get("V2VM") == "1"
CGROUP2 = "/sys/fs/cgroup"
REPO = Path(__file__).resolve().parents[1]
# Where public_dir makes directories jobs may write: shown to every test job, writable.
PUBLIC_BASE = Path(tempfile.gettempdir()) / f"jobworker-tests-public-{os.getpid()}"
# pytest's own temporary directories, shown read-only (tests put scripts there).
PYTEST_TMP = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"
# What the sandbox of every test job shows of the host beyond its read-only root: this
# checkout (the interpreter of py() jobs may live in it), pytest's and public_dir's
# directories. Tests of the sandbox itself pass their own owner_paths.
TEST_PATHS = {
    "*": (
        Bind(str(REPO), writable=False),
        Bind(str(PYTEST_TMP), writable=False),
        Bind(str(PUBLIC_BASE), writable=True),
    ),
}


def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001 - pytest hook signature
    if os.geteuid() != 0:
        pytest.exit("the jobworker tests need root (PID namespaces, cgroups); run them as root", 2)


@pytest.fixture(scope="session", autouse=True)
def own_v2_parent() -> Iterator[None]:
    """In the v2 VM the tests start in the root cgroup, among the VM's other processes.
    Give the session a cgroup of its own, as systemd's Delegate=yes would, and take it down
    at the end."""
    if not IN_V2VM:
        yield
        return
    parent = os.path.join(CGROUP2, f"jobworker-tests-{os.getpid()}")
    os.mkdir(parent)
    Path(parent, "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield
    finally:
        Path(CGROUP2, "cgroup.procs").write_text(str(os.getpid()))
        for leftover in sorted(Path(parent).glob("*/"), reverse=True):
            leftover.rmdir()
        os.rmdir(parent)


def cgroup_dirs(subtree: str) -> list[str]:
    """Every directory named ``subtree`` beneath our own cgroup, in every hierarchy."""
    layout = detect()
    hierarchies = [*layout.v1.values(), *([layout.unified] if layout.unified else [])]
    parents = {h.own_dir for h in hierarchies}
    # On cgroup v2 the runtime moves the test process into <own>/supervisor.
    parents |= {os.path.dirname(p) for p in parents if os.path.basename(p) == "supervisor"}
    return [os.path.join(p, subtree) for p in parents if os.path.isdir(os.path.join(p, subtree))]


def make_config(state_dir: Path, **kw: object) -> RuntimeConfig:
    """A config with a cgroup subtree of the test's own, so tests never share cgroups."""
    kw.setdefault("cgroup_subtree", f"jobworker-test-{uuid.uuid4().hex[:8]}")
    kw.setdefault("default_grace", 5.0)
    kw.setdefault("owner_paths", TEST_PATHS)
    return RuntimeConfig(state_dir=state_dir, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def opened(config: RuntimeConfig) -> AsyncIterator[Runtime]:
    """A runtime on ``config`` whose jobs are all ended (SIGKILL), whose launcher is gone
    and whose cgroup subtree is removed afterwards."""
    async with asyncio.timeout(60):
        rt = await Runtime.open(config)
    try:
        yield rt
    finally:
        async with asyncio.timeout(60):
            for status in await rt.jobs():
                if status.state is State.RUNNING:
                    # It may end by itself meanwhile: then there is nothing to stop.
                    with contextlib.suppress(JobEndedError):
                        await rt.stop(status.id, grace=0)
            launcher = rt._launcher._proc  # noqa: SLF001 - the test checks the launcher is gone
            await rt.close()
        assert launcher.poll() is not None, "the launcher outlived a runtime with no jobs"
        assert cgroup_dirs(config.cgroup_subtree) == [], "the runtime left cgroups behind"


async def next_job_made(rt: Runtime) -> None:
    """Wait until ``rt`` has made its next job ahead (which it does once the job it last
    started has said something), so none of that work is in flight. Checked every 10 ms,
    30 s at most: nothing announces it."""
    async with asyncio.timeout(30):
        while rt._life.next is None:  # noqa: SLF001, ASYNC110 - the runtime's own business, not announced
            await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    """A runtime of the test's own (see :func:`opened`)."""
    async with opened(make_config(tmp_path / "state")) as rt:
        yield rt


@pytest.fixture(scope="session", autouse=True)
def public_base() -> Iterator[None]:
    PUBLIC_BASE.mkdir(mode=0o755, exist_ok=True)
    yield
    shutil.rmtree(PUBLIC_BASE, ignore_errors=True)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory that jobs (running as nobody) can enter and read; pytest's tmp dirs are
    private to root."""
    PUBLIC_BASE.mkdir(mode=0o755, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="jobworker-test-", dir=PUBLIC_BASE))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)
