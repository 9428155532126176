"""Interactive jobs (issue 17) against OpenSSH to localhost, measured in the same run.

(u) stdin throughput: `jobctl run -i -- sh -c 'cat > /dev/null'` fed 300 MB from a file in
    the page cache, vs `ssh host 'cat > /dev/null'` fed the same; jobctl through its
    connection keeper, as ssh through its ControlMaster connection
(v) keystroke echo under `jobctl run -it -- cat`: from writing one byte to the client's
    terminal until its echo shows there, vs `ssh -tt host cat`
(w) attach latency: from starting `jobctl attach` on a terminal to the first byte of the
    job's redraw (its SIGWINCH handler, run by the attach's resize)
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from table import Row, ms, pct

STDIN_BYTES = 300 * 1000 * 1000
KEYSTROKES = 200


def _rate(argv: list[str], source: Path, env: dict[str, str]) -> float:
    """MB/s of ``argv`` reading ``source`` on its stdin, start-up included."""
    with source.open("rb") as f:
        t0 = time.perf_counter()
        subprocess.run(argv, stdin=f, env=env, check=True, stdout=subprocess.DEVNULL)
    return source.stat().st_size / (time.perf_counter() - t0) / 1e6


class _Pty:
    """A program on a pseudo-terminal of ours."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            os.execve(argv[0], argv, env)  # noqa: S606 - the program measured

    def wait_for(self, text: bytes, deadline: float = 60.0) -> None:
        seen = b""
        end = time.monotonic() + deadline
        while text not in seen:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise RuntimeError(f"{text!r} never showed: {seen[-200:]!r}")
            try:
                seen += os.read(self.fd, 65536)
            except OSError:  # EIO: the program has exited
                raise RuntimeError(f"{text!r} never showed: {seen[-300:]!r}") from None

    def close(self) -> None:
        os.kill(self.pid, signal.SIGKILL)  # the program this benchmark started
        os.close(self.fd)
        os.waitpid(self.pid, 0)


def _echo_times(argv: list[str], env: dict[str, str]) -> list[float]:
    """Seconds from one keystroke to its echo, KEYSTROKES times (after a warm-up)."""
    term = _Pty(argv, env)
    try:
        # Both put the client's terminal in raw mode before the command's first output.
        term.wait_for(b"ready")
        samples = []
        for i in range(KEYSTROKES + 10):
            key = bytes([ord("a") + i % 26])
            t0 = time.perf_counter()
            os.write(term.fd, key)
            term.wait_for(key)
            if i >= 10:
                samples.append(time.perf_counter() - t0)
        return samples
    finally:
        term.close()


def _attach_times(jobctl: str, job: str, env: dict[str, str], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        term = _Pty([jobctl, "attach", job], env)
        try:
            term.wait_for(b"redraw")
            samples.append(time.perf_counter() - t0)
        finally:
            term.close()
    return samples


def _stop_all(jobctl: str, env: dict[str, str]) -> None:
    """Stop the jobs (v) left running: a `run -it` whose jobctl was killed is detached, and
    its job (cat) would go on after the benchmark's server. Not checked: one that ended
    meanwhile cannot be stopped, and needs not be."""
    running = subprocess.run(
        [jobctl, "ls", "-q", "-l", "bench=echo"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if running:
        subprocess.run(
            [jobctl, "stop", "--grace", "0", *running], env=env, check=False, capture_output=True
        )


def interactive_figures(
    jobctl: str, env: dict[str, str], kept: dict[str, str], ssh: list[str], work: Path
) -> list[Row]:
    """(u), (v), (w); ``kept``: ``env`` with jobctl's connection keeper on."""
    rows = []
    source = work / "stdin-source"
    with source.open("wb") as f:
        f.truncate(STDIN_BYTES)  # zeros, read from the page cache by both sides
    ours = max(
        _rate([jobctl, "run", "-i", "--", "sh", "-c", "cat > /dev/null"], source, kept)
        for _ in range(3)
    )
    theirs = max(_rate([*ssh, "cat > /dev/null"], source, env) for _ in range(3))
    rows.append(
        Row(
            f"(u) {STDIN_BYTES // 10**6} MB to a job's stdin (`run -i`) vs `ssh host cat`",
            f"{ours:,.0f} MB/s",
            f"{theirs:,.0f} MB/s",
            f"{ours / theirs:.2f}x",
            ">= ssh",
            ours >= theirs,
        )
    )
    source.unlink()
    command = ["sh", "-c", "echo ready; exec cat"]
    try:
        ours_echo = _echo_times([jobctl, "run", "-it", "-l", "bench=echo", "--", *command], env)
    finally:
        _stop_all(jobctl, env)
    theirs_echo = _echo_times(["/usr/bin/ssh", "-tt", *ssh[1:], "echo ready; exec cat"], env)
    ratio = pct(ours_echo, 0.5) / pct(theirs_echo, 0.5)
    rows.append(
        Row(
            "(v) keystroke echo under `run -it` vs `ssh -tt`, p50 / p99",
            ms(ours_echo),
            ms(theirs_echo),
            f"{ratio:.2f}x ssh's time",
            "<= 1x ssh's time",
            ratio <= 1.0,
        )
    )
    redraws = (
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
    started = subprocess.run(
        [jobctl, "start", "-q", "-it", "--", "python3", "-c", redraws],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    job = started.stdout.strip()
    # Attach only once its handler is in place (SIGWINCH is ignored until then).
    with subprocess.Popen([jobctl, "logs", "-f", job], env=env, stdout=subprocess.PIPE) as logs:
        assert logs.stdout is not None
        logs.stdout.readline()
        logs.kill()
    try:
        attach = _attach_times(jobctl, job, env, 20)
    finally:
        subprocess.run(
            [jobctl, "stop", "--grace", "0", job], env=env, check=True, capture_output=True
        )
    rows.append(
        Row(
            "(w) `jobctl attach` -> first byte of the redraw, p50 / p99",
            ms(attach),
            "-",
            "-",
            "-",
            True,
        )
    )
    return rows
