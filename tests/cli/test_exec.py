"""jobctl exec: a command inside a running job, end to end (pipes, and a real pty)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from ..api.conftest import Pki, serving
from .test_interactive import _jobctl
from .test_jobctl import JOBCTL, Cli, cli_env
from .test_terminal import Terminal


@pytest_asyncio.fixture
async def cli(tmp_path: Path, pki: Pki) -> AsyncIterator[Cli]:
    async with serving(tmp_path, pki) as running:
        yield Cli(running, cli_env(running, "alice", tmp_path))


async def _job(cli: Cli) -> str:
    """A job that prints its hostname, leaves a file, and waits; the hostname, once the
    job has printed it (so the file is there too)."""
    script = "echo secret > marker; hostname; exec sleep 1000"
    await cli("start", "-q", "--name", "box", "--", "sh", "-c", script)
    follower = await asyncio.create_subprocess_exec(
        JOBCTL, "logs", "-f", "box", env=cli.env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert follower.stdout is not None
        line = await asyncio.wait_for(follower.stdout.readline(), 30)
    finally:
        follower.kill()
        await asyncio.wait_for(follower.wait(), 30)
    return line.decode().strip()


async def test_exec_runs_inside_the_job_and_exits_with_its_status(cli: Cli) -> None:
    hostname = await _job(cli)
    status, out, err = await _jobctl(
        cli,
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "hostname; cat marker; echo $X; exit 3",
        stdin=b"",
    )
    assert status == 3, err
    assert out.decode().split("\n")[:2] == [hostname, "secret"]
    status, out, _ = await _jobctl(
        cli, "exec", "-e", "X=1", "box", "--", "sh", "-c", "echo $X", stdin=b""
    )
    assert (status, out) == (0, b"1\n")
    # Its own stdin: piped with -i, EOF passed on.
    assert await _jobctl(cli, "exec", "-i", "box", "--", "cat", stdin=b"hi\n") == (0, b"hi\n", b"")
    # Nothing of it is in the job's log.
    assert (await cli("logs", "box")).text == f"{hostname}\n"


async def test_a_command_that_cannot_run_is_127_with_one_line(cli: Cli) -> None:
    await _job(cli)
    status, _, err = await _jobctl(cli, "exec", "box", "--", "no-such-tool", stdin=b"")
    assert status == 127
    assert err.decode().count("\n") == 1
    assert "not found" in err.decode()
    # An ended job: one line, exit 1.
    await cli("stop", "box")
    status, _, err = await _jobctl(cli, "exec", "box", "--", "true", stdin=b"")
    assert status == 1
    assert err.decode().count("\n") == 1
    assert "it already stopped" in err.decode()


async def test_exec_it_gives_a_terminal_of_the_jobs_own(cli: Cli) -> None:
    await _job(cli)
    term = Terminal([JOBCTL, "exec", "-it", "box", "--", "sh"], cli.env, rows=31, cols=99)
    await term.expect(b"$ ")
    term.type(b"tty; stty size; ps -e -o comm=; echo EN''D\r")
    screen = await term.expect(b"END")
    term.type(b"exit 6\r")
    assert await term.status() == 6
    assert b"/dev/pts/" in screen
    assert b"31 99" in screen
    assert b"sleep" in screen  # the job's command, seen from inside


async def test_ctrl_c_without_a_terminal_interrupts_the_command(cli: Cli) -> None:
    await _job(cli)
    script = "trap 'echo got INT; exit 9' INT; echo ready; while :; do sleep 0.05; done"
    term = Terminal([JOBCTL, "exec", "box", "--", "sh", "-c", script], cli.env)
    await term.expect(b"ready")
    term.type(b"\x03")
    await term.expect(b"got INT")
    assert await term.status() == 9
