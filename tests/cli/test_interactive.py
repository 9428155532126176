"""jobctl run -i, start -i and attach: jobctl's stdin to a job, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from ..api.conftest import Pki, serving
from .test_jobctl import JOBCTL, Cli, cli_env


@pytest_asyncio.fixture
async def cli(tmp_path: Path, pki: Pki) -> AsyncIterator[Cli]:
    async with serving(tmp_path, pki) as running:
        yield Cli(running, cli_env(running, "alice", tmp_path))


async def _jobctl(cli: Cli, *args: str, stdin: bytes | int) -> tuple[int, bytes, bytes]:
    """jobctl with ``stdin`` (bytes through a pipe, or a descriptor); status, out, err."""
    proc = await asyncio.create_subprocess_exec(
        JOBCTL,
        *args,
        env=cli.env,
        stdin=asyncio.subprocess.PIPE if isinstance(stdin, bytes) else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin if isinstance(stdin, bytes) else None), 120
    )
    return proc.returncode or 0, out, err


async def test_piped_input_reaches_the_job(cli: Cli) -> None:
    assert await _jobctl(cli, "run", "-i", "--", "cat", stdin=b"hello\n") == (0, b"hello\n", b"")
    # EOF is passed on: wc sees an empty stdin.
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        assert (await _jobctl(cli, "run", "-i", "wc", "-c", stdin=devnull))[1] == b"0\n"
    finally:
        os.close(devnull)
    # Without -i the job's stdin is /dev/null, whatever jobctl's is.
    assert (await _jobctl(cli, "run", "--", "cat", stdin=b"ignored\n"))[1] == b""


async def test_100_mb_of_random_stdin_arrives_byte_exact(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "random"
    data.write_bytes(os.urandom(100 << 20))
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    fd = os.open(data, os.O_RDONLY)
    try:
        status, out, err = await _jobctl(cli, "run", "-i", "--", "sha256sum", stdin=fd)
    finally:
        os.close(fd)
    assert (status, out) == (0, f"{expected}  -\n".encode()), err


async def test_start_i_then_attach_sends_input_and_exits_with_the_job(cli: Cli) -> None:
    script = 'while read line; do echo "got $line"; done; exit 4'
    await cli("start", "-q", "-i", "--name", "reader", "--", "sh", "-c", script)
    status, out, err = await _jobctl(cli, "attach", "reader", stdin=b"one\ntwo\n")
    assert (status, out) == (4, b"got one\ngot two\n"), err
    # Watching only, after the end: no new output, and the job's status.
    assert await _jobctl(cli, "attach", "--no-stdin", "reader", stdin=b"x") == (4, b"", b"")


async def test_attach_to_a_job_without_stdin_is_one_clear_line(cli: Cli) -> None:
    job = (await cli("start", "-q", "--", "sleep", "600")).text.strip()
    status, _, err = await _jobctl(cli, "attach", job, stdin=b"x")
    assert status == 1
    assert err.decode().count("\n") == 1
    assert "reads no input (it was started with stdin none)" in err.decode()


async def test_a_job_that_stops_reading_ends_the_run_cleanly(cli: Cli) -> None:
    """`yes | jobctl run -i -- head -1`: the job ends while input keeps coming; the rest is
    dropped and jobctl exits with the job's status, not a transport error."""
    read_fd, write_fd = os.pipe()
    producer = await asyncio.create_subprocess_exec("yes", stdout=write_fd)
    os.close(write_fd)
    try:
        result = await _jobctl(cli, "run", "-i", "--", "head", "-1", stdin=read_fd)
        assert result == (0, b"y\n", b"")
    finally:
        os.close(read_fd)
        producer.kill()
        await producer.wait()


async def test_a_job_that_ends_before_it_is_joined_still_shows_its_output(cli: Cli) -> None:
    # Often over before jobctl attaches: its output and status, not "reads no more input".
    for _ in range(3):
        assert await _jobctl(cli, "run", "-i", "--", "echo", "quick", stdin=b"") == (
            0,
            b"quick\n",
            b"",
        )
