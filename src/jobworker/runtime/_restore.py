"""Reading the state dir back after a (re)start: what each job directory says about its job.

Why files and not SQLite: the job's supervisor, which outlives the server, writes the records
that matter most (``run.json`` when the command runs, ``exit.json`` when it ends). Plain files
written with temp + rename cost a forked supervisor no library and no lock shared with the
server, a crash can only leave the old file or the new one, and deleting a job is deleting
its directory. Reading 10,000 jobs back this way is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, NamedTuple

from ._records import EXIT, FINAL, RUN, SPEC, ExitRecord, RunRecord, read_json, start_ticks

__all__ = ["Found", "boot_id", "open_supervisor", "read_job_dir", "scan"]

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id: a job recorded under another one ran before the host restarted."""
    with open(_BOOT_ID) as f:
        return f.read().strip()


class Found(NamedTuple):
    """One job directory as found on disk."""

    directory: str
    meta: dict[str, Any]
    run: RunRecord | None
    exit: ExitRecord | None
    final: dict[str, Any] | None


def read_job_dir(directory: str) -> Found | None:
    """The records in ``directory``; None if it holds no spec (a create cut short before
    its spec.json was renamed into place, so no job was ever reported to anyone).

    Raises:
        ValueError, KeyError, TypeError: a record is corrupt.
        OSError: the directory cannot be read.
    """
    meta = read_json(os.path.join(directory, SPEC))
    if meta is None:
        return None
    final = read_json(os.path.join(directory, FINAL))
    if final is not None and final.get("exit") is not None:
        # An ended job, recorded in full by the server that saw it end: two reads, not four.
        run = final.get("run")
        return Found(
            directory,
            meta,
            RunRecord.from_json(run) if run is not None else None,
            ExitRecord.from_json(final["exit"]),
            final,
        )
    # Exit first: a supervisor writes run.json before exit.json, so having read exit.json
    # we cannot miss a run.json that exists.
    exit_data = read_json(os.path.join(directory, EXIT))
    run_data = read_json(os.path.join(directory, RUN))
    return Found(
        directory,
        meta,
        RunRecord.from_json(run_data) if run_data is not None else None,
        ExitRecord.from_json(exit_data) if exit_data is not None else None,
        final,
    )


def scan(jobs_dir: str) -> tuple[list[Found], list[str], list[tuple[str, str]]]:
    """Every job directory under ``jobs_dir``: (jobs, directories without a spec, and
    (directory, reason) for those whose records are corrupt)."""
    found, empty, corrupt = [], [], []
    with os.scandir(jobs_dir) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                job = read_job_dir(entry.path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                corrupt.append((entry.path, str(e) or type(e).__name__))
                continue
            if job is None:
                empty.append(entry.path)
            else:
                found.append(job)
    return found, empty, corrupt


def open_supervisor(run: RunRecord) -> int | None:
    """A pidfd on the job's supervisor if the process ``run`` names still exists, else None.

    The pidfd is opened first and the start time checked after, so a pid reused by another
    process is never mistaken for the supervisor: if the check passes, the pidfd is its.
    """
    try:
        pidfd = os.pidfd_open(run.supervisor_pid)
    except ProcessLookupError:
        return None
    try:
        same = start_ticks(f"/proc/{run.supervisor_pid}") == run.supervisor_start_ticks
    except (OSError, ValueError, IndexError):
        same = False
    if not same:
        with contextlib.suppress(OSError):
            os.close(pidfd)
        return None
    return pidfd
