"""jobctl end to end: the installed console script against a real server."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import fcntl
import json
import logging
import os
import pty
import shutil
import signal
import socket
import struct
import sys
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from jobworker.api._auth import CertPool
from jobworker.api.client import pb
from jobworker.certs import issue_client, issue_server, load, make_ca, make_dev_pki, save
from jobworker.cli._client import CliError, pick
from jobworker.cli._completion import JOB_COMMANDS, script
from jobworker.cli._parser import parser
from jobworker.identity import Role, fingerprint

from ..api.conftest import Pki, Running, serving

JOBCTL = str(Path(sys.executable).parent / "jobctl")
JSON_KEYS = {
    "id",
    "name",
    "labels",
    "reason",
    "pid",
    "output_truncated",
    "timeout_seconds",
    "owner",
    "argv",
    "state",
    "exit_code",
    "signal",
    "oom_killed",
    "pids_limited",
    "error",
    "created_at",
    "started_at",
    "ended_at",
    "limits",
    "sandbox",
    "usage",
}
SANDBOX_KEYS = {"uid", "gid", "root", "seccomp", "tmp_bytes"}
USAGE_KEYS = {"cpu_seconds", "memory_bytes", "memory_peak_bytes", "io_read_bytes", "io_write_bytes"}


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()


@dataclass
class Cli:
    running: Running
    env: dict[str, str]

    async def __call__(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Result:
        proc = await asyncio.create_subprocess_exec(
            JOBCTL,
            *args,
            env={**self.env, **(env or {})},
            cwd=cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return Result(proc.returncode or 0, out, err.decode())


def cli_env(running: Running, user: str, home: Path) -> dict[str, str]:
    d = running.pki.dir
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "JOBWORKER_SERVER": f"127.0.0.1:{running.port}",
        "JOBWORKER_CA": str(d / "ca.pem"),
        "JOBWORKER_CERT": str(d / f"{user}.pem"),
        "JOBWORKER_KEY": str(d / f"{user}.key"),
    }


@pytest_asyncio.fixture
async def cli(tmp_path: Path, pki: Pki) -> AsyncIterator[Cli]:
    async with serving(tmp_path, pki) as running:
        yield Cli(running, cli_env(running, "alice", tmp_path))


@pytest.mark.parametrize(("script", "status"), [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137)])
async def test_run_propagates_the_job_status(cli: Cli, script: str, status: int) -> None:
    result = await cli("run", "--", "sh", "-c", f"echo out; echo err >&2; {script}")
    assert result.code == status
    assert result.out == b"out\n"
    assert result.err == "err\n"


async def test_run_is_one_call(cli: Cli) -> None:
    """`jobctl run` starts, follows and gets the end of its job in one RunJob: no
    CreateJob, StreamOutput or WaitJob round trip after it."""
    calls: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            calls.append(record.fields["rpc"])  # type: ignore[attr-defined]

    audit = logging.getLogger("jobworker.audit")
    handler, level = Keep(), audit.level
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        result = await cli("run", "--", "sh", "-c", "echo out; exit 4")
    finally:
        audit.removeHandler(handler)
        audit.setLevel(level)
    assert (result.code, result.out) == (4, b"out\n")
    assert calls == ["RunJob"]


async def test_run_of_a_missing_command_exits_127(cli: Cli) -> None:
    result = await cli("run", "no-such-command")
    assert result.code == 127
    assert "not found" in result.err


async def test_start_status_logs_stop_wait(cli: Cli) -> None:
    start = await cli(
        "start",
        "-q",
        "--memory",
        "64M",
        "--cpus",
        "0.5",
        "--",
        "sh",
        "-c",
        "echo a; echo b >&2; exec sleep 600",
    )
    assert start.code == 0
    job_id = start.text.strip()
    assert len(job_id) == 36
    status = await cli("status", job_id[:8], "--json")
    data = json.loads(status.text)
    assert set(data) == JSON_KEYS
    assert set(data["usage"]) == USAGE_KEYS
    # A listing reads no cgroup: a running job's usage there is unknown, shown as null.
    listed = json.loads((await cli("ls", "--json")).text)
    assert [j["usage"] for j in listed if j["id"] == job_id] == [None]
    assert set(data["sandbox"]) == SANDBOX_KEYS
    assert data["sandbox"]["root"] == "host, read-only"
    assert data["sandbox"]["seccomp"] is True
    assert data["state"] == "running"
    assert data["limits"]["memory_bytes"] == 64 << 20
    assert data["created_at"].endswith("Z")
    logs = await cli("logs", job_id[:6], "--stdout")
    assert logs.out == b"a\n"
    stop = await cli("stop", "--grace", "2s", job_id[:10])
    assert stop.code == 0
    again = await cli("stop", job_id)
    assert again.code == 1
    assert "already stopped" in again.err
    waited = await cli("wait", job_id)
    assert waited.code == 128 + signal.SIGTERM
    both = await cli("logs", "-f", "--timestamps", job_id)
    lines = both.out.decode().splitlines() + both.err.splitlines()
    assert sorted(line.split(" ", 1)[1] for line in lines) == ["a", "b"]
    assert all(line[:4].isdigit() and "T" in line.split(" ", 1)[0] for line in lines)


async def test_start_json_and_ls(cli: Cli) -> None:
    started = await cli("start", "--json", "--", "sleep", "600")
    job = json.loads(started.text)
    assert job["state"] == "running"
    done = json.loads((await cli("start", "--json", "true")).text)
    await cli("wait", done["id"])
    running = json.loads((await cli("ls", "--json")).text)
    assert [j["id"] for j in running] == [job["id"]]
    everything = json.loads((await cli("ls", "--all", "--json")).text)
    assert {j["id"] for j in everything} == {job["id"], done["id"]}
    exited = json.loads((await cli("ls", "--state", "exited", "--json")).text)
    assert [j["id"] for j in exited] == [done["id"]]
    table = await cli("ls", "-a")
    assert "STATE" in table.text
    assert job["id"][:12] in table.text
    assert "\x1b[" not in table.text  # no color into a pipe
    kill = await cli("kill", "-s", "TERM", job["id"][:8])
    assert kill.code == 0
    assert (await cli("wait", job["id"])).code == 128 + signal.SIGTERM


async def test_kill_by_number_and_bad_signal(cli: Cli) -> None:
    job = (await cli("start", "-q", "sleep", "600")).text.strip()
    assert (await cli("kill", "-s", "hup", job)).code == 0
    assert (await cli("wait", job)).code == 128 + signal.SIGHUP
    bad = await cli("kill", "-s", "NOPE", job)
    assert bad.code == 2
    assert "unknown signal" in bad.err


async def test_errors_are_one_clear_line(cli: Cli, tmp_path: Path) -> None:
    unknown = await cli("status", "00000000-0000-4000-8000-000000000000")
    assert (unknown.code, unknown.err.count("\n")) == (1, 1)
    assert "no such job" in unknown.err
    short = await cli("status", "abc")
    assert "at least 4 characters" in short.err
    refused = await cli("ls", env={"JOBWORKER_SERVER": "127.0.0.1:1"})
    assert refused.code == 1
    assert "connection refused; is jobworkerd running there?" in refused.err
    missing = await cli("ls", env={"JOBWORKER_KEY": str(tmp_path / "nope.key")})
    assert missing.code == 1
    assert "cannot read the key" in missing.err
    for result in (unknown, short, refused, missing):
        assert "Traceback" not in result.err
        assert result.err.startswith("jobctl: ")


async def test_bad_values_are_a_usage_line_and_exit_2(cli: Cli) -> None:
    """A malformed value names the flag and the fix, after the command's own usage line."""
    for args, words in (
        (("run", "--memory", "10X", "true"), "argument --memory: size '10X' is not a size"),
        (("run", "-e", "=x", "true"), "argument --env/-e: '=x' is not NAME=VALUE or NAME"),
        (("run", "--label", "novalue", "true"), "'novalue' is not KEY=VALUE"),
        (("start", "--timeout", "soon", "true"), "duration 'soon' is not a duration"),
        (("logs", "--tail", "-3", "x"), "'-3' is not a whole number of at least 0"),
        (("ls", "--bogus"), "unrecognized arguments: --bogus"),
    ):
        result = await cli(*args)
        assert result.code == 2, (args, result.err)
        lines = result.err.splitlines()
        usage, error = lines[0], lines[-1]
        # The subcommand's usage, not the top level's.
        assert usage.startswith(f"usage: jobctl {args[0]} "), usage
        assert error.startswith(f"jobctl {args[0]}: error: "), error
        assert words in error, error
        assert result.out == b""


