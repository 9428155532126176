"""jobctl --fleet: one command on many servers at once, as parallel-ssh and Ansible do.

The servers come from the fleet's list and its DNS SRV records; each is asked who it is
(GetServerInfo, concurrently, each within the connect timeout), selected by its labels,
then:

- ``run`` starts the job on every server (at most ``--max-parallel`` at a time; after
  ``--max-failures`` failed servers no more start, the rest are ``skipped``), prints each
  output line after its server's name, and ends with a summary on stderr; it exits 0 only
  when every server's job exited 0;
- ``start`` prints ``HOST/ID`` per server, ``ls`` and ``info`` gather every server's;
- ``status``, ``logs``, ``stop``, ``kill``, ``wait``, ``rm``, ``attach`` and ``exec`` take
  ``HOST/ID`` and act on that server as the plain command does.

A server that cannot be reached is reported by name with one reason and never holds up the
others. Placement, discovery and consensus belong to Nomad, Kubernetes and DNS: this only
makes the servers they run addressable as one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import grpc

from .._labels import LabelError, check_labels, check_name, parse_selector
from .._text import escape
from .._units import UsageError
from ..api._config import split_address
from ..api._tls import TlsError, TlsFiles
from ..api.client import connect, pb, start_run, stream_output
from ._client import CliError, Session
from ._commands import guarded, job_spec, listed, run_command, run_here
from ._config import Fleet
from ._io import Io
from ._render import info_json, job_json, json_text, table_text

__all__ = ["Host", "discover", "run_fleet"]

# Commands that act on jobs named HOST/ID, each on its own server.
_ADDRESSED = frozenset({"status", "logs", "stop", "kill", "wait", "rm", "attach", "exec"})
_FANNED = frozenset({"run", "start", "ls", "info"})


class Host(NamedTuple):
    """One server of the fleet: where it is, what it calls itself, its labels, and its
    session (None with ``error``: why it cannot be reached)."""

    address: str
    name: str
    labels: dict[str, str]
    session: Session | None
    error: str = ""


class Result(NamedTuple):
    """How a fan-out `run` went on one server."""

    host: str
    state: str  # exited, stopped, failed, unreachable, skipped
    job: dict[str, Any] | None = None
    seconds: float = 0.0
    error: str = ""
    output: dict[int, bytes] | None = None

    @property
    def ok(self) -> bool:
        return self.job is not None and self.state == "exited" and self.job["exit_code"] == 0


def run_fleet(args: argparse.Namespace, fleet: Fleet) -> int:
    """Run one parsed command across ``fleet``; its exit status (0 only when it went well
    on every server; 2 bad usage; 130 interrupted, the jobs started going on)."""
    note = f"interrupted; jobs already started keep running (jobctl --fleet {fleet.name} ls)"
    return run_here(lambda io: guarded(_main(args, fleet, io), io, interrupted=note))


async def _main(args: argparse.Namespace, fleet: Fleet, io: Io) -> int:
    if args.command in _ADDRESSED:
        return await _addressed(args, fleet, io)
    if args.command not in _FANNED:
        raise UsageError(
            f"{args.command} does not work across a fleet; run it on one server (--server, "
            f"or name a job HOST/ID where the command takes one)"
        )
    selector = _host_selector(args.host_selector)
    async with _hosts(fleet) as hosts:
        chosen = [h for h in hosts if h.session is None or selector(h.labels)]
        if not chosen:
            raise CliError(f"no server of fleet {fleet.name!r} matches {args.host_selector!r}")
        if args.command == "run":
            return await _run(args, fleet, chosen, io)
        if args.command == "start":
            return await _start(args, chosen, io)
        if args.command == "ls":
            return await _ls(args, chosen, io)
        return await _info(args, chosen, io)


def _host_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Raises UsageError: the selector does not parse."""
    try:
        return parse_selector(text).matches
    except LabelError as e:
        raise UsageError(f"-l/--selector: {e}") from None


