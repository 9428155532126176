"""jobctl run -it and attach with a terminal job, driven through a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import signal
import struct
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from ..api.conftest import Pki, serving
from .test_jobctl import JOBCTL, Cli, cli_env

CTRL_C, DETACH = b"\x03", b"\x10\x11"


class Terminal:
    """A program on a real pseudo-terminal of ours: type to it, wait for what it shows."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 24, cols: int = 80):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execve(argv[0], argv, env)  # noqa: S606 - the program under test
        self.screen = b""

    async def more(self) -> bytes:
        """What it shows next; b"" once it has closed the terminal."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fd, ready.set)
        try:
            await ready.wait()
        finally:
            loop.remove_reader(self.fd)
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every other end is closed
            return b""
        self.screen += data
        return data

    async def expect(self, text: bytes) -> bytes:
        """Read until ``text`` has been shown; the screen so far."""
        async with asyncio.timeout(30):
            while text not in self.screen:
                if not await self.more():
                    raise AssertionError(f"{text!r} never showed: {self.screen!r}")
        return self.screen

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def resize(self, rows: int, cols: int) -> None:
        # The kernel sends SIGWINCH to the terminal's foreground process: jobctl.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def status(self) -> int:
        """Its exit status, reading the rest of what it shows meanwhile."""
        async with asyncio.timeout(30):
            while await self.more():
                pass
        os.close(self.fd)
        _, status = await asyncio.to_thread(os.waitpid, self.pid, 0)
        return os.waitstatus_to_exitcode(status)


@pytest_asyncio.fixture
async def cli(tmp_path: Path, pki: Pki) -> AsyncIterator[Cli]:
    async with serving(tmp_path, pki) as running:
        yield Cli(running, cli_env(running, "alice", tmp_path))


async def test_run_it_gives_a_shell_its_own_terminal(cli: Cli) -> None:
    term = Terminal([JOBCTL, "run", "-it", "--", "sh"], cli.env, rows=33, cols=101)
    await term.expect(b"$ ")
    # The marker is quoted so that the echo of the typed line does not show it.
    term.type(b"tty; stty size; echo $TERM; echo EN''D\r")
    screen = await term.expect(b"END")
    term.type(b"exit 5\r")
    assert await term.status() == 5
    assert b"/dev/pts/0" in screen  # a device of the job's own devpts
    assert b"33 101" in screen  # the client's window
    assert b"xterm" in screen or cli.env.get("TERM", "").encode() in screen


async def test_ctrl_c_and_a_resize_reach_the_job(cli: Cli) -> None:
    script = (
        "trap 'stty size' WINCH; trap 'echo got INT; exit 7' INT; echo ready; "
        "while :; do sleep 0.05; done"
    )
    term = Terminal([JOBCTL, "run", "-it", "--", "sh", "-c", script], cli.env)
    await term.expect(b"ready")
    term.resize(40, 120)
    await term.expect(b"40 120")
    term.type(CTRL_C)
    await term.expect(b"got INT")
    assert await term.status() == 7


async def test_detach_keys_leave_the_job_running_and_attach_goes_on(cli: Cli) -> None:
    script = 'while read line; do echo "got $line"; done'
    term = Terminal([JOBCTL, "run", "-it", "--name", "sh1", "--", "sh", "-c", script], cli.env)
    term.type(b"one\r")
    await term.expect(b"got one")
    term.type(DETACH)
    assert await term.status() == 130
    assert b"detached; job " in term.screen
    jobs = json.loads((await cli("ls", "--json")).text)
    assert [j["state"] for j in jobs] == ["running"]
    again = Terminal([JOBCTL, "attach", "sh1"], cli.env)
    again.type(b"two\r")
    await again.expect(b"got two")
    again.type(b"\x04")  # Ctrl+D: EOF for read, as on any terminal
    assert await again.status() == 0


async def test_the_terminal_is_put_back_however_jobctl_ends(cli: Cli) -> None:
    """stty settings before and after are identical: after the job's exit, and after
    jobctl is killed by SIGTERM while the terminal is raw."""
    helper = (
        "import os, signal, subprocess, sys, termios\n"
        "before = termios.tcgetattr(0)\n"
        "proc = subprocess.Popen(sys.argv[1:])\n"
        "print('PID', proc.pid, flush=True)\n"
        "code = proc.wait()\n"
        "print('SAME' if termios.tcgetattr(0) == before else 'CHANGED', code, flush=True)\n"
    )
    argv = [sys.executable, "-c", helper, JOBCTL, "run", "-it", "--", "sh", "-c"]
    term = Terminal([*argv, "echo ready; exit 3"], cli.env)
    await term.expect(b"ready")
    await term.status()
    assert b"SAME 3" in term.screen
    term = Terminal([*argv, "echo ready; exec sleep 600"], cli.env)
    screen = await term.expect(b"ready")
    jobctl = int(screen.split(b"PID ")[1].split()[0])
    os.kill(jobctl, signal.SIGTERM)  # a process this test started, through its helper
    await term.status()
    assert b"SAME 130" in term.screen


async def test_t_without_a_terminal_is_one_clear_line(cli: Cli) -> None:
    result = await cli("run", "-it", "--", "sh")
    assert (result.code, result.err.count("\n")) == (2, 1)
    assert "the input device is not a TTY" in result.err


async def test_attach_makes_the_program_redraw(cli: Cli) -> None:
    """As docker's attach: the terminal is resized on attach, so a program that redraws on
    SIGWINCH shows its current screen to the newcomer."""
    code = (
        "import signal\n"
        # As a real program does: the handler sets a flag, the loop redraws (printing in the
        # handler raised "reentrant call" when the attach's two resizes came together).
        "resized = []\n"
        "signal.signal(signal.SIGWINCH, lambda *_: resized.append(1))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    signal.pause()\n"
        "    if resized:\n"
        "        resized.clear()\n"
        "        print('redraw', flush=True)\n"
    )
    job = (await cli("start", "-q", "-it", "--", "python3", "-c", code)).text.strip()
    ready = Terminal([JOBCTL, "logs", "-f", job], cli.env)
    await ready.expect(b"ready")  # its handler is in place
    os.kill(ready.pid, signal.SIGKILL)  # a process this test started
    await ready.status()
    term = Terminal([JOBCTL, "attach", job], cli.env)
    await term.expect(b"redraw")
    term.type(DETACH)
    assert await term.status() == 130