async def test_bad_limit_values_are_usage_errors(cli: Cli) -> None:
    """A limit that is not a positive number is a usage line and exit 2 (``--pids -5``
    printed a traceback)."""
    for flag, value in (("--pids", "-5"), ("--pids", "lots"), ("--cpus", "-1"), ("--cpus", "nan")):
        result = await cli("run", flag, value, "--", "true")
        assert result.code == 2, (flag, value, result.err)
        assert f"argument {flag}: '{value}' is not" in result.err
        assert "Traceback" not in result.err


async def test_certificate_from_another_ca_is_explained(cli: Cli, pki: Pki) -> None:
    save(issue_client(make_ca("other"), "alice"), pki.dir / "stranger")
    result = await cli(
        "ls",
        env={
            "JOBWORKER_CERT": str(pki.dir / "stranger.pem"),
            "JOBWORKER_KEY": str(pki.dir / "stranger.key"),
        },
    )
    assert result.code == 1
    assert "TLS handshake" in result.err
    assert "not expired and not revoked" in result.err


async def test_config_file_contexts(cli: Cli, tmp_path: Path) -> None:
    env = dict(cli.env)
    config = tmp_path / ".config" / "jobworker" / "config.toml"
    config.parent.mkdir(parents=True)
    d = cli.running.pki.dir
    config.write_text(
        'current-context = "local"\n'
        f'[contexts.local]\nserver = "127.0.0.1:{cli.running.port}"\n'
        f'ca = "{d}/ca.pem"\ncert = "{d}/bob.pem"\nkey = "{d}/bob.key"\n'
        '[contexts.down]\nserver = "127.0.0.1:1"\n'
        f'ca = "{d}/ca.pem"\ncert = "{d}/bob.pem"\nkey = "{d}/bob.key"\n'
        # Relative to the config file's directory, wherever jobctl runs.
        f'[contexts.near]\nserver = "127.0.0.1:{cli.running.port}"\n'
        'ca = "near/ca.pem"\ncert = "near/bob.pem"\nkey = "near/bob.key"\n'
    )
    (config.parent / "near").mkdir()
    for name in ("ca.pem", "bob.pem", "bob.key"):
        shutil.copy(d / name, config.parent / "near" / name)
    for key in ("JOBWORKER_SERVER", "JOBWORKER_CA", "JOBWORKER_CERT", "JOBWORKER_KEY"):
        env.pop(key)
    fresh = Cli(cli.running, env)
    job = json.loads((await fresh("start", "--json", "true")).text)
    assert job["owner"] == "bob"
    near = await fresh("--context", "near", "ls", "--all", "--json", cwd=tmp_path)
    assert [j["id"] for j in json.loads(near.out)] == [job["id"]]
    down = await fresh("--context", "down", "ls")
    assert "connection refused" in down.err
    missing = await fresh("--context", "nope", "ls")
    assert missing.code == 2
    assert "no context 'nope'" in missing.err


