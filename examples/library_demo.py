"""A tour of the jobworker runtime library: run, follow, stop, inspect.

Run with ``./dev demo`` (as root). Jobs are real processes, each in its own PID namespace;
their output and exit records land in a temporary state dir that is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

from jobworker.runtime import JobEndedError, JobSpec, Runtime, RuntimeConfig, Stream


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="jobworker-demo-") as state:
        config = RuntimeConfig(state_dir=Path(state))
        async with await Runtime.open(config) as rt:
            say("run a job and follow its output (stdout and stderr, in order)")
            job = await rt.run(
                JobSpec(["/bin/sh", "-c", "echo hello from $JOBWORKER_JOB_ID; ls /nope; exit 3"])
            )
            async with contextlib.aclosing(rt.output(job.id, follow=True)) as chunks:
                async for chunk in chunks:
                    tag = "err" if chunk.stream is Stream.STDERR else "out"
                    sys.stdout.write(f"[{tag}] {chunk.data.decode(errors='replace')}")
            final = await rt.wait(job.id)
            print(f"job {final.id} {final.describe_end()}")

            say("a command that cannot start fails with the OS's reason")
            bad = await rt.run(JobSpec(["no-such-command"]))
            print(f"state={bad.state}: {bad.error}")

            say("stop a job: SIGTERM to every process, SIGKILL after the grace period")
            sleeper = await rt.run(JobSpec(["/bin/sh", "-c", "sleep 600 & sleep 600 & wait"]))
            print(f"started {sleeper.id} (pid {sleeper.pid}), state={sleeper.state}")
            stopped = await rt.stop(sleeper.id, grace=2)
            print(f"job {stopped.id} {stopped.describe_end()}")
            try:
                await rt.stop(sleeper.id)
            except JobEndedError as e:
                print(f"stopping it again: {e}")

            say("list")
            for status in await rt.jobs():
                print(f"{status.id}  {status.state:<8} {' '.join(status.argv)}")


if __name__ == "__main__":
    asyncio.run(main())
