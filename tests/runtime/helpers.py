"""Helpers for runtime tests: run small Python programs as jobs, inspect /proc."""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from jobworker.runtime import Chunk, JobSpec, Runtime, Stream

PY = sys.executable


def py(code: str, *args: str, **kw: object) -> JobSpec:
    """A spec that runs ``code`` (dedented) with this interpreter."""
    return JobSpec([PY, "-c", textwrap.dedent(code), *args], **kw)  # type: ignore[arg-type]


async def collect(
    rt: Runtime, job_id: str, *, stdout: bool = True, stderr: bool = True, follow: bool = True
) -> list[Chunk]:
    async with contextlib.aclosing(
        rt.output(job_id, stdout=stdout, stderr=stderr, follow=follow)
    ) as it:
        return [chunk async for chunk in it]


def joined(chunks: Sequence[Chunk], stream: Stream | None = None) -> bytes:
    return b"".join(c.data for c in chunks if stream is None or c.stream is stream)


async def read_until(rt: Runtime, job_id: str, marker: bytes) -> bytes:
    """Follow the job's stdout until ``marker`` has appeared; return what was read."""
    seen = b""
    async with contextlib.aclosing(rt.output(job_id, stderr=False, follow=True)) as it:
        async for chunk in it:
            seen += chunk.data
            if marker in seen:
                return seen
    raise AssertionError(f"job ended before printing {marker!r}; got {seen[-200:]!r}")


def pid_namespace_members(host_pid: int) -> list[int]:
    """Host pids of every process in the same PID namespace as ``host_pid``."""
    ns = os.readlink(f"/proc/{host_pid}/ns/pid")
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                    members.append(int(entry))
    return members


def _processes() -> list[tuple[int, bytes, int]]:
    """(pid, state letter, ppid) of every process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        found.append((int(entry), fields[0], int(fields[1])))
    return found


def zombies_of(parents: set[int]) -> list[int]:
    """Pids of zombie processes whose parent is one of ``parents``."""
    return [pid for pid, state, ppid in _processes() if state == b"Z" and ppid in parents]


def children_of(parent: int) -> list[int]:
    return [pid for pid, _state, ppid in _processes() if ppid == parent]


def supervisor_pid(state_dir: Path, job_id: str) -> int:
    """The host pid of the job's supervisor, from the run record it wrote."""
    run = json.loads((state_dir / "jobs" / job_id / "run.json").read_text())
    return int(run["supervisor_pid"])


def is_gone(pidfd: int) -> bool:
    """True if the process behind ``pidfd`` has exited (a pidfd polls readable then)."""
    return bool(select.select([pidfd], [], [], 0)[0])