# ------------------------------------------------------------------ discovery
async def discover(fleet: Fleet) -> list[str]:
    """The fleet's server addresses: its list, then its SRV records (by priority, then
    weight, highest first), each once.

    Raises:
        CliError: the SRV name cannot be resolved (said with the name and the resolver).
    """
    addresses = list(fleet.servers)
    if fleet.srv:
        addresses += await _srv(fleet.srv, fleet.resolver, fleet.connect_timeout)
    return list(dict.fromkeys(addresses))


async def _srv(name: str, resolver: str | None, timeout: float) -> list[str]:
    # dnspython: SRV parsing and an asyncio resolver; nothing here is hand-written DNS.
    import dns.asyncresolver  # noqa: PLC0415 - only fleets with SRV records need it
    import dns.exception  # noqa: PLC0415
    import dns.rdtypes.IN.SRV  # noqa: PLC0415

    dns_resolver = dns.asyncresolver.Resolver(configure=resolver is None)
    where = "the system's resolver"
    if resolver is not None:
        host, port = split_address(resolver)
        dns_resolver.nameservers = [host]
        dns_resolver.port = port
        where = resolver
    try:
        answer = await dns_resolver.resolve(name, "SRV", lifetime=timeout)
    except dns.exception.DNSException as e:
        raise CliError(
            f"cannot resolve the SRV records {name!r} at {where}: {e}; check srv and "
            "resolver in the fleet, or JOBWORKER_DNS_RESOLVER"
        ) from None
    records = [r for r in answer if isinstance(r, dns.rdtypes.IN.SRV.SRV)]
    records.sort(key=lambda r: (r.priority, -r.weight))
    return [f"{r.target.to_text(omit_final_dot=True)}:{r.port}" for r in records]


@contextlib.asynccontextmanager
async def _hosts(fleet: Fleet) -> AsyncIterator[list[Host]]:
    """Every server of the fleet, asked who it is concurrently; connections closed after."""
    addresses = await discover(fleet)
    tls = TlsFiles(fleet.ca, fleet.cert, fleet.key)
    channels: list[grpc.aio.Channel] = []
    try:
        for address in addresses:
            try:
                channels.append(connect(address, tls))
            except TlsError as e:
                raise CliError(f"{e} (ca, cert and key of fleet {fleet.name!r})") from e
        hosts = await asyncio.gather(
            *(_meet(fleet, a, c) for a, c in zip(addresses, channels, strict=True))
        )
        yield _unique_names(hosts)
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def _meet(fleet: Fleet, address: str, channel: grpc.aio.Channel) -> Host:
    session = Session(channel, fleet.target(address))
    try:
        info = await session.stub.GetServerInfo(
            pb.ServerInfoRequest(), timeout=fleet.connect_timeout
        )
    except grpc.aio.AioRpcError as e:
        return Host(address, address, {}, None, _reason(e, fleet.connect_timeout))
    # What a server says of itself is checked as its own start-up checks it: a name or
    # labels that would not pass there (a terminal escape in a name, say) are not shown
    # or matched here; the server goes by its address and no labels instead.
    try:
        name = check_name(info.name)
        labels = check_labels(dict(info.labels))
    except LabelError:
        name, labels = address, {}
    return Host(address, name, labels, session)


def _unique_names(hosts: list[Host]) -> list[Host]:
    """Two servers calling themselves the same are told apart by address."""
    seen: dict[str, int] = {}
    for h in hosts:
        seen[h.name] = seen.get(h.name, 0) + 1
    return [h._replace(name=f"{h.name}@{h.address}") if seen[h.name] > 1 else h for h in hosts]


# What an UNAVAILABLE's details say -> the reason given.
_UNAVAILABLE = (
    (("refused",), "connection refused"),
    (
        ("handshake", "ssl", "tls", "certificate"),
        "TLS handshake failed (check the fleet's ca, cert and key)",
    ),
    (("dns", "resolv", "lookup"), "cannot resolve its name"),
)


def _reason(error: grpc.aio.AioRpcError, timeout: float) -> str:
    """Why a server could not be reached, in a few words."""
    code, details = error.code(), (error.details() or "").lower()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g} s"
    if code is grpc.StatusCode.UNAVAILABLE:
        for words, reason in _UNAVAILABLE:
            if any(w in details for w in words):
                return reason
        return "unavailable"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return f"it rejected the certificate: {error.details()}"
    return str(error.details() or code.name.lower())


