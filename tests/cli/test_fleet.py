"""jobctl --fleet: five real jobworkerd servers on this host, each with its own name,
labels, port and state dir, and a real DNS server on 127.0.0.1 serving their SRV records."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import pytest_asyncio

from jobworker.api._config import ServerIdentity
from jobworker.api.client import pb
from jobworker.cli._fleet import _Lines
from jobworker.cli._io import Io

from ..api.conftest import Pki, serving
from ..api.test_network import Daemon, _reap_orphans, take_back
from .test_jobctl import JOBCTL, Result

pytestmark = pytest.mark.usefixtures("subreaper")

# name, labels
SERVERS = [
    ("web-1", {"role": "web", "zone": "a"}),
    ("web-2", {"role": "web", "zone": "b"}),
    ("web-3", {"role": "web", "zone": "b"}),
    ("db-1", {"role": "db", "zone": "a"}),
    ("db-2", {"role": "db", "zone": "b"}),
]
SRV_NAME = "_jobworker._tcp.fleet.test."


class _Dns(asyncio.DatagramProtocol):
    """A DNS server answering SRV queries for ``SRV_NAME`` (dnspython encodes and decodes)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        if question.name.to_text() == SRV_NAME and question.rdtype == dns.rdatatype.SRV:
            # Priorities and weights out of order: the client sorts them.
            records = [f"{10 - i} 5 {port} localhost." for i, port in enumerate(self.ports)]
            response.answer.append(dns.rrset.from_text_list(SRV_NAME, 60, "IN", "SRV", records))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@dataclass
class Fleet:
    daemons: list[Daemon]
    env: dict[str, str]
    dns: str

    async def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        proc = await asyncio.create_subprocess_exec(
            JOBCTL,
            *args,
            env={**self.env, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return Result(proc.returncode or 0, out, err.decode())


def _config(home: Path, pki: Pki, ports: list[int], dns_address: str) -> None:
    d = pki.dir
    files = f'ca = "{d}/ca.pem"\ncert = "{d}/alice.pem"\nkey = "{d}/alice.key"\n'
    listed = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    config = home / ".config" / "jobworker" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        f"[fleets.all]\nservers = [{listed}]\n{files}"
        f'[fleets.dns]\nsrv = "{SRV_NAME}"\nresolver = "{dns_address}"\n{files}'
        f'[fleets.gone]\nservers = ["127.0.0.1:1"]\nconnect-timeout = "2s"\n{files}'
    )


@pytest_asyncio.fixture
async def fleet(tmp_path: Path, pki: Pki) -> AsyncIterator[Fleet]:
    daemons: list[Daemon] = []
    transport: asyncio.BaseTransport | None = None
    try:
        for name, labels in SERVERS:
            (tmp_path / name).mkdir()
            table = ", ".join(f'{k} = "{v}"' for k, v in labels.items())
            server = f'name = "{name}"\nlabels = {{ {table} }}'
            daemons.append(Daemon(tmp_path / name, pki, server=server))
        ports = [await asyncio.wait_for(asyncio.to_thread(d.wait_ready), 60) for d in daemons]
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Dns(ports), local_addr=("127.0.0.1", 0)
        )
        host, port = transport.get_extra_info("sockname")
        _config(tmp_path, pki, ports, f"{host}:{port}")
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": str(tmp_path / ".config"),
        }
        yield Fleet(daemons, env, f"{host}:{port}")
    finally:
        if transport is not None:
            transport.close()
        # All servers go before any reaping: each one's orphans are reaped together.
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.kill()
        for d in daemons:
            d.proc.wait()
            await asyncio.to_thread(d.join)
            d.kill_jobs()
        await asyncio.to_thread(_reap_orphans)
        for d in daemons:
            await take_back(d.state)


def _summary(err: str) -> dict[str, list[str]]:
    """The summary table on stderr: host -> its other columns."""
    rows = {}
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("HOST "))
    for line in lines[start + 1 :]:
        if " servers succeeded" in line:
            break
        host, *rest = line.split()
        rows[host] = rest
    return rows


