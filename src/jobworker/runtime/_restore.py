"""Taking the state dir back after a (re)start: what each job directory says about its job.

The decision table (docs/architecture.md, "Restarts and durable state"), per directory:

- ``final.json`` (or ``exit.json``): ended, as recorded (usage read from its cgroup if the
  server missed the end);
- ``run.json``, no exit, supervisor alive: running, watched and steered again;
- ``run.json``, no exit, supervisor gone: failed, "lost: ..." (recorded, so every later
  start agrees);
- start requested, nothing else: a launch in flight; wait for its supervisor, else failed;
- ``spec.json`` only: created, startable;
- no ``spec.json``: a create cut short before anyone got the id; removed;
- records this release cannot read: set aside in ``<state_dir>/set-aside/`` with a REASON
  file, logged, and the server starts without them.

Why files and not SQLite: the job's supervisor, which outlives the server, writes the records
that matter most (``run.json`` when the command runs, ``exit.json`` when it ends). Plain files
written with temp + rename cost a forked supervisor no library and no lock shared with the
server, a crash can only leave the old file or the new one, and deleting a job is deleting
its directory. Reading 10,000 jobs back this way is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
from collections.abc import Iterator

from ._job import Job
from ._jobdir import CONTROL, Found, RunRecord, read_found, scan, set_aside, start_ticks
from ._launch import SupervisorHandle
from ._lifecycle import Lifecycle
from .cgroups import CgroupError

__all__ = ["boot_id", "restore"]

log = logging.getLogger("jobworker.runtime")

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
# After a restart, how long a launch left in flight gets for its supervisor to show up.
_SUPERVISOR_APPEARS_S = 5.0


def boot_id() -> str:
    """This boot's id: a job recorded under another one ran before the host restarted."""
    with open(_BOOT_ID) as f:
        return f.read().strip()


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


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the state dir is read back.

    Every job read back allocates objects that all stay alive, so each automatic collection
    meanwhile walks the ever larger heap for nothing: scanning 10,000 jobs took 1.6 s with
    the collector on and 0.35 s with it off (docs/benchmarks.md (o)). It is off for the
    whole process, briefly; the server does not serve yet (reference counting
    still frees all that is not cyclic).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def restore(life: Lifecycle) -> None:
    """Take back every job in the state dir (see the table above)."""
    with _collector_paused():
        await _restore(life)


async def _restore(life: Lifecycle) -> None:
    found, empty, corrupt = await asyncio.to_thread(
        scan, str(life.jobs_dir), lambda f: life.job_of(f.spec, f.directory)
    )
    for directory in empty:
        # mkdir happened, spec.json never did: the create was cut short and its id was
        # never given to anyone.
        await asyncio.to_thread(shutil.rmtree, directory, True)
    for directory, reason in corrupt:
        try:
            moved = await asyncio.to_thread(
                set_aside, str(life.config.state_dir), directory, reason
            )
        except OSError as e:
            log.warning(
                "skipping job directory %s: %s (cannot set it aside: %s)", directory, reason, e
            )
        else:
            log.warning("set aside job directory %s as %s: %s", directory, moved, reason)
    found.sort(key=lambda pair: pair[0].spec.created_ns)
    for record, job in found:
        life.registry.add(job)
        life.uids.seen(job.record.uid)
        if record.exit is None and record.final is None:
            # Running, or starting: its uid is still its own.
            life.uids.keep(job.record.uid, job.id)
        await _resume(life, job, record)
        job.appeared()
    life.registry.sort_ended()


async def _resume(life: Lifecycle, job: Job, found: Found) -> None:
    if found.final is not None:
        # Recorded in full at its end, cgroup removed then (or by prune at start-up).
        job.restored(found.final)
    elif found.exit is not None:
        if found.run is not None:
            job.reattached(found.run, None)
        await life.end(job, found.exit)
    elif found.run is not None:
        pidfd = await asyncio.to_thread(open_supervisor, found.run)
        if pidfd is not None:
            handle = SupervisorHandle(job.dir, pidfd)
            job.reattached(found.run, handle)
            life.background(life.watch(job, handle), life.tasks)
            return
        # Gone. It may have recorded its end in the meantime; if not, it never will.
        again = await asyncio.to_thread(read_found, job.dir)
        job.reattached(found.run, None)
        if again is not None and again.exit is not None:
            await life.end(job, again.exit)
            return
        await life.end(job, await life.record_lost(job, _lost_reason(life, job)))
    elif job.record.launching:
        life.background(_await_launch(life, job), life.tasks)


def _lost_reason(life: Lifecycle, job: Job) -> str:
    if job.record.boot_id not in ("", life.boot_id):
        return "lost: the host restarted while the job ran"
    return "lost: the job's supervisor is gone and recorded no end (killed from outside)"


def _launch_progress(directory: str) -> tuple[Found | None, bool]:
    """(the job's records if its supervisor has recorded a start or an end, whether its
    supervisor has bound its control socket)."""
    found = read_found(directory)
    if found is not None and (found.run or found.exit):
        return found, True
    return None, os.path.exists(os.path.join(directory, CONTROL))


async def _await_launch(life: Lifecycle, job: Job) -> None:
    """A launch was under way when the previous server stopped: wait for its supervisor
    to record a start or an end, for at most the launch timeout. A supervisor binds its
    control socket first thing; if none has appeared after _SUPERVISOR_APPEARS_S, the
    launch request never reached the launcher and the job never started."""
    async with job.start_lock:
        changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        started = loop.time()
        found: Found | None = None
        with life.notifier.subscribe(job.dir, changed), contextlib.suppress(TimeoutError):
            async with asyncio.timeout(life.config.launch_timeout):
                while True:
                    changed.clear()
                    found, has_supervisor = await asyncio.to_thread(_launch_progress, job.dir)
                    if found is not None:
                        break
                    wait = None
                    if not has_supervisor:
                        wait = started + _SUPERVISOR_APPEARS_S - loop.time()
                        if wait <= 0:
                            break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await changed.wait()
        if found is not None:
            await _resume(life, job, found)
            return
        cgroup = job.cgroup or (life.cgroups.find(job.id) if life.cgroups is not None else None)
        if cgroup is not None:
            with contextlib.suppress(CgroupError, OSError):
                await asyncio.to_thread(cgroup.kill)
        error = "lost: the server stopped while starting the job, and it never started"
        job.lost(await life.record_lost(job, error))
        life.background(life.finish(job), life.cleanups)