# ------------------------------------------------------------------ run
# The most of one unfinished line held back per server and stream.
_LONGEST_LINE = 64 * 1024


class _Lines:
    """Output from every server, a whole line at a time, each after its server's name."""

    def __init__(self, io: Io, width: int, *, prefix: bool) -> None:
        self._io = io
        self._width = width
        self._prefix = prefix
        self._partial: dict[tuple[str, int], bytes] = {}

    async def write(self, host: str, stream: int, data: bytes) -> None:
        if not self._prefix:
            await self._emit(stream, data)
            return
        text = self._partial.pop((host, stream), b"") + data
        *lines, rest = text.split(b"\n")
        if len(rest) > _LONGEST_LINE:
            # A line that never ends (one huge write, a progress bar) is shown in pieces
            # rather than held in memory whole.
            lines.append(rest)
            rest = b""
        if rest:
            self._partial[(host, stream)] = rest
        if lines:
            await self._emit(stream, b"".join(self._head(host) + line + b"\n" for line in lines))

    async def flush(self, host: str) -> None:
        for stream in (pb.STREAM_STDOUT, pb.STREAM_STDERR):
            rest = self._partial.pop((host, stream), b"")
            if rest:
                await self._emit(stream, self._head(host) + rest + b"\n")

    def _head(self, host: str) -> bytes:
        return f"{host:<{self._width}} | ".encode()

    async def _emit(self, stream: int, data: bytes) -> None:
        await (self._io.err(data) if stream == pb.STREAM_STDERR else self._io.out(data))


async def _run(args: argparse.Namespace, fleet: Fleet, hosts: list[Host], io: Io) -> int:
    spec = job_spec(args)
    if args.interactive or args.tty:
        raise UsageError("-i and -t take one server: run them with --server, not --fleet")
    timeout = args.timeout if args.timeout is not None else fleet.timeout
    if timeout is not None:
        spec.timeout_seconds = timeout
    slots = asyncio.Semaphore(args.max_parallel or fleet.max_parallel or len(hosts))
    lines = _Lines(io, max(len(h.name) for h in hosts), prefix=not args.no_prefix)
    failures = 0

    async def one(host: Host) -> Result:
        nonlocal failures
        if host.session is None:
            failures += 1
            return Result(host.name, "unreachable", error=host.error)
        async with slots:
            if args.max_failures is not None and failures >= args.max_failures:
                return Result(host.name, "skipped", error=f"{failures} servers failed before")
            result = await _run_one(host, host.session, spec, lines, keep=args.json)
            if not result.ok:
                failures += 1
            return result

    results = await asyncio.gather(*(one(h) for h in hosts))
    if args.json:
        await io.out(json_text([_result_json(r) for r in results]).encode())
    await io.say(_summary(results))
    return 0 if all(r.ok for r in results) else 1


async def _run_one(
    host: Host, session: Session, spec: pb.JobSpec, lines: _Lines, *, keep: bool
) -> Result:
    """The job on one server, its output to ``lines`` (or kept, with ``keep``), and how
    it went; a server lost midway is a result, not an error."""
    started = time.monotonic()
    kept: dict[int, bytes] = {pb.STREAM_STDOUT: b"", pb.STREAM_STDERR: b""}

    async def out(stream: int, data: bytes) -> None:
        if keep:
            kept[stream] += data
        else:
            await lines.write(host.name, stream, data)

    try:
        final = await _run_on(session, spec, out)
    except (TimeoutError, ValueError) as e:
        await lines.flush(host.name)
        why = str(e) or f"no answer within {session.target.timeout:g} s"
        return Result(host.name, "failed", seconds=time.monotonic() - started, error=why)
    except grpc.aio.AioRpcError as e:
        await lines.flush(host.name)
        lost = e.code() is grpc.StatusCode.UNAVAILABLE
        return Result(
            host.name,
            "unreachable" if lost else "failed",
            seconds=time.monotonic() - started,
            error=f"lost the connection: {_reason(e, 0)}" if lost else (e.details() or ""),
            output=kept if keep else None,
        )
    await lines.flush(host.name)
    data = job_json(final)
    return Result(
        host.name,
        data["state"],
        data,
        time.monotonic() - started,
        data["error"] or ("stopped by its timeout" if data["reason"] == "timeout" else ""),
        kept if keep else None,
    )


