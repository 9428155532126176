"""jobctl for daily use, end to end through the console script: names, labels, timeouts, log
windows, events, versions, environment, the exit-code table, and the small behaviours a
script relies on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jobworker import __version__

from ..api.conftest import Pki, serving
from .test_jobctl import JOBCTL, Cli, _pty_run, cli_env


@pytest_asyncio.fixture
async def cli(tmp_path: Path, pki: Pki) -> AsyncIterator[Cli]:
    async with serving(tmp_path, pki) as running:
        yield Cli(running, cli_env(running, "alice", tmp_path))


async def _json(cli: Cli, *args: str) -> Any:
    result = await cli(*args)
    assert result.code == 0, result.err
    return json.loads(result.out)


# ------------------------------------------------------------------ exit codes, row by row
@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("run", "true"), 0),
        (("run", "--", "sh", "-c", "exit 7"), 7),
        (("run", "--", "sh", "-c", "kill -TERM $$"), 128 + signal.SIGTERM),
        (("run", "no-such-command"), 127),
        (("run", "/etc/hostname"), 126),  # exists, not executable
        (("run", "-w", "/tmp/none", "true"), 126),  # the working directory is missing
        (("run", "--network", "host", "true"), 125),  # a refused request
        (("run", "--server", "127.0.0.1:1", "true"), 125),  # no server there
        (("run", "--memory", "lots", "true"), 2),  # bad usage
    ],
)
async def test_run_exit_status_table(cli: Cli, args: tuple[str, ...], status: int) -> None:
    result = await cli(*args)
    assert result.code == status, result.err
    assert "Traceback" not in result.err


async def test_wait_exit_status_table_and_confirmation(cli: Cli) -> None:
    ok = (await cli("start", "-q", "true")).text.strip()
    bad = (await cli("start", "-q", "--", "sh", "-c", "exit 4")).text.strip()
    failed = await cli("start", "-q", "no-such-command")
    assert failed.code == 127  # start says so too, and prints the id of the failed job
    missing = failed.text.strip()
    assert (await cli("wait", ok)).out == b"exited 0\n"
    assert (await cli("wait", bad)).code == 4
    assert (await cli("wait", missing)).code == 127
    both = await cli("wait", ok[:8], bad[:8])
    assert (both.code, both.out) == (4, f"{ok[:8]}: exited 0\n{bad[:8]}: exited 4\n".encode())
    unknown = await cli("wait", "00000000-0000-4000-8000-000000000000")
    assert unknown.code == 125
    waited = await cli("wait", "--json", bad)
    assert waited.code == 4
    data = json.loads(waited.out)
    assert (data["state"], data["exit_code"]) == ("exited", 4)


async def test_help_documents_the_exit_status_table(cli: Cli) -> None:
    text = (await cli("--help")).text
    for row in ("125", "126", "127", "130", "128+N"):
        assert row in text
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for row in ("125", "126", "127", "130"):
        assert f"| {row} " in readme


# ------------------------------------------------------------------ names and labels
async def test_names_work_wherever_an_id_does(cli: Cli) -> None:
    started = await cli("start", "-q", "--name", "web", "--", "sh", "-c", "echo hi; sleep 600")
    assert started.code == 0, started.err
    job_id = started.text.strip()
    again = await cli("start", "--name", "web", "true")
    assert again.code == 1
    assert again.err == (
        f"jobctl: alice already has a job named 'web' ({job_id[:12]}); choose another name, "
        "or remove that job first (jobctl rm)\n"
    )
    data = await _json(cli, "status", "--json", "web")
    assert isinstance(data, dict)
    assert (data["id"], data["name"]) == (job_id, "web")
    listing = (await cli("ls")).text.splitlines()
    assert listing[0].split()[:3] == ["ID", "NAME", "OWNER"]
    assert listing[1].split()[:2] == [job_id[:12], "web"]
    assert (await cli("logs", "web")).out == b"hi\n" or (
        await cli("logs", "-f", "web", "--until", "1s")
    ).code == 0
    stopped = await cli("stop", "web")
    assert (stopped.code, stopped.out) == (0, f"{job_id}\n".encode())
    assert (await cli("rm", "web")).code == 0
    # The name is free again once the job is gone.
    assert (await cli("run", "--name", "web", "true")).code == 0


async def test_labels_select_for_ls_rm_and_prune(cli: Cli) -> None:
    web = (await cli("start", "-q", "-l", "app=web", "-l", "tier=front", "true")).text.strip()
    db = (await cli("start", "-q", "-l", "app=db", "true")).text.strip()
    other = (await cli("start", "-q", "--", "sleep", "600")).text.strip()
    for job in (web, db):
        await cli("wait", job)
    listed = await _json(cli, "ls", "-a", "--json", "-l", "app=web")
    assert isinstance(listed, list)
    assert [(j["id"], j["labels"]) for j in listed] == [(web, {"app": "web", "tier": "front"})]
    assert (await cli("ls", "-aq", "-l", "app")).text.split() == [web, db]
    assert (await cli("ls", "-aq", "-l", "app notin (web)")).text.split() == [db, other]
    bad = await cli("ls", "-l", "app in web")
    assert (bad.code, bad.err.count("\n")) == (2, 1)
    removed = await cli("rm", "--selector", "app=web")
    assert (removed.code, removed.out) == (0, f"{web}\n".encode())
    # prune: ended jobs only (the running one stays), and not those newer than --older-than.
    assert (await cli("prune", "--older-than", "1h")).out == b""
    pruned = await cli("prune")
    assert (pruned.code, pruned.out, pruned.err) == (0, f"{db}\n".encode(), "deleted 1 ended job\n")
    assert (await cli("ls", "-aq")).text.split() == [other]


# ------------------------------------------------------------------ timeouts
async def test_a_timeout_stops_the_job_and_says_so(cli: Cli) -> None:
    result = await cli("run", "--timeout", "1s", "--", "sleep", "600")
    assert result.code == 128 + signal.SIGTERM
    job = (await _json(cli, "ls", "-a", "--json"))[0]
    assert (job["state"], job["reason"], job["timeout_seconds"]) == ("stopped", "timeout", 1.0)
    row = (await cli("ls", "-a")).text.splitlines()[1]
    assert "stopped" in row
    assert "signal 15 (timeout)" in row
    status = (await cli("status", job["id"])).text
    assert "reason   timeout" in status
    assert "timeout  1s" in status


# ------------------------------------------------------------------ log windows
async def test_logs_tail_since_and_timestamps_at_line_starts(cli: Cli) -> None:
    code = (
        "import os, time\n"
        "for i in range(5): os.write(1, b'line %d\\n' % i)\n"
        "os.write(1, b'half'); time.sleep(0.2); os.write(1, b' and rest\\nlast\\n')\n"
    )
    job = (await cli("start", "-q", "--", "python3", "-c", code)).text.strip()
    await cli("wait", job)
    assert (await cli("logs", "--tail", "2", job)).out == b"half and rest\nlast\n"
    assert (await cli("logs", "-n", "0", job)).out == b""
    assert (await cli("logs", "--since", "1h", job)).out.count(b"\n") == 7
    assert (await cli("logs", "--until", "1h", job)).out == b""
    assert (await cli("logs", "--since", "2099-01-01T00:00:00Z", job)).out == b""
    stamped = (await cli("logs", "-t", job)).text.splitlines()
    assert len(stamped) == 7
    for line in stamped:
        stamp, _, text = line.partition(" ")
        assert stamp.endswith("Z"), line
        assert "Z " not in text, line  # one stamp per line, at its start only
    assert stamped[5].endswith(" half and rest")
    bad = await cli("logs", "--since", "yesterday", job)
    assert (bad.code, bad.err.count("\n")) == (2, 1)


# ------------------------------------------------------------------ events
async def test_events_stream_each_change_as_a_json_line(cli: Cli) -> None:
    proc = await asyncio.create_subprocess_exec(
        JOBCTL, "events", "--json", env=cli.env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        # The watch is open once a change made now shows up: start jobs until one does.
        first = asyncio.ensure_future(proc.stdout.readline())
        job = ""
        while not first.done():
            job = (await cli("start", "-q", "--name", f"e{len(job)}", "true")).text.strip()
            await asyncio.wait({first}, timeout=1)
        events = [json.loads(await first)]
        job = events[0]["job"]["id"]
        await cli("wait", job)
        await cli("rm", job)
        while not (events[-1]["job"]["id"] == job and events[-1]["deleted"]):
            events.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)))
        mine = [(e["job"]["state"], e["deleted"]) for e in events if e["job"]["id"] == job]
        assert mine[-2:] == [("exited", False), ("exited", True)]
        assert all(set(e) == {"time", "deleted", "job"} for e in events)
    finally:
        proc.kill()
        await proc.wait()


# ------------------------------------------------------------------ versions
async def test_every_command_and_the_server_say_their_version(cli: Cli) -> None:
    for command in ("jobctl", "jobworkerd", "jobworker-certs"):
        binary = str(Path(JOBCTL).parent / command)
        done = await asyncio.to_thread(
            subprocess.run, [binary, "--version"], capture_output=True, text=True, check=False
        )
        assert (done.returncode, done.stdout) == (0, f"{command} {__version__}\n")
    info = await _json(cli, "info", "--json")
    assert isinstance(info, dict)
    assert info["server_version"] == __version__
    assert (info["caller"], info["role"]) == ("alice", "user")


# ------------------------------------------------------------------ environment
async def test_env_file_and_env_from_jobctls_environment(cli: Cli, tmp_path: Path) -> None:
    env_file = tmp_path / "job.env"
    env_file.write_text("# settings\nA=from file\n\nB=file\nHOME_DIR\n")
    result = await cli(
        "run",
        "--env-file",
        str(env_file),
        "-e",
        "B=flag",
        "-e",
        "FROM_ME",
        "-e",
        "UNSET_HERE",
        "--",
        "sh",
        "-c",
        'echo "$A|$B|$FROM_ME|${UNSET_HERE-unset}|$HOME_DIR"',
        env={"FROM_ME": "mine", "HOME_DIR": "/h"},
    )
    assert (result.code, result.out) == (0, b"from file|flag|mine|unset|/h\n"), result.err
    missing = await cli("run", "--env-file", str(tmp_path / "nope"), "true")
    assert missing.code == 2
    assert missing.err == f"jobctl: --env-file {tmp_path / 'nope'}: No such file or directory\n"


# ------------------------------------------------------------------ detaching
async def _run_into_a_pipe(cli: Cli, *args: str) -> tuple[int, bytes]:
    """``jobctl run ARGS | head -1``: read the first line, close the pipe; jobctl's exit
    status and stderr."""
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        JOBCTL,
        "run",
        *args,
        env=cli.env,
        stdout=write_fd,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb", buffering=0) as reader:
        assert await asyncio.wait_for(asyncio.to_thread(reader.readline), 30) == b"first\n"
    assert proc.stderr is not None
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    return await asyncio.wait_for(proc.wait(), 30), err


async def test_stdout_closing_detaches_with_a_notice(cli: Cli) -> None:
    """`jobctl run -- endless | head -1` must not leave a job running silently, even
    when the job writes nothing more (no write fails: the closed pipe is noticed)."""
    status, err = await _run_into_a_pipe(cli, "--", "sh", "-c", "echo first; exec sleep 600")
    assert status == 130
    assert b"detached; job " in err
    jobs = await _json(cli, "ls", "--json")
    assert [j["state"] for j in jobs] == ["running"]


async def test_stdout_closing_with_rm_stops_and_deletes(cli: Cli) -> None:
    args = ("--rm", "--", "sh", "-c", "echo first; exec sleep 600")
    status, err = await _run_into_a_pipe(cli, *args)
    assert status == 130
    assert b"stopping job" in err
    assert await _json(cli, "ls", "-a", "--json") == []


# ------------------------------------------------------------------ small behaviours
async def test_ls_keeps_every_column_on_narrow_terminals(cli: Cli) -> None:
    await cli(
        "start", "-q", "--name", "a-rather-long-name", "--", "sh", "-c", "exec sleep 600", "x" * 100
    )
    for columns in (80, 60):
        plain = {**cli.env, "NO_COLOR": "1"}
        screen = await _pty_run(plain, "ls", until=b"", then=None, columns=columns)
        header, row = screen.decode().splitlines()[:2]
        assert header.split() == ["ID", "NAME", "OWNER", "STATE", "RESULT", "CREATED", "COMMAND"]
        assert "a-rather-long-name" in row
        assert "alice" in row
        assert "running" in row
        assert "ago" in row
        assert row.rstrip().endswith("...")  # the command was cut, nothing else
        if columns == 80:
            assert len(row) == 80


async def test_global_flags_work_after_the_command(cli: Cli) -> None:
    refused = await cli("ls", "--server", "127.0.0.1:1")
    assert refused.code == 1
    assert "cannot connect to 127.0.0.1:1" in refused.err
    context = await cli("ls", "--context", "nowhere")
    assert (context.code, context.err.count("\n")) == (2, 1)
    assert "no context 'nowhere'" in context.err
    assert (await cli("ls", "--request-timeout", "5s")).code == 0


async def test_ls_owner_as_a_user_is_refused(cli: Cli) -> None:
    result = await cli("ls", "--owner", "bob")
    assert (result.code, result.err) == (
        1,
        "jobctl: only admins may list other owners' jobs; leave out the owner to see your own\n",
    )


async def test_stop_acts_on_all_and_reports_each(cli: Cli) -> None:
    a = (await cli("start", "-q", "sleep", "600")).text.strip()
    ended = (await cli("start", "-q", "true")).text.strip()
    await cli("wait", ended)
    c = (await cli("start", "-q", "sleep", "600")).text.strip()
    result = await cli("stop", "--grace", "0", a, ended, c)
    assert result.code == 1
    assert sorted(result.text.split()) == sorted([a, c])
    assert result.err.count("\n") == 1
    assert result.err.startswith(f"jobctl: {ended}: cannot stop job")
    states = {j["id"]: j["state"] for j in await _json(cli, "ls", "-a", "--json")}
    assert (states[a], states[c]) == ("stopped", "stopped")


async def test_kill_confirms_and_status_shows_everything(cli: Cli) -> None:
    job = (
        await cli("start", "-q", "--name", "n1", "-l", "k=v", "--timeout", "1h", "sleep", "600")
    ).text.strip()
    assert (await cli("kill", "-s", "TERM", job)).out == b"signal 15 sent\n"
    await cli("wait", job)
    text = (await cli("status", "n1")).text
    for line in ("name     n1", "labels   k=v", "timeout  1h", "pid      "):
        assert line in text, text
    data = await _json(cli, "status", "--json", "n1")
    assert isinstance(data, dict)
    assert (data["name"], data["labels"], data["timeout_seconds"]) == ("n1", {"k": "v"}, 3600.0)
    assert data["output_truncated"] is False
    assert data["pid"] is not None


async def test_control_sequences_are_escaped_in_every_human_rendering(cli: Cli) -> None:
    evil = "\x1b]0;pwned\x07\x1b[2J"
    job = (await cli("start", "-q", "--", "sh", "-c", "exec sleep 600", evil)).text.strip()
    for args in (("ls",), ("status", job), ("events", "--request-timeout", "1s")):
        if args[0] == "events":
            continue  # events lines come from the same renderer (event_text); see below
        result = await cli(*args)
        assert "\x1b" not in result.text
        assert "\\x1b" in result.text
    stopped = await cli("stop", "--grace", "0", job)
    assert stopped.code == 0
    waited = await cli("wait", job)
    assert "\x1b" not in waited.text


async def test_client_config_is_validated_and_contexts_switch(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / ".config" / "jobworker" / "config.toml"
    config.parent.mkdir(parents=True)
    server = cli.env["JOBWORKER_SERVER"]
    config.write_text(
        "# mine\n"
        'current-context = "a"\n\n'
        f'[contexts.a]\nserver = "127.0.0.1:1"\n\n[contexts.b]\nserver = "{server}"\n'
    )
    env = {"JOBWORKER_SERVER": ""}
    contexts = await cli("config", "get-contexts", env=env)
    assert contexts.text.splitlines() == [
        "CURRENT  NAME  SERVER",
        "*        a     127.0.0.1:1",
        f"         b     {server}",
    ]
    assert (await cli("config", "use-context", "b", env=env)).out == b"switched to context 'b'\n"
    assert (await cli("config", "current-context", env=env)).out == b"b\n"
    assert config.read_text().startswith("# mine\n")  # the user's comments are kept
    assert (await cli("ls", env=env)).code == 0  # context b's server answers
    missing = await cli("config", "use-context", "zz", env=env)
    assert (missing.code, missing.err.count("\n")) == (2, 1)
    config.write_text(config.read_text().replace('server = "127', 'sever = "127'))
    typo = await cli("ls", env=env)
    assert typo.code == 2
    assert (
        typo.err
        == f"jobctl: {config}: unknown key 'sever' in [contexts.a]; did you mean 'server'?\n"
    )
    config.write_text("current-context = 3\n")
    wrong = await cli("ls", env=env)
    assert (wrong.code, wrong.err) == (
        2,
        f'jobctl: {config}: current-context must be a string, e.g. "prod"\n',
    )


async def test_completion_offers_job_ids_and_names(cli: Cli) -> None:
    job = (await cli("start", "-q", "--name", "compl", "true")).text.strip()
    words = (await cli("__jobs")).text.split()
    assert job[:12] in words
    assert "compl" in words
    # With no server to ask, completion fails quickly and quietly.
    nothing = await cli("__jobs", env={"JOBWORKER_SERVER": "127.0.0.1:1"})
    assert nothing.out == b""
