"""The connection keeper (control-persist): commands run over one kept connection, with
the same output, statuses and errors as without it, and nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import pytest_asyncio

from jobworker.api.client import pb

from ..api.conftest import Pki, serving
from .test_jobctl import JOBCTL, Cli, _pty_run, cli_env


def _keeper_pids(run_dir: Path) -> list[int]:
    pids = []
    for path in sorted((run_dir / "jobworker").glob("ctl-*.sock")):
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(path))
            except OSError:
                continue
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pids.append(int(struct.unpack("3i", creds)[0]))
    return pids


def _keeper_pid(run_dir: Path) -> int | None:
    pids = _keeper_pids(run_dir)
    return pids[0] if pids else None


async def _gone(pid: int, timeout: float) -> None:
    fd = os.pidfd_open(pid)
    try:
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, ready.set)
        try:
            await asyncio.wait_for(ready.wait(), timeout)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


@pytest.fixture
def audit() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("jobworker.audit")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest_asyncio.fixture
async def kept(tmp_path: Path, pki: Pki) -> AsyncIterator[tuple[Cli, Path]]:
    # Short: a Unix socket's path must fit in 107 bytes, and tmp_path is long.
    run_dir = Path(tempfile.mkdtemp(prefix="jw-", dir="/tmp"))
    async with serving(tmp_path, pki) as running:
        env = {
            **cli_env(running, "alice", tmp_path),
            "XDG_RUNTIME_DIR": str(run_dir),
            "JOBWORKER_CONTROL_PERSIST": "60s",
        }
        try:
            yield Cli(running, env), run_dir
        finally:
            for pid in _keeper_pids(run_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await _gone(pid, 30)
            shutil.rmtree(run_dir)


async def test_commands_run_through_one_kept_connection(
    kept: tuple[Cli, Path], audit: list[logging.LogRecord]
) -> None:
    cli, run_dir = kept
    first = await cli("run", "--", "echo", "first")
    assert (first.code, first.out, first.err) == (0, b"first\n", "")
    pid = _keeper_pid(run_dir)
    assert pid is not None
    assert (run_dir / "jobworker").stat().st_mode & 0o777 == 0o700
    start = len(audit)
    for script, status in (("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137)):
        result = await cli("run", "--", "sh", "-c", f"echo out; echo err >&2; {script}")
        assert (result.code, result.out, result.err) == (status, b"out\n", "err\n")
    listed = await cli("ls", "--all", "--json")
    assert listed.code == 0
    assert len(json.loads(listed.out)) == 4
    missing = await cli("status", "abcd1234")
    assert (missing.code, missing.err) == (1, "jobctl: no job matches 'abcd1234' (by id or name)\n")
    bad = await cli("run", "--memory", "lots", "true")
    assert bad.code == 2
    assert "not a size" in bad.err
    # Every command after the first came over the keeper's one connection.
    peers = {record.fields["peer"] for record in audit[start:]}  # type: ignore[attr-defined]
    assert len(peers) == 1
    assert _keeper_pid(run_dir) == pid


async def _imports_and_result(cli: Cli, *args: str, env: dict[str, str]) -> tuple[set[str], int]:
    """The modules jobctl's own process loaded for a command (``-X importtime``), and its
    exit status."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        JOBCTL,
        *args,
        env={**cli.env, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    loaded = {
        line.rsplit("|", 1)[1].strip()
        for line in err.decode().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return loaded, proc.returncode or 0


async def test_later_commands_hand_their_argv_over_unparsed(kept: tuple[Cli, Path]) -> None:
    """Once a keeper runs for these settings, jobctl's own process neither parses nor
    resolves anything: it loads no argparse, no config reader, no gRPC."""
    cli, run_dir = kept
    loaded, status = await _imports_and_result(cli, "ls", env={})
    assert status == 0
    assert {"argparse", "jobworker.cli._parser"} <= loaded  # the first: the full way
    links = list((run_dir / "jobworker").glob("quick-*.sock"))
    assert len(links) == 1
    assert links[0].readlink().name.startswith("ctl-")
    loaded, status = await _imports_and_result(cli, "ls", env={})
    assert status == 0
    assert not {"argparse", "typing", "jobworker.cli._parser", "grpc", "json"} & loaded
    # Help and usage errors are the front end's own, also when a keeper runs.
    usage = await cli("run", "--cpus", "-1", "true")
    assert usage.code == 2
    assert usage.err.startswith("usage: jobctl run")
    helped = await cli("ls", "--help")
    assert (helped.code, helped.out[:13]) == (0, b"usage: jobctl")


async def test_another_server_never_takes_a_keeper_for_other_settings(
    kept: tuple[Cli, Path],
) -> None:
    """A flag or a setting naming another server is never run by the keeper these settings
    made, also when a link for the new settings leads to it."""
    cli, run_dir = kept
    assert (await cli("ls")).code == 0
    keeper = _keeper_pid(run_dir)
    refused = await cli("--server", "127.0.0.1:1", "ls")
    assert (refused.code, "connection refused" in refused.err) == (1, True)
    elsewhere = {"JOBWORKER_SERVER": "127.0.0.1:1", "JOBWORKER_CONTROL_PERSIST": "no"}
    # A link for those settings leading to the keeper: it must answer "not mine".
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from jobworker.cli._quick import inputs, keeper_dir, quick_path;"
        "print(quick_path(keeper_dir(), inputs()))",
        env={**cli.env, **elsewhere},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    ctl = next((run_dir / "jobworker").glob("ctl-*.sock"))
    Path(out.decode().strip()).symlink_to(ctl.name)
    refused = await cli("ls", env=elsewhere)
    assert (refused.code, "connection refused" in refused.err) == (1, True)
    assert keeper in _keeper_pids(run_dir)


async def test_a_request_too_big_for_a_keeper_runs_in_jobctl_itself(
    kept: tuple[Cli, Path],
) -> None:
    """A keeper reads requests of up to 1 MiB (here the environment the quick way sends,
    0.6 MB, more than the socket's buffer); a bigger one (1.2 MB) is run by jobctl
    itself, not refused halfway (jobctl hung)."""
    cli, _ = kept
    assert (await cli("run", "true")).code == 0  # a keeper runs, with its link
    for count in (5, 10):
        big = {f"BIG{i}": "x" * 120_000 for i in range(count)}
        result = await cli("run", "--", "echo", "ok", env=big)
        assert (result.code, result.out, result.err) == (0, b"ok\n", "")


async def test_ctrl_c_through_the_keeper_detaches(kept: tuple[Cli, Path]) -> None:
    cli, _ = kept
    assert (await cli("run", "true")).code == 0
    screen = await _pty_run(
        cli.env,
        "run",
        "--",
        "sh",
        "-c",
        "echo started; exec sleep 600",
        until=b"started",
        then=b"\x03",
        status=130,
    )
    assert b"detached; job " in screen
    running = await cli("ls", "--json")
    assert [job["state"] for job in json.loads(running.out)] == ["running"]


async def test_a_vanished_front_end_frees_its_command(kept: tuple[Cli, Path]) -> None:
    cli, _ = kept
    job_id = (await cli("start", "-q", "--", "sh", "-c", "echo up; exec sleep 600")).text.strip()
    proc = await asyncio.create_subprocess_exec(
        JOBCTL, "logs", "-f", job_id, env=cli.env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"up\n"
    service = cli.running.server.service
    assert not service.no_streams.is_set()
    proc.kill()
    await asyncio.wait_for(proc.wait(), 30)
    await asyncio.wait_for(service.no_streams.wait(), 30)
    assert (await cli("status", job_id)).code == 0


async def test_keeper_exits_once_idle(kept: tuple[Cli, Path]) -> None:
    cli, run_dir = kept
    assert (await cli("run", "true", env={"JOBWORKER_CONTROL_PERSIST": "1s"})).code == 0
    pid = _keeper_pid(run_dir)
    assert pid is not None
    await _gone(pid, 30)
    assert list((run_dir / "jobworker").iterdir()) == []


async def test_an_unsafe_directory_means_no_keeper(kept: tuple[Cli, Path]) -> None:
    cli, run_dir = kept
    (run_dir / "jobworker").mkdir(mode=0o755)
    (run_dir / "jobworker").chmod(0o755)
    result = await cli("run", "--", "echo", "direct")
    assert (result.code, result.out) == (0, b"direct\n")
    assert list((run_dir / "jobworker").iterdir()) == []


async def test_relative_certificate_paths_work_through_the_keeper(kept: tuple[Cli, Path]) -> None:
    cli, run_dir = kept
    pki = cli.running.pki.dir
    relative = {
        "JOBWORKER_CA": "ca.pem",
        "JOBWORKER_CERT": "alice.pem",
        "JOBWORKER_KEY": "alice.key",
    }
    first = await cli("run", "--", "echo", "one", env=relative, cwd=pki)
    assert (first.code, first.out, first.err) == (0, b"one\n", "")
    assert _keeper_pid(run_dir) is not None
    second = await cli("run", "--", "echo", "two", env=relative, cwd=pki)
    assert (second.code, second.out, second.err) == (0, b"two\n", "")


async def test_an_unreadable_key_is_reported_as_without_a_keeper(kept: tuple[Cli, Path]) -> None:
    cli, run_dir = kept
    key = cli.running.pki.dir / "alice.key"
    direct = await cli("ls", env={"JOBWORKER_CONTROL_PERSIST": "no", "JOBWORKER_KEY": f"{key}.x"})
    kept_result = await cli("ls", env={"JOBWORKER_KEY": f"{key}.x"})
    assert direct.code == kept_result.code == 1
    assert kept_result.err == direct.err
    assert "cannot read the key" in direct.err
    assert _keeper_pid(run_dir) is None


async def test_a_renewed_certificate_gets_a_fresh_keeper(kept: tuple[Cli, Path]) -> None:
    cli, run_dir = kept
    assert (await cli("ls")).code == 0
    old = _keeper_pid(run_dir)
    assert old is not None
    cert = cli.running.pki.dir / "alice.pem"
    info = cert.stat()
    os.utime(cert, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    assert (await cli("ls")).code == 0
    sockets = list((run_dir / "jobworker").glob("ctl-*.sock"))
    assert len(sockets) == 2
    os.kill(old, signal.SIGKILL)
    await _gone(old, 30)


async def test_a_keeper_that_dies_mid_command_gets_one_clear_line(kept: tuple[Cli, Path]) -> None:
    """A command that is not following output (here a `stop` whose grace is under way)
    cannot go on by itself: one line says what happened and what to check."""
    cli, run_dir = kept
    script = "trap 'echo got TERM' TERM; echo ready; while :; do sleep 0.05; done"
    job = (await cli("start", "-q", "--", "sh", "-c", script)).text.strip()
    pid = _keeper_pid(run_dir)
    assert pid is not None
    proc = await asyncio.create_subprocess_exec(
        JOBCTL, "stop", "--grace", "60s", job, env=cli.env, stderr=asyncio.subprocess.PIPE
    )
    async with cli.running.client() as stub:
        request = pb.OutputRequest(id=job, follow=True)
        seen = b""
        async for reply in stub.StreamOutput(request, timeout=30):
            seen += b"".join(c.data for c in reply.chunks)
            if b"got TERM" in seen:
                break  # the keeper is in the middle of the stop
    os.kill(pid, signal.SIGKILL)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert err.decode() == (
        "jobctl: the connection keeper went away before the command ended;"
        " check with 'jobctl ls' before running it again\n"
    )


async def test_many_runs_through_the_keeper_each_notice_their_stdout_closing(
    kept: tuple[Cli, Path],
) -> None:
    """Each `run` watches its stdout from a thread of its own: with the loop's shared
    executor (six threads on this machine), six open runs left a seventh unable to notice."""
    cli, _ = kept
    assert (await cli("run", "true")).code == 0  # the keeper is up

    async def run() -> tuple[asyncio.subprocess.Process, BinaryIO]:
        read_fd, write_fd = os.pipe()
        proc = await asyncio.create_subprocess_exec(
            JOBCTL,
            "run",
            "--",
            "sh",
            "-c",
            "echo first; exec sleep 600",
            env=cli.env,
            stdout=write_fd,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(write_fd)
        reader = os.fdopen(read_fd, "rb", buffering=0)
        assert await asyncio.wait_for(asyncio.to_thread(reader.readline), 30) == b"first\n"
        return proc, reader

    held = [await run() for _ in range(8)]
    last, reader = await run()
    reader.close()
    assert await asyncio.wait_for(last.wait(), 30) == 130
    for _, reader in held:
        reader.close()
    for proc, _ in held:
        assert await asyncio.wait_for(proc.wait(), 30) == 130


async def _piped(cli: Cli, stdin: int, *args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        JOBCTL, *args, env=cli.env, stdin=stdin, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out


def _peers(records: list[logging.LogRecord]) -> set[str]:
    """The clients that made the RPCs ``records`` (audit lines) are of."""
    fields = (getattr(record, "fields", {}) for record in records)
    return {f["peer"] for f in fields if "peer" in f}


def _holds_pipe(pid: int, pipe_fd: int) -> bool:
    """Whether process ``pid`` has a descriptor of the pipe ``pipe_fd`` is an end of."""
    name = f"pipe:[{os.fstat(pipe_fd).st_ino}]"
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fds / fd) == name for fd in os.listdir(fds))


async def test_piped_input_goes_through_the_keeper_and_is_let_go_of(
    kept: tuple[Cli, Path], audit: list[logging.LogRecord], tmp_path: Path
) -> None:
    """`run -i` fed from a pipe or a file runs in the keeper, which reads the descriptor
    the front end hands it; once the command is over it holds nothing of it (its stdin
    can stay open: the keeper must not read on). A terminal stays jobctl's own."""
    cli, run_dir = kept
    assert (await cli("run", "true")).code == 0  # a keeper runs
    keeper = _keeper_pid(run_dir)
    assert keeper is not None
    start = len(audit)
    data = os.urandom(8 << 20)
    source = tmp_path / "input"
    source.write_bytes(data)
    for _ in range(2):  # the full way, then the quick way
        with source.open("rb") as f:
            code, out = await _piped(cli, f.fileno(), "run", "-i", "--", "sha256sum")
        assert (code, out.split()[0]) == (0, hashlib.sha256(data).hexdigest().encode())
    # A job that stops reading while jobctl's stdin stays open.
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x" * 1000)
        code, out = await _piped(cli, read_end, "run", "-i", "--", "head", "-c", "3")
        assert (code, out) == (0, b"xxx")
        assert not _holds_pipe(keeper, write_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert len(_peers(audit[start:])) == 1  # all over the keeper's one connection
    assert _keeper_pid(run_dir) == keeper
    # -e NAME is resolved in the front end, also with input.
    proc = await asyncio.create_subprocess_exec(
        JOBCTL,
        "run",
        "-i",
        "-e",
        "MINE",
        "--",
        "sh",
        "-c",
        'cat; echo "$MINE"',
        env={**cli.env, "MINE": "from the front end"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(b"typed\n"), 60)
    assert (proc.returncode, out) == (0, b"typed\nfrom the front end\n")
    # A terminal's input is read by jobctl itself, over a connection of its own.
    screen = await _pty_run(
        cli.env,
        "run",
        "-i",
        "--",
        "sh",
        "-c",
        "echo ready; head -c 6",
        until=b"ready",
        then=b"typed\n",
    )
    assert screen.count(b"typed") == 2  # the terminal's echo, and the job's
    assert len(_peers(audit[start:])) == 2


TICKER = (
    "import time\n"
    "for i in range(300):\n"
    "    print(f'line {i}', flush=True)\n"
    "    time.sleep(0.01)\n"
    "raise SystemExit(7)\n"
)
TICKS = b"".join(b"line %d\n" % i for i in range(300))


async def test_a_follow_goes_on_without_replay_when_the_keeper_dies(
    kept: tuple[Cli, Path],
) -> None:
    """The keeper tells the front end how far each follow has got; killed mid-follow, the
    front end follows on by itself from there: no line lost, none shown twice but the
    keeper's last few, and `run` still exits with the job's status."""
    cli, run_dir = kept
    assert (await cli("run", "true")).code == 0  # a keeper runs
    for args in (("run", "--", "python3", "-c", TICKER), ("logs", "-f", "ticker")):
        if args[0] == "logs":
            started = await cli("start", "-q", "--name", "ticker", "--", "python3", "-c", TICKER)
            assert started.code == 0
        keeper = _keeper_pid(run_dir)
        assert keeper is not None
        proc = await asyncio.create_subprocess_exec(
            JOBCTL,
            *args,
            env=cli.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        seen = b""
        while b"line 20\n" not in seen:
            seen += await asyncio.wait_for(proc.stdout.readline(), 30)
        os.kill(keeper, signal.SIGKILL)  # the keeper this test's commands started
        await _gone(keeper, 30)
        rest, err = await asyncio.wait_for(proc.communicate(), 60)
        # Nothing lost; at most what the keeper wrote but had not yet reported (its last
        # message) shows twice: it reports after writing, never before.
        shown = seen + rest
        replayed = len(shown) - len(TICKS)
        assert TICKS.endswith(rest), err
        assert shown[: len(TICKS) - len(rest)] + rest == TICKS
        assert 0 <= replayed <= 64, shown[len(seen) - 64 : len(seen) + 64]
        assert proc.returncode == (7 if args[0] == "run" else 0)
        assert err.decode() == "jobctl: the connection keeper went away; following on\n"
        # The next command starts a keeper again.
        assert (await cli("run", "true")).code == 0