async def test_completion_scripts(cli: Cli) -> None:
    for shell in ("bash", "zsh", "fish"):
        result = await cli("completion", shell)
        assert result.code == 0
        assert result.text == script(shell)
        assert "jobctl __jobs" in result.text
        # Every flag of every command is offered (a new flag cannot be forgotten).
        found = next(a for a in parser()._actions if a.dest == "command").choices  # noqa: SLF001 - walking argparse's parsers
        assert isinstance(found, dict)
        commands: dict[str, argparse.ArgumentParser] = found
        for name, sub in commands.items():
            if name.startswith("__"):
                continue
            assert name in result.text
            for action in sub._actions:  # noqa: SLF001 - as above
                for flag in action.option_strings:
                    assert flag.lstrip("-") in result.text, (shell, name, flag)
    assert set(JOB_COMMANDS) <= set(commands)


def test_prefix_and_name_resolution() -> None:
    jobs = [
        pb.Job(id="abcd1111-0000", owner="a", name="web"),
        pb.Job(id="abcd2222-0000", owner="a", name="abcd1111"),
        pb.Job(id="ef001111-0000", owner="a"),
        pb.Job(id="77001111-0000", owner="b", name="db"),
        pb.Job(id="88001111-0000", owner="c", name="db"),
    ]
    assert pick("ef00", jobs) == "ef001111-0000"
    assert pick("abcd1", jobs) == "abcd1111-0000"
    assert pick("web", jobs) == "abcd1111-0000"
    # An id prefix and a name both match: the id wins, as the docs say.
    assert pick("abcd1111", jobs) == "abcd1111-0000"
    with pytest.raises(CliError, match="ambiguous"):
        pick("abcd", jobs)
    with pytest.raises(CliError, match="no job matches"):
        pick("9999", jobs)
    with pytest.raises(CliError, match="all named 'db'"):
        pick("db", jobs)
    with pytest.raises(CliError, match="no job is named 'x'"):
        pick("x", jobs)


