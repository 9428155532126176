"""Sampling every running job's usage, on one timer, for its history (``_usage``).

One loop for all jobs, not a timer per job: each tick reads the cgroups of every running job
in one worker thread, through descriptors kept open from one tick to the next (four per
running job: at 1,000 jobs, opening each file every second cost 5.5% of a core), appends
each job's sample to its history, then wakes whoever watches that job's usage. The ticks
keep their rhythm from the clock, not from the end of the previous tick, and a tick that
overruns is skipped, never stacked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator

from ._job import Job
from ._lifecycle import Lifecycle
from ._states import State
from ._usage import Sample, UsageHistory
from .cgroups import UsageProbe

__all__ = ["Sampler"]

log = logging.getLogger("jobworker.runtime")


class Sampler:
    """Every running job's usage, every ``interval`` seconds (None: never)."""

    def __init__(self, life: Lifecycle, interval: float | None) -> None:
        self._life = life
        self.interval = interval
        # Set and replaced after each tick: watchers wait for the next one.
        self._tick = asyncio.Event()
        self.cost_seconds = 0.0  # thread time spent sampling, for the benchmark and metrics
        self.samples_taken = 0
        # Each sampled job's cgroup files, held open from one tick to the next (a read
        # through a kept descriptor costs a seventh of open, read and close).
        self._probes: dict[str, UsageProbe] = {}
        self._taking = threading.Lock()
        self._closed = False
        # Each running job's latest two samples (oldest first), replaced whole each tick:
        # the jobs list's CPU and memory come from here, not from each job's history file.
        self.recent: dict[str, tuple[Sample, ...]] = {}

    async def run(self) -> None:
        if self.interval is None:
            return
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            await self._sample()
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()
            now = time.monotonic()
            if now > next_at:  # overran: the next tick is the next one still ahead
                next_at += ((now - next_at) // self.interval + 1) * self.interval
            await asyncio.sleep(next_at - now)

    async def _sample(self) -> None:
        # A call of its own, so that no job stays referenced from the loop's frame while it
        # sleeps: a removed job must be freed at once, not at the next tick (an hour away,
        # perhaps), nor left to the cycle collector.
        jobs = [j for j in self._life.registry.live() if _sampled(j)]
        if jobs:
            async with self._life.sampling:
                await asyncio.to_thread(self._take, jobs)

    def _take(self, jobs: list[Job]) -> None:
        with self._taking:
            if not self._closed:
                self._take_locked(jobs)

    def _take_locked(self, jobs: list[Job]) -> None:
        started = time.thread_time()
        probes, self._probes = self._probes, {}
        recent: dict[str, tuple[Sample, ...]] = {}
        for job in jobs:
            cgroup = job.cgroup
            if cgroup is None:
                continue
            probe = probes.pop(job.id, None) or cgroup.probe()
            self._probes[job.id] = probe
            try:
                sample = probe.read()
                UsageHistory(job.dir).append(sample)
            except (OSError, ValueError) as e:
                # The job ended under us (its cgroup is going), its disk is full, we are
                # out of descriptors, or a cgroup file read oddly: the next tick tries
                # again; the job is unaffected, and so is sampling for the others.
                log.debug("usage sample of %s skipped: %s", job.id, e)
                continue
            self.samples_taken += 1
            recent[job.id] = (*self.recent.get(job.id, ())[-1:], sample)
        for gone in probes.values():  # jobs no longer running
            gone.close()
        self.recent = recent
        self.cost_seconds += time.thread_time() - started

    def close(self) -> None:
        """Let go of every job's cgroup files, once a tick under way is over (it may still
        run in its thread after the loop's task was cancelled); no tick runs after."""
        with self._taking:
            self._closed = True
            for probe in self._probes.values():
                probe.close()
            self._probes.clear()
            self.recent = {}

    async def watch(self, job: Job, since_ns: int) -> AsyncGenerator[list[Sample], None]:
        """The job's samples after ``since_ns``, then each new one as it is taken, until
        the job has ended (its last samples included)."""
        history = UsageHistory(job.dir)
        offset = 0
        while True:
            tick = self._tick
            read, offset = history.read_from(offset)
            samples = [s for s in read if s.time_ns > since_ns]
            if samples:
                since_ns = samples[-1].time_ns
                yield samples
            if job.state.is_final:
                return
            waits = {
                asyncio.ensure_future(job.ended_event.wait()),
                asyncio.ensure_future(tick.wait()),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()


def _sampled(job: Job) -> bool:
    return job.state is State.RUNNING and job.cgroup is not None