async def _run_on(
    session: Session, spec: pb.JobSpec, out: Callable[[int, bytes], Awaitable[None]]
) -> pb.Job:
    """Run ``spec`` on one server in one RunJob call, its output to ``out``; the job's final
    status. A server from before RunJob (UNIMPLEMENTED: it made nothing) gets CreateJob,
    StreamOutput and WaitJob.

    Raises:
        grpc.aio.AioRpcError: a call failed.
        TimeoutError: the server did not answer the start within the target's timeout.
        ValueError: its first answer was not the job's start.
    """
    request = pb.RunJobRequest(spec=spec)
    running = await start_run(session.channel, request, timeout=session.target.timeout)
    if running is None:
        return await _create_and_follow(session, spec, out)
    async for piece in running.pieces():
        await out(piece.stream, bytes(piece.data))
    return running.final or running.job


async def _create_and_follow(
    session: Session, spec: pb.JobSpec, out: Callable[[int, bytes], Awaitable[None]]
) -> pb.Job:
    """As _run_on, in the three calls a server from before RunJob takes.

    Raises:
        grpc.aio.AioRpcError: a call failed.
    """
    job = await session.stub.CreateJob(
        pb.CreateJobRequest(spec=spec, start=True), timeout=session.target.timeout
    )
    async for piece in stream_output(session.channel, pb.OutputRequest(id=job.id, follow=True)):
        await out(piece.stream, bytes(piece.data))
    final: pb.Job = await session.stub.WaitJob(pb.JobRequest(id=job.id), timeout=None)
    return final


def _result_json(r: Result) -> dict[str, Any]:
    out = r.output or {}
    return {
        "host": r.host,
        "state": r.state,
        "exit_code": r.job["exit_code"] if r.job else None,
        "signal": r.job["signal"] if r.job else None,
        "seconds": round(r.seconds, 3),
        "error": r.error or None,
        "job": r.job,
        "stdout": out.get(pb.STREAM_STDOUT, b"").decode("utf-8", "replace"),
        "stderr": out.get(pb.STREAM_STDERR, b"").decode("utf-8", "replace"),
    }


def _summary(results: list[Result]) -> str:
    rows = [
        (
            escape(r.host),
            r.state,
            _code(r),
            f"{r.seconds:.2f}s" if r.job or r.seconds else "-",
            escape(r.error) or "-",
        )
        for r in results
    ]
    ok = sum(r.ok for r in results)
    return grid(("HOST", "STATE", "EXIT", "TIME", "ERROR"), rows) + (
        f"{ok} of {len(results)} servers succeeded\n"
    )


def _code(r: Result) -> str:
    if r.job is None:
        return "-"
    if r.job["exit_code"] is not None:
        return str(r.job["exit_code"])
    return f"signal {r.job['signal']}" if r.job["signal"] is not None else "-"


def grid(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Aligned columns, the last one unpadded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in [headers, *rows]
    )


# ------------------------------------------------------------------ start, ls, info
async def _each(
    hosts: list[Host], io: Io, action: Callable[[Host, Session], Awaitable[Any]]
) -> tuple[list[tuple[Host, Any]], int]:
    """``action`` on every reachable server at once; what each gave, and 1 if any server
    was unreachable or failed (each said in one line on stderr), else 0."""

    async def one(host: Host) -> tuple[Host, Any, str]:
        if host.session is None:
            return host, None, host.error
        try:
            return host, await action(host, host.session), ""
        except CliError as e:
            return host, None, str(e)
        except grpc.aio.AioRpcError as e:
            return host, None, _reason(e, host.session.target.timeout)

    done = await asyncio.gather(*(one(h) for h in hosts))
    status = 0
    for host, _, error in done:
        if error:
            await io.say(f"jobctl: {escape(host.name)}: {escape(error)}\n")
            status = 1
    return [(h, v) for h, v, e in done if not e], status


