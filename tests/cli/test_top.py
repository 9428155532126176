"""jobctl top: running jobs' usage, live (a real pty) and once, from real cgroups."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from ..api.conftest import Pki, serving
from .test_jobctl import JOBCTL, Cli, cli_env
from .test_terminal import CTRL_C, Terminal

BURN = "while True: pass\n"
CLEAR = b"\x1b[H\x1b[2J"


@pytest_asyncio.fixture
async def cli(tmp_path: Path, pki: Pki) -> AsyncIterator[Cli]:
    async with serving(tmp_path, pki, runtime={"usage_interval": 0.1}) as running:
        yield Cli(running, cli_env(running, "alice", tmp_path))


async def _two_samples(cli: Cli, job: str) -> list[dict[str, object]]:
    """Samples of ``job`` from `top --json` as they come, until there are two."""
    proc = await asyncio.create_subprocess_exec(
        JOBCTL, "top", "--json", "--interval", "100ms", env=cli.env, stdout=asyncio.subprocess.PIPE
    )
    samples: list[dict[str, object]] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            while len(samples) < 2:
                line = json.loads(await proc.stdout.readline())
                if line["id"] == job:
                    samples.append(line)
    finally:
        proc.kill()
        await proc.wait()
    return samples


async def test_top_shows_cpu_memory_against_the_limit_and_pids(cli: Cli) -> None:
    burner = (
        await cli(
            "start", "-q", "--name", "burner", "--memory", "256M", "--", "python3", "-c", BURN
        )
    ).text.strip()
    idle = (await cli("start", "-q", "--", "sleep", "600")).text.strip()
    samples = await _two_samples(cli, burner)
    times = [int(str(s["time_unix_nano"])) for s in samples]
    assert times[1] > times[0]
    assert samples[1]["pids"] == 1
    once = await cli("top", "--no-stream")
    assert once.code == 0, once.err
    header, *rows = once.out.decode().splitlines()
    assert header.split()[:3] == ["ID", "NAME", "CPU"]
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == {burner[:12], idle[:12]}
    assert "/ 256.0 MiB" in by_id[burner[:12]]
    assert "no limit" not in by_id[burner[:12]]
    cpu = float(by_id[burner[:12]].split()[2].rstrip("%"))
    assert cpu > 20  # a busy loop, on a CPU of its own or shared with the tests
    assert by_id[burner[:12]].split()[-1] == "1"
    # Only the jobs asked for; --json --no-stream gives each one's recent samples.
    picked = json.loads((await cli("top", "--no-stream", "--json", "burner")).out)
    assert [p["id"] for p in picked] == [burner]
    assert picked[0]["samples"]
    assert picked[0]["samples"][-1]["pids"] == 1


async def test_top_redraws_in_place_on_a_terminal(cli: Cli) -> None:
    job = (await cli("start", "-q", "--", "sleep", "600")).text.strip()
    term = Terminal([JOBCTL, "top", "--interval", "100ms"], cli.env)
    await term.expect(job[:12].encode())
    async with asyncio.timeout(30):
        while term.screen.count(CLEAR) < 3:  # each frame drawn over the last
            assert await term.more(), "top ended by itself"
    term.type(CTRL_C)
    assert await term.status() == 130