async def test_run_prefixes_each_line_and_sums_up(fleet: Fleet) -> None:
    result = await fleet("--fleet", "all", "run", "--", "sh", "-c", "echo one; echo two >&2")
    assert result.code == 0, result.err
    names = [name for name, _ in SERVERS]
    out = result.out.decode().splitlines()
    assert sorted(out) == sorted(f"{n:<5} | one" for n in names)
    assert sorted(line for line in result.err.splitlines() if "| two" in line) == sorted(
        f"{n:<5} | two" for n in names
    )
    summary = _summary(result.err)
    assert set(summary) == set(names)
    assert all(row[:2] == ["exited", "0"] for row in summary.values()), summary
    assert "5 of 5 servers succeeded" in result.err
    # --no-prefix: the output as it is.
    plain = await fleet("--fleet", "all", "run", "--no-prefix", "--", "echo", "x")
    assert plain.out == b"x\n" * 5
    # One failing job is enough to exit 1.
    failed = await fleet("--fleet", "all", "run", "--", "sh", "-c", "exit 3")
    assert failed.code == 1
    assert all(row[:2] == ["exited", "3"] for row in _summary(failed.err).values())


async def test_a_fleet_run_is_one_call_per_server(fleet: Fleet) -> None:
    """Each server runs its job in one RunJob: no CreateJob, StreamOutput or WaitJob."""
    result = await fleet("--fleet", "all", "run", "--", "echo", "x")
    assert result.code == 0, result.err
    for d in fleet.daemons:
        logged = d.log
        async with asyncio.timeout(30):
            while not any("rpc RunJob OK" in line for line in logged):  # noqa: ASYNC110 - a log pipe
                await asyncio.sleep(0.01)
        rpcs = [
            line.split(" rpc ", 1)[1].split()[0] for line in logged if "jobworker.audit" in line
        ]
        assert rpcs.count("RunJob") == 1
        assert not {"CreateJob", "StreamOutput", "WaitJob"} & set(rpcs), rpcs


async def test_json_gives_one_object_per_host(fleet: Fleet) -> None:
    result = await fleet("--fleet", "all", "run", "--json", "--", "echo", "hi")
    assert result.code == 0, result.err
    objects = json.loads(result.out)
    assert sorted(o["host"] for o in objects) == sorted(n for n, _ in SERVERS)
    assert all((o["state"], o["exit_code"], o["stdout"]) == ("exited", 0, "hi\n") for o in objects)
    assert all(o["job"]["argv"] == ["echo", "hi"] for o in objects)


async def test_servers_are_selected_by_their_labels(fleet: Fleet) -> None:
    result = await fleet("--fleet", "all", "-l", "role=web,zone!=a", "run", "--", "true")
    assert result.code == 0, result.err
    assert set(_summary(result.err)) == {"web-2", "web-3"}
    info = json.loads((await fleet("--fleet", "all", "-l", "role in (db)", "info", "--json")).out)
    assert sorted(i["name"] for i in info) == ["db-1", "db-2"]
    assert all(i["labels"]["role"] == "db" for i in info)
    none = await fleet("--fleet", "all", "-l", "role=cache", "run", "--", "true")
    assert none.code == 1
    assert "no server of fleet 'all' matches 'role=cache'" in none.err


async def test_max_parallel_holds_on_the_servers(fleet: Fleet) -> None:
    result = await fleet(
        "--fleet", "all", "--max-parallel", "2", "run", "-l", "test=parallel", "--", "sleep", "0.4"
    )
    assert result.code == 0, result.err
    listed = await fleet("--fleet", "all", "ls", "-a", "-l", "test=parallel", "--json")
    jobs = json.loads(listed.out)
    assert len(jobs) == 5
    spans = [
        (dt.datetime.fromisoformat(j["started_at"]), dt.datetime.fromisoformat(j["ended_at"]))
        for j in jobs
    ]
    # At each start, how many jobs (on any server) were running.
    most = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert most <= 2, spans


async def test_after_max_failures_the_rest_are_skipped(fleet: Fleet) -> None:
    result = await fleet(
        "--fleet", "all", "--max-parallel", "1", "--max-failures", "2", "run", "--", "false"
    )
    assert result.code == 1
    states = [row[0] for row in _summary(result.err).values()]
    assert sorted(states) == ["exited", "exited", "skipped", "skipped", "skipped"]


async def test_timeout_stops_each_job_and_counts_it_failed(fleet: Fleet) -> None:
    result = await fleet("--fleet", "all", "run", "--timeout", "1s", "--", "sleep", "600")
    assert result.code == 1
    summary = _summary(result.err)
    assert all(row[0] == "stopped" for row in summary.values()), summary
    assert all("timeout" in " ".join(row) for row in summary.values()), summary