async def _start(args: argparse.Namespace, hosts: list[Host], io: Io) -> int:
    spec = job_spec(args)

    async def start(_host: Host, s: Session) -> Any:
        return await s.call("CreateJob", pb.Job, pb.CreateJobRequest(spec=spec, start=True))

    started, status = await _each(hosts, io, start)
    if args.json:
        await io.out(json_text([{"host": h.name, **job_json(j)} for h, j in started]).encode())
    else:
        await io.out("".join(f"{h.name}/{j.id}\n" for h, j in started).encode())
    failed = [f"{h.name}: {j.error}" for h, j in started if j.state == pb.JOB_STATE_FAILED]
    for line in failed:
        await io.say(f"jobctl: {escape(line)}\n")
    return 1 if failed else status


async def _ls(args: argparse.Namespace, hosts: list[Host], io: Io) -> int:
    async def ls(_host: Host, s: Session) -> list[dict[str, Any]]:
        return await listed(s, args)

    found, status = await _each(hosts, io, ls)
    jobs = [{"host": h.name, **j} for h, js in found for j in js]
    if args.quiet:
        await io.out("".join(f"{j['host']}/{j['id']}\n" for j in jobs).encode())
    else:
        await io.out((json_text(jobs) if args.json else table_text(jobs, io)).encode())
    return status


async def _info(args: argparse.Namespace, hosts: list[Host], io: Io) -> int:
    async def info(host: Host, s: Session) -> dict[str, Any]:
        reply = await s.call("GetServerInfo", pb.ServerInfo, pb.ServerInfoRequest())
        return info_json(reply, host.address)

    found, status = await _each(hosts, io, info)
    if args.json:
        await io.out(json_text([d for _, d in found]).encode())
        return status
    rows = [
        (
            escape(d["name"]),
            escape(d["server"]),
            escape(d["server_version"]),
            escape(",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))) or "-",
            d["cgroups"] or "-",
            str(d["cpus"]),
            f"{d['running_jobs']}/{d['jobs']}",
        )
        for _, d in found
    ]
    headers = ("NAME", "ADDRESS", "VERSION", "LABELS", "CGROUPS", "CPUS", "RUNNING/JOBS")
    await io.out(grid(headers, rows).encode())
    return status


# ------------------------------------------------------------------ HOST/ID
async def _addressed(args: argparse.Namespace, fleet: Fleet, io: Io) -> int:
    """Each job named HOST/ID handled by the plain command, on its server (jobs on
    several servers: one command per server, in the order given)."""
    field = "jobs" if hasattr(args, "jobs") else "job"
    refs = getattr(args, field)
    if not refs:
        raise UsageError(
            f"in a fleet, name the jobs as HOST/ID (jobctl --fleet {fleet.name} ls shows them)"
        )
    by_host: dict[str, list[str]] = {}
    for ref in refs if isinstance(refs, list) else [refs]:
        host, sep, job = ref.partition("/")
        if not sep or not host or not job:
            raise UsageError(
                f"in a fleet, name a job as HOST/ID, not {ref!r} (jobctl --fleet "
                f"{fleet.name} ls shows them)"
            )
        by_host.setdefault(host, []).append(job)
    async with _hosts(fleet) as hosts:
        known = {h.name: h for h in hosts}
        status = 0
        for name, jobs in by_host.items():
            host = known.get(name)
            if host is None:
                names = ", ".join(sorted(known)) or "none"
                raise CliError(f"fleet {fleet.name!r} has no server {name!r} (servers: {names})")
            if host.session is None:
                raise CliError(f"{name}: {host.error}")
            one = copy.copy(args)
            setattr(one, field, jobs if isinstance(refs, list) else jobs[0])
            code = await run_command(one, fleet.target(host.address), io, host.session.channel)
            status = status or code
    return status