async def _pty_run(
    env: dict[str, str],
    *args: str,
    until: bytes,
    then: bytes | None,
    status: int = 0,
    columns: int = 80,
) -> bytes:
    """Run jobctl on a real terminal ``columns`` wide; once ``until`` shows, type ``then``;
    return the screen."""
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        os.execve(JOBCTL, [JOBCTL, *args], env)  # noqa: S606 - the CLI under test
    screen = b""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            sent = then is None
            while True:
                ready = asyncio.Event()
                loop.add_reader(fd, ready.set)
                try:
                    await ready.wait()
                finally:
                    loop.remove_reader(fd)
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                screen += data
                if not sent and until in screen and then is not None:
                    os.write(fd, then)
                    sent = True
    finally:
        os.close(fd)
        _, exit_status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(exit_status) == status, screen
    return screen


async def test_first_ctrl_c_detaches_and_the_job_keeps_running(cli: Cli) -> None:
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
    job_id = json.loads((await cli("ls", "--json")).text)[0]["id"]
    assert f"detached; job {job_id} keeps running (jobctl logs -f {job_id[:12]})".encode() in screen
    jobs = json.loads((await cli("ls", "--json")).text)
    assert [j["state"] for j in jobs] == ["running"]


async def test_color_only_on_a_terminal_and_no_color_honoured(cli: Cli) -> None:
    await cli("start", "-q", "sleep", "600")
    green = b"\x1b[32m"  # "running" is green on a terminal
    colored = await _pty_run(cli.env, "ls", until=b"", then=None)
    assert green in colored
    # NO_COLOR: no escape sequence at all, bold included.
    plain = await _pty_run({**cli.env, "NO_COLOR": "1"}, "ls", until=b"", then=None)
    assert b"\x1b" not in plain
    assert b"running" in plain


async def test_run_flags_reach_the_job(cli: Cli, public_dir: Path) -> None:
    result = await cli(
        "run",
        "--env",
        "GREETING=hi there",
        "--workdir",
        str(public_dir),
        "--pids",
        "50",
        "--cpus",
        "1",
        "--memory",
        "128M",
        "--io-write-bps",
        "10M",
        "--",
        "sh",
        "-c",
        'echo "$GREETING"; pwd',
    )
    assert result.code == 0, result.err
    assert result.out == f"hi there\n{public_dir}\n".encode()
    listed = json.loads((await cli("ls", "-a", "--json")).text)
    limits = listed[0]["limits"]
    assert (limits["pids"], limits["memory_bytes"], limits["cpus"]) == (50, 128 << 20, 1.0)
    assert limits["io"][0]["write_bps"] == 10 << 20
    assert limits["io"][0]["device"]  # the working directory's disk, resolved by the server


async def test_host_network_is_refused_unless_allowed(cli: Cli) -> None:
    result = await cli("run", "--network", "host", "true")
    assert result.code == 125  # a refused request: jobctl's failure, not the job's
    assert "may not use the host network" in result.err