async def test_a_server_killed_mid_run_is_reported_and_the_rest_finish(fleet: Fleet) -> None:
    run = await asyncio.create_subprocess_exec(
        JOBCTL,
        "--fleet",
        "all",
        "run",
        "--",
        "sh",
        "-c",
        "echo started; sleep 5; echo done",
        env=fleet.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert run.stdout is not None
    assert run.stderr is not None
    out = b""
    async with asyncio.timeout(60):
        # Once every server's job has said it started, kill one server.
        while out.count(b"| started") < 5:
            line = await run.stdout.readline()
            assert line, "the fleet run ended early"
            out += line
    fleet.daemons[1].proc.kill()
    rest, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 1
    summary = _summary(err.decode())
    assert summary["web-2"][0] == "unreachable", summary
    assert "lost the connection" in " ".join(summary["web-2"])
    others = {k: v for k, v in summary.items() if k != "web-2"}
    assert all(row[:2] == ["exited", "0"] for row in others.values()), summary
    assert (out + rest).decode().count("| done") == 4


async def test_an_unreachable_server_is_named_with_one_reason(fleet: Fleet) -> None:
    result = await fleet("--fleet", "gone", "run", "--", "true")
    assert result.code == 1
    assert _summary(result.err)["127.0.0.1:1"][:1] == ["unreachable"]
    assert "connection refused" in result.err


async def test_host_slash_id_reaches_every_verb(fleet: Fleet) -> None:
    started = await fleet("--fleet", "all", "start", "-q", "--", "sh", "-c", "echo hi; sleep 600")
    assert started.code == 0, started.err
    refs = started.out.decode().split()
    assert sorted(r.split("/")[0] for r in refs) == sorted(n for n, _ in SERVERS)
    web2 = next(r for r in refs if r.startswith("web-2/"))
    short = web2[: len("web-2/") + 8]  # a prefix of the id works as on one server
    status = json.loads((await fleet("--fleet", "all", "status", "--json", short)).out)
    assert status["state"] == "running"
    follower = await asyncio.create_subprocess_exec(
        JOBCTL, "--fleet", "all", "logs", "-f", web2, env=fleet.env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert follower.stdout is not None
        assert await asyncio.wait_for(follower.stdout.readline(), 30) == b"hi\n"
    finally:
        follower.kill()
        await asyncio.wait_for(follower.wait(), 30)
    assert (await fleet("--fleet", "all", "logs", web2)).out == b"hi\n"
    inside = await fleet("--fleet", "all", "exec", web2, "--", "sh", "-c", "exit 4")
    assert inside.code == 4, inside.err
    assert (await fleet("--fleet", "all", "kill", "-s", "CONT", web2)).code == 0
    assert (await fleet("--fleet", "all", "stop", *refs[:2])).code == 0
    assert (await fleet("--fleet", "all", "stop", *refs[2:])).code == 0
    waited = await fleet("--fleet", "all", "wait", web2)
    assert waited.code == 143  # its SIGTERM (stop), as docker reports it
    assert (await fleet("--fleet", "all", "rm", *refs)).code == 0
    assert json.loads((await fleet("--fleet", "all", "ls", "-a", "--json")).out) == []
    bad = await fleet("--fleet", "all", "status", "web-9/abcd")
    assert bad.code == 1
    assert "fleet 'all' has no server 'web-9'" in bad.err
    plain = await fleet("--fleet", "all", "logs", "abcd1234")
    assert plain.code == 2
    assert "name a job as HOST/ID" in plain.err
    unnamed = await fleet("--fleet", "all", "rm", "--selector", "app=x")
    assert unnamed.code == 2
    assert "name the jobs as HOST/ID" in unnamed.err


async def test_ls_and_info_gather_every_server(fleet: Fleet) -> None:
    await fleet("--fleet", "all", "start", "-q", "--", "sleep", "600")
    table = (await fleet("--fleet", "all", "ls")).out.decode().splitlines()
    assert table[0].split()[:2] == ["HOST", "ID"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(n for n, _ in SERVERS)
    jobs: list[dict[str, Any]] = json.loads((await fleet("--fleet", "all", "ls", "--json")).out)
    assert sorted(j["host"] for j in jobs) == sorted(n for n, _ in SERVERS)
    assert all(j["state"] == "running" and j["argv"] == ["sleep", "600"] for j in jobs)
    info = (await fleet("--fleet", "all", "info")).out.decode().splitlines()
    assert info[0].split()[:2] == ["NAME", "ADDRESS"]
    assert len(info) == 6
    assert any(line.startswith("db-1 ") and "role=db,zone=a" in line for line in info)
    await fleet("--fleet", "all", "stop", *(f"{j['host']}/{j['id']}" for j in jobs))


async def test_srv_records_name_the_servers(fleet: Fleet) -> None:
    result = await fleet("--fleet", "dns", "info", "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    # In SRV priority order: the server listed last has the lowest priority number.
    assert [i["name"] for i in info] == [n for n, _ in reversed(SERVERS)]
    assert all(i["server"].startswith("localhost:") for i in info)
    # The resolver from the environment wins; a name it does not know is one clear line.
    missing = await fleet("--fleet", "dns", "info", env={"JOBWORKER_DNS_RESOLVER": "127.0.0.1:9"})
    assert missing.code == 1
    assert missing.err.count("\n") == 1
    assert f"cannot resolve the SRV records '{SRV_NAME}' at 127.0.0.1:9" in missing.err


def test_flags_that_need_a_fleet_say_so() -> None:
    env = {"PATH": os.environ["PATH"], "JOBWORKER_CA": "x", "JOBWORKER_CERT": "x"}
    needs = (["--max-parallel", "2", "ls"], ["-l", "role=web", "ls"], ["run", "--json", "true"])
    for args in needs:
        done = _run_jobctl(args, {**env, "JOBWORKER_KEY": "x"})
        assert done[0] == 2, done
        assert "works across a fleet only: add --fleet NAME" in done[1]


def test_a_bad_label_stops_the_server_at_start_up(tmp_path: Path, pki: Pki) -> None:
    import subprocess  # noqa: PLC0415 - one synchronous test
    import sys  # noqa: PLC0415

    jobworkerd = str(Path(sys.executable).parent / "jobworkerd")
    d = pki.dir
    done = subprocess.run(
        [
            jobworkerd,
            *("--ca", str(d / "ca.pem"), "--cert", str(d / "server.pem")),
            *("--key", str(d / "server.key"), "--state-dir", str(tmp_path / "state")),
            *("--listen", "127.0.0.1:0", "--label", "role=web", "--label", "zone=a b"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--label: label 'zone' has a bad value 'a b'" in done.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made


def _run_jobctl(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    import subprocess  # noqa: PLC0415 - one synchronous test

    done = subprocess.run([JOBCTL, *args], env=env, capture_output=True, text=True, check=False)
    return done.returncode, done.stderr


async def test_what_a_server_says_of_itself_is_checked(tmp_path: Path, pki: Pki) -> None:
    """A server (modified, or not ours) that calls itself something no jobworkerd accepts
    at start-up is shown and addressed by its address, and matches no label."""
    identity = ServerIdentity(name="evil\x1b[2J", labels={"role": "we b"})
    async with serving(tmp_path, pki, identity=identity) as odd:
        d = pki.dir
        config = tmp_path / ".config" / "jobworker" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f'[fleets.odd]\nservers = ["127.0.0.1:{odd.port}"]\n'
            f'ca = "{d}/ca.pem"\ncert = "{d}/alice.pem"\nkey = "{d}/alice.key"\n'
        )
        env = {"PATH": os.environ["PATH"], "XDG_CONFIG_HOME": str(tmp_path / ".config")}
        jobctl = Fleet([], env, "")
        ran = await jobctl("--fleet", "odd", "run", "--", "echo", "hi")
        assert ran.code == 0, ran.err
        assert "\x1b" not in ran.err
        assert ran.out == f"127.0.0.1:{odd.port} | hi\n".encode()
        selected = await jobctl("--fleet", "odd", "-l", "role", "info")
        assert selected.code == 1
        assert "no server of fleet 'odd' matches 'role'" in selected.err


async def test_a_line_that_never_ends_is_not_held_back_whole(tmp_path: Path) -> None:
    """The prefixer holds at most 64 KiB of an unfinished line per server and stream."""
    out = (tmp_path / "out").open("w+b")
    try:
        lines = _Lines(Io(out.fileno(), out.fileno()), 4, prefix=True)
        for _ in range(100):
            await lines.write("db-1", pb.STREAM_STDOUT, b"x" * 4096)
        shown = Path(out.name).read_bytes()
        assert len(shown) >= 100 * 4096 - 64 * 1024  # all but the last piece is out
        await lines.flush("db-1")
        pieces = Path(out.name).read_bytes().split(b"\n")[:-1]
    finally:
        out.close()
    assert len(pieces) > 1
    assert all(p.startswith(b"db-1 | ") for p in pieces)
    assert b"".join(p.removeprefix(b"db-1 | ") for p in pieces) == b"x" * 4096 * 100