async def test_start_follow_and_logs_stderr(cli: Cli) -> None:
    result = await cli("start", "-f", "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (result.code, result.out, result.err) == (4, b"out\n", "err\n")
    job = json.loads((await cli("ls", "-a", "--json")).text)[0]["id"]
    only_err = await cli("logs", "--stderr", job)
    assert (only_err.out, only_err.err) == (b"", "err\n")


async def test_wait_and_stop_take_several_jobs(cli: Cli) -> None:
    a = (await cli("start", "-q", "sleep", "600")).text.strip()
    b = (await cli("start", "-q", "sleep", "600")).text.strip()
    stopped = await cli("stop", "--grace", "1s", a, b)
    assert stopped.text.split() == [a, b]
    assert (await cli("wait", a, b)).code == 128 + signal.SIGTERM


async def test_rm_deletes_ended_jobs_and_refuses_running_ones(cli: Cli) -> None:
    done = (await cli("start", "-q", "echo", "hi")).text.strip()
    await cli("wait", done)
    running = (await cli("start", "-q", "sleep", "600")).text.strip()
    removed = await cli("rm", done[:8])
    assert removed.text.strip() == done
    refused = await cli("rm", running)
    assert refused.code == 1
    assert refused.err.count("\n") == 1
    assert "is running; stop it first" in refused.err
    gone = await cli("logs", done)
    assert gone.code == 1
    assert "no such job" in gone.err
    await cli("stop", "--grace", "0s", running)


async def test_ctrl_c_with_rm_stops_drains_and_deletes_the_job(cli: Cli) -> None:
    """The job's last words (its TERM handler's) reach the screen before it is deleted,
    and the interrupted run exits 130 even though the job itself exits 0."""
    screen = await _pty_run(
        cli.env,
        "run",
        "--rm",
        "--",
        "sh",
        "-c",
        "trap 'echo goodbye; exit 0' TERM; echo started; sleep 600 & wait",
        until=b"started",
        then=b"\x03",
        status=130,
    )
    assert b"stopping job" in screen
    assert b"goodbye" in screen
    assert json.loads((await cli("ls", "-a", "--json")).text) == []


async def test_cli_imports_no_grpc_until_a_command_needs_it() -> None:
    # What every command loads before running itself or handing over to a keeper.
    code = (
        "import sys, jobworker.cli.__main__ as m, jobworker.cli._config, "
        "jobworker.cli._control, jobworker.cli._parser as p; p.parse(['ls']);"
        "heavy = [x for x in ('grpc', 'google.protobuf', 'rich', 'cryptography', 'asyncio', "
        "'ssl', 'tomllib', 'dataclasses', 'subprocess') "
        "if x in sys.modules]; print(heavy)"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert out == b"[]\n"


async def test_more_connection_errors(cli: Cli, pki: Pki) -> None:
    dns = await cli("ls", env={"JOBWORKER_SERVER": "no-such-host.invalid:50051"})
    assert dns.code == 1
    assert "cannot resolve the server name" in dns.err
    # A listener that accepts and never answers: the handshake cannot finish in time.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        port = silent.getsockname()[1]
        slow = await cli(
            "--request-timeout", "1s", "ls", env={"JOBWORKER_SERVER": f"127.0.0.1:{port}"}
        )
    finally:
        silent.close()
    assert slow.code == 1
    assert "did not answer within 1 s" in slow.err
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    save(issue_client(pki.ca, "alice", days=30, now=past), pki.dir / "expired")
    expired = await cli(
        "ls",
        env={
            "JOBWORKER_CERT": str(pki.dir / "expired.pem"),
            "JOBWORKER_KEY": str(pki.dir / "expired.key"),
        },
    )
    assert expired.code == 1
    assert f"your certificate {pki.dir / 'expired.pem'} expired on" in expired.err


async def test_revoked_certificate_is_explained(tmp_path: Path, pki: Pki) -> None:
    revoked = tmp_path / "revoked.txt"
    alice = x509.load_pem_x509_certificate((pki.dir / "alice.pem").read_bytes())
    revoked.write_text(fingerprint(alice) + "\n")
    async with serving(tmp_path, pki, pool=CertPool(None, revoked)) as running:
        result = await Cli(running, cli_env(running, "alice", tmp_path))("ls")
    assert result.code == 1
    assert "the server rejected your certificate" in result.err
    assert "revoked" in result.err


async def test_global_flags_owner_filter_and_human_status(cli: Cli, tmp_path: Path) -> None:
    d = cli.running.pki.dir
    admin = [
        "--server",
        f"127.0.0.1:{cli.running.port}",
        "--ca",
        str(d / "ca.pem"),
        "--cert",
        str(d / "admin.pem"),
        "--key",
        str(d / "admin.key"),
    ]
    job = (await cli("start", "-q", "sleep", "600")).text.strip()
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    mine = await cli(*admin, "ls", "--json", env=bare)
    assert mine.code == 0, mine.err
    assert [j["owner"] for j in json.loads(mine.text)] == ["alice"]  # admins see everyone's
    assert json.loads((await cli(*admin, "ls", "--owner", "bob", "--json")).text) == []
    human = await cli("status", job[:8])
    assert f"id       {job}" in human.text
    assert "state    running" in human.text


async def test_terminal_sequences_in_argv_are_escaped_in_human_output(cli: Cli) -> None:
    """An argv that carries a terminal control sequence (here: set the window title) is
    shown escaped by ls and status; --json keeps it exact."""
    hostile = "\x1b]0;pwned\x07[red]x"
    start = await cli("start", "-q", "--", "echo", hostile)
    assert start.code == 0
    job_id = start.text.strip()
    listed = await cli("ls", "-a")
    status = await cli("status", job_id)
    exact = json.loads((await cli("status", job_id, "--json")).text)
    for shown in (listed.text, status.text):
        assert "\x1b" not in shown
        assert "\x07" not in shown
        assert "\\x1b]0;pwned\\x07[red]x" in shown
    assert exact["argv"] == ["echo", hostile]


async def test_a_tls_failure_is_one_line_without_grpc_core_noise(cli: Cli, tmp_path: Path) -> None:
    """A client certificate from another CA: jobctl's own line, and nothing of gRPC core's
    (its "E1201 ... ssl_transport_security.cc" lines) on stderr."""
    other = make_dev_pki(tmp_path / "other", {"alice": Role.USER})
    env = {"JOBWORKER_CERT": str(other / "alice.pem"), "JOBWORKER_KEY": str(other / "alice.key")}
    result = await cli("ls", env=env)
    assert result.code == 1
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("jobctl: ")
    assert ".cc:" not in result.err


async def test_tls_failures_are_diagnosed_not_guessed(cli: Cli, tmp_path: Path) -> None:
    """A wrong key, an expired certificate and a server from another CA each get their own
    line, found by looking at the files and at what the server presents."""
    d = cli.running.pki.dir
    wrong_key = await cli("ls", env={"JOBWORKER_KEY": str(d / "bob.key")})
    assert wrong_key.code == 1
    assert f"the key {d / 'bob.key'} is not the key of your certificate" in wrong_key.err

    ca = load(d / "ca")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    save(issue_client(ca, "alice", days=1, now=past), d / "stale")
    expired = await cli(
        "ls", env={"JOBWORKER_CERT": str(d / "stale.pem"), "JOBWORKER_KEY": str(d / "stale.key")}
    )
    assert expired.code == 1
    assert f"your certificate {d / 'stale.pem'} expired on" in expired.err

    other = make_dev_pki(tmp_path / "other", {"alice": Role.USER})
    foreign = await cli("ls", env={"JOBWORKER_CA": str(other / "ca.pem")})
    assert foreign.code == 1
    assert f"the server's certificate is not signed by the CA in {other / 'ca.pem'}" in foreign.err


async def test_a_server_name_missing_from_its_certificate_is_named(
    tmp_path: Path, pki: Pki
) -> None:
    for name in ("server.pem", "server.key"):
        (pki.dir / name).unlink()
    save(issue_server(load(pki.dir / "ca"), ["example.internal"], []), pki.dir / "server")
    async with serving(tmp_path, pki) as running:
        result = await Cli(running, cli_env(running, "alice", tmp_path))("ls")
    assert result.code == 1
    assert "the server's certificate does not name 127.0.0.1 (it names example.internal)" in (
        result.err
    )
