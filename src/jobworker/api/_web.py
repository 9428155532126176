"""The web console: jobworkerd's HTTPS listener for browsers (``[web] listen``).

TLS is the gRPC listener's: 1.3 only, and a client certificate signed by the same CA is
required in the handshake. Past it, nothing here decides who may see or do what: every
page, event stream and action is a JobService call made with the browser's certificate
(``_webcall``), so identity, authorization, validation, stream caps and the audit line are
the API's own. Another user's job answers 404 because GetJob does.

Pages are shells (``_webpage``) that scripts in ``static/`` keep live over server-sent
events. Actions are POSTs that must come from this console's own pages: same origin (the
browser's Origin and Sec-Fetch-Site headers) and a token bound to the certificate.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import signal
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from .._units import UsageError, parse_duration, parse_size
from ._config import split_address
from ._proto import jobworker_pb2 as pb
from ._service import JobService
from ._tls import TlsFiles
from ._webcall import Caller, CallRefusedError
from ._webpage import (
    Chrome,
    error_page,
    job_json,
    job_page,
    jobs_page,
    start_page,
    usage_json,
)

__all__ = ["CSP", "ConnectionLimits", "WebConsole"]

log = logging.getLogger("jobworker.web")

STATIC = Path(__file__).with_name("static")

# No inline script or style, nothing from elsewhere, never framed: output shown as text
# could not run even if it were ever taken for markup.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: with it a browser sends "Origin: null" even on the console's own
    # forms, and the same-origin check below could not tell them from a foreign page's.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Strict-Transport-Security": "max-age=31536000",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
# What a refusal is over HTTP. Anything else is the server's fault: 500.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
# A page of output: an event stream sends at most this much of a log before it asks the
# browser to load more, so a 1 GB log is never sent whole.
PAGE_BYTES = 1 << 20
# How often the jobs list's CPU and memory are refreshed.
USAGE_EVERY_S = 2.0
# The most points a chart gets from a job's history at first (more come live).
CHART_POINTS = 1500
# A comment line on an idle event stream now and then lets a dead connection be noticed.
_KEEPALIVE_S = 15.0
_STREAM_LETTER = {pb.STREAM_STDOUT: "o", pb.STREAM_STDERR: "e", pb.STREAM_SYSTEM: "x"}
_STREAMS = {
    "": pb.OUTPUT_SELECTOR_BOTH,
    "stdout": pb.OUTPUT_SELECTOR_STDOUT,
    "stderr": pb.OUTPUT_SELECTOR_STDERR,
}


@dataclass(frozen=True, slots=True)
class _Visit:
    """One request's caller and the CSRF token of its certificate."""

    caller: Caller
    token: str


_VISIT = web.RequestKey("jobworker.visit", _Visit)


class WebConsole:
    """The console's listener, serving until :meth:`stop`."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self._runner = runner
        self._server = server
        self.port: int = server.sockets[0].getsockname()[1]

    @classmethod
    async def start(
        cls, service: JobService, tls: TlsFiles, address: str, limits: ConnectionLimits
    ) -> WebConsole:
        """Bind ``address`` and serve.

        Raises:
            OSError: the address cannot be bound.
            ssl.SSLError: the TLS files do not load (checked before, by the gRPC side).
        """
        app = _application(service)
        runner = web.AppRunner(
            app,
            # Cancelled with the browser's connection: an event stream's RPC ends with it.
            handler_cancellation=True,
            access_log=None,
            # A connection that sends no request for this long is closed (aiohttp's own
            # default is an hour: idle connections of anyone past TLS would pile up).
            keepalive_timeout=limits.idle_s,
        )
        await runner.setup()
        protocols = runner.server
        assert protocols is not None  # noqa: S101 - set by setup() just above

        def accept() -> asyncio.BaseProtocol:
            # As the gRPC listener's max_connections: past it, a connection is closed as
            # soon as it is made, so a flood cannot use up the server's descriptors.
            if len(protocols.connections) >= limits.max_connections:
                return _Closed()
            return protocols()

        host, port = split_address(address)
        try:
            server = await asyncio.get_running_loop().create_server(
                accept,
                host,
                port,
                ssl=_tls_context(tls),
                ssl_handshake_timeout=limits.handshake_s,
                reuse_address=True,
            )
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner, server)

    async def stop(self) -> None:
        """Stop listening and end every open connection (event streams included)."""
        self._server.close()
        await self._runner.cleanup()


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How long a connection may take to say something, and how many may be open."""

    handshake_s: float
    idle_s: float
    max_connections: int


class _Closed(asyncio.Protocol):
    """A connection over the limit: closed once made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _tls_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    context.set_alpn_protocols(["http/1.1"])
    return context


def _application(service: JobService) -> web.Application:
    # Bound to this server's life: a token of a previous run is refused after a restart
    # (the page is reloaded, and gets a new one).
    secret = secrets.token_bytes(32)
    app = web.Application(middlewares=[_guard(service, secret)], client_max_size=1 << 20)
    app.on_response_prepare.append(_secure_headers)
    routes = Routes(service)
    app.router.add_get("/", routes.jobs)
    app.router.add_get("/new", routes.new)
    app.router.add_post("/jobs", routes.start)
    app.router.add_get("/jobs/{id}", routes.job)
    app.router.add_post("/jobs/{id}/stop", routes.stop)
    app.router.add_post("/jobs/{id}/kill", routes.kill)
    app.router.add_post("/jobs/{id}/remove", routes.remove)
    app.router.add_get("/events/jobs", routes.jobs_events)
    app.router.add_get("/events/jobs/{id}", routes.job_events)
    app.router.add_get("/events/jobs/{id}/output", routes.output_events)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    return app


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(_HEADERS)
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guard(service: JobService, secret: bytes) -> Any:
    """The middleware every request passes: who is calling (the certificate of the
    connection), the CSRF check of a POST, and refusals as pages. Any: aiohttp's
    middleware type is a decorated function."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        if not der:  # the handshake requires one; a connection without is not served
            return _html(error_page(401, "a client certificate is required"), 401)
        peer = transport.get_extra_info("peername") if transport is not None else None
        where = f"web:{peer[0]}:{peer[1]}" if peer else "web"
        token = hmac.new(secret, hashlib.sha256(der).digest(), "sha256").hexdigest()
        visit = _Visit(Caller(service, ssl.DER_cert_to_PEM_cert(der).encode(), where), token)
        request[_VISIT] = visit
        try:
            if request.method == "POST":
                await _check_same_origin(request, token)
            elif request.path.startswith("/events/"):
                _check_not_cross_site(request)
            return await handler(request)
        except CallRefusedError as e:
            status = _HTTP_STATUS.get(e.code, 500)
            if request.path.startswith("/events/"):
                return web.json_response({"error": e.message}, status=status)
            return _html(error_page(status, e.message), status)
        except _RefusedError as e:
            return _html(error_page(e.status, str(e)), e.status)

    return guard


class _RefusedError(Exception):
    """A request the console itself turns away (a failed CSRF check, a bad form)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _check_same_origin(request: web.Request, token: str) -> None:
    """Raises _RefusedError: the POST did not come from a page of this console."""
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site")
    own = f"https://{request.host}"
    form = await request.post()
    sent = form.get("csrf")
    if (
        origin != own
        or site not in (None, "same-origin")
        or not isinstance(sent, str)
        or not hmac.compare_digest(sent.encode(), token.encode())
    ):
        raise _RefusedError(
            403,
            "refused: this action must come from the console's own page (cross-site "
            "request check); reload the page and try again",
        )


def _check_not_cross_site(request: web.Request) -> None:
    """Raises _RefusedError: another site's page opened an event stream (it could not read
    it without CORS, which the console never grants; it is refused before any RPC runs)."""
    if request.headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
        raise _RefusedError(403, "refused: the console's event streams are for its own pages")


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


def _visit(request: web.Request) -> _Visit:
    return request[_VISIT]


class _Events:
    """A server-sent event stream: one JSON object per event."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, request: web.Request) -> _Events:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        return cls(response)

    async def send(self, event: str, data: object, event_id: str = "") -> None:
        # JSON escapes every newline, so the data is one line.
        text = f"event: {event}\n"
        if event_id:
            text += f"id: {event_id}\n"
        text += f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        async with self._lock:
            await self.response.write(text.encode())

    async def keepalive(self) -> None:
        while True:
            await asyncio.sleep(_KEEPALIVE_S)
            async with self._lock:
                await self.response.write(b": keepalive\n\n")


class Routes:
    """The console's pages, actions and event streams; each is JobService calls."""

    def __init__(self, service: JobService) -> None:
        self._grace = service.runtime.default_grace

    async def _chrome(self, request: web.Request) -> Chrome:
        visit = _visit(request)
        info = await visit.caller.unary("GetServerInfo", pb.ServerInfoRequest(), pb.ServerInfo)
        return Chrome(info.name, info.caller, info.role, visit.token)

    # ----------------------------------------------------------------- pages
    async def jobs(self, request: web.Request) -> web.StreamResponse:
        chrome = await self._chrome(request)
        owner = request.query.get("owner", "")
        if owner:
            # Asked now, so that a user who may not list another owner's jobs is told on
            # the page (403, the service's words), not by a list that never loads.
            await _visit(request).caller.unary(
                "ListUsage", pb.ListUsageRequest(owner=owner), pb.ListUsageResponse
            )
        return _html(jobs_page(chrome, owner))

    async def job(self, request: web.Request) -> web.StreamResponse:
        chrome = await self._chrome(request)
        job = await _visit(request).caller.unary(
            "GetJob", pb.JobRequest(id=request.match_info["id"]), pb.Job
        )
        return _html(job_page(chrome, job, self._grace))

    async def new(self, request: web.Request) -> web.StreamResponse:
        return _html(start_page(await self._chrome(request), {}))

    # --------------------------------------------------------------- actions
    async def start(self, request: web.Request) -> web.StreamResponse:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        try:
            spec = _spec_of(form)
            job = await _visit(request).caller.unary(
                "CreateJob", pb.CreateJobRequest(spec=spec, start=True), pb.Job
            )
        except (UsageError, CallRefusedError) as e:
            status = _HTTP_STATUS.get(e.code, 500) if isinstance(e, CallRefusedError) else 400
            problem = e.message if isinstance(e, CallRefusedError) else str(e)
            return _html(start_page(await self._chrome(request), form, problem), status)
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    async def stop(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        grace = form.get("grace")
        stop = pb.StopJobRequest(id=request.match_info["id"])
        if isinstance(grace, str) and grace.strip():
            try:
                stop.grace_seconds = float(grace)
            except ValueError:
                raise _RefusedError(400, f"grace {grace!r} is not a number of seconds") from None
        job = await _visit(request).caller.unary("StopJob", stop, pb.Job)
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    async def kill(self, request: web.Request) -> web.StreamResponse:
        kill = pb.SignalJobRequest(id=request.match_info["id"], signal=signal.SIGKILL)
        job = await _visit(request).caller.unary("SignalJob", kill, pb.Job)
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    async def remove(self, request: web.Request) -> web.StreamResponse:
        remove = pb.JobRequest(id=request.match_info["id"])
        await _visit(request).caller.unary("RemoveJob", remove, pb.Job)
        raise web.HTTPSeeOther("/")

    # ---------------------------------------------------------- event streams
    async def jobs_events(self, request: web.Request) -> web.StreamResponse:
        """The jobs list: every job there is ("snapshot"), then each change ("job",
        "deleted"), and every USAGE_EVERY_S the running jobs' CPU and memory ("usage")."""
        caller = _visit(request).caller
        owner = request.query.get("owner", "")
        watch = pb.WatchJobsRequest(owner=owner, existing=True)
        async with contextlib.aclosing(caller.stream("WatchJobs", watch, pb.JobEvent)) as feed:
            snapshot = []
            async for event in feed:  # a refusal comes here, before the stream is opened
                if event.synced:
                    break
                snapshot.append(job_json(event.job))

            running = {j["id"] for j in snapshot if j["state"] == "running"}

            async def changes(events: _Events) -> None:
                await events.send("snapshot", snapshot)
                snapshot.clear()
                async with _beside(self._usage(caller, owner, running, events)):
                    async for event in feed:
                        job = event.job
                        if event.deleted or job.state != pb.JOB_STATE_RUNNING:
                            running.discard(job.id)
                        else:
                            running.add(job.id)
                        if event.deleted:
                            await events.send("deleted", {"id": job.id})
                        else:
                            await events.send("job", job_json(job))

            return await _event_stream(request, changes)

    async def _usage(self, caller: Caller, owner: str, running: set[str], events: _Events) -> None:
        """Every USAGE_EVERY_S, the running jobs' CPU and memory; no call (and so no audit
        line) while none of the listed jobs runs."""
        while True:
            if running:
                listed = await caller.unary(
                    "ListUsage", pb.ListUsageRequest(owner=owner), pb.ListUsageResponse
                )
                await events.send("usage", {u.id: usage_json(u.samples) for u in listed.jobs})
            await asyncio.sleep(USAGE_EVERY_S)

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """One job: its status now and at each change ("status"), its usage history
        then each new sample ("usage"), and "end" once it has ended."""
        caller = _visit(request).caller
        job = await caller.unary("GetJob", pb.JobRequest(id=request.match_info["id"]), pb.Job)
        history = await caller.unary("GetUsage", _history_request(job), pb.UsageResponse)

        async def follow(events: _Events) -> None:
            await events.send("status", job_json(job, full=True))
            await events.send("usage", usage_json(history.samples))
            since = history.samples[-1].time_unix_nano if history.samples else 0
            # Both end when the job has ended; a refusal of either ends the other too.
            async with asyncio.TaskGroup() as both:
                both.create_task(self._follow_status(caller, job.id, events))
                both.create_task(self._follow_usage(caller, job.id, since, events))
            await events.send("end", {})

        return await _event_stream(request, follow)

    async def _follow_status(self, caller: Caller, job: str, events: _Events) -> None:
        watch = caller.stream("WatchJob", pb.JobRequest(id=job), pb.Job)
        async with contextlib.aclosing(watch) as changes:
            async for status in changes:
                await events.send("status", job_json(status, full=True))

    async def _follow_usage(self, caller: Caller, job: str, since: int, events: _Events) -> None:
        request = pb.UsageRequest(id=job, since_unix_nano=since)
        async with contextlib.aclosing(
            caller.stream("WatchUsage", request, pb.UsageResponse)
        ) as batches:
            async for batch in batches:
                await events.send("usage", usage_json(batch.samples))

    async def output_events(self, request: web.Request) -> web.StreamResponse:
        """A job's output (``streams``: both, ``stdout`` or ``stderr``), from the start (or
        ``offset``, or the last ``tail`` lines), followed live: "output" events of
        [stream, text] pairs, each with the offset to resume from as its id; after
        PAGE_BYTES, "more" (the browser asks for the next page); "end" once the job has
        ended and all is sent."""
        caller = _visit(request).caller
        job = await caller.unary("GetJob", pb.JobRequest(id=request.match_info["id"]), pb.Job)
        wanted = _output_request(job.id, request)

        async def follow(events: _Events) -> None:
            decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in _STREAM_LETTER}

            def rest() -> list[tuple[str, str]]:
                # Bytes a decoder still holds (a character cut by the page's or the log's
                # end) are shown, as U+FFFD, rather than dropped.
                return [
                    (_STREAM_LETTER[s], text)
                    for s, decoder in decoders.items()
                    if (text := decoder.decode(b"", final=True))
                ]

            sent = 0
            out = caller.stream("StreamOutput", wanted, pb.OutputResponse)
            async with contextlib.aclosing(out) as responses:
                async for response in responses:
                    pieces = []
                    for chunk in response.chunks:
                        text = decoders[chunk.stream].decode(chunk.data)
                        if text:
                            pieces.append((_STREAM_LETTER[chunk.stream], text))
                        sent += len(chunk.data)
                    if sent >= PAGE_BYTES:
                        await events.send("output", pieces + rest(), str(response.offset))
                        await events.send("more", {"offset": response.offset})
                        return
                    await events.send("output", pieces, str(response.offset))
            if last := rest():
                await events.send("output", last)
            await events.send("end", {})

        return await _event_stream(request, follow)


async def _event_stream(
    request: web.Request, body: Callable[[_Events], Awaitable[None]]
) -> web.StreamResponse:
    """Open an event stream and run ``body`` on it; a call refused on the way (the server
    shutting down, a stream too many) is said as a "problem" event."""
    events = await _Events.open(request)
    try:
        async with _beside(events.keepalive()):
            await body(events)
    except* CallRefusedError as group:
        refused = group.exceptions[0]
        assert isinstance(refused, CallRefusedError)  # noqa: S101 - what except* matched
        await events.send("problem", {"error": refused.message})
    return events.response


@contextlib.asynccontextmanager
async def _beside(*side: Awaitable[None]) -> AsyncGenerator[None, None]:
    """Run ``side`` tasks while the body runs; cancel them after. A side task's failure
    (the browser went away, a refused call) ends the body too."""
    body = asyncio.current_task()
    tasks = [asyncio.ensure_future(s) for s in side]

    def failed(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None and body is not None:
            body.cancel()

    for task in tasks:
        task.add_done_callback(failed)
    try:
        yield
    finally:
        for task in tasks:
            task.remove_done_callback(failed)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _history_request(job: pb.Job) -> pb.UsageRequest:
    """The job's usage history thinned to about CHART_POINTS points."""
    request = pb.UsageRequest(id=job.id)
    started = job.started_at.seconds
    if started:
        span = (job.ended_at.seconds or int(time.time())) - started
        if span > CHART_POINTS:
            request.step_seconds = span / CHART_POINTS
    return request


def _output_request(job: str, request: web.Request) -> pb.OutputRequest:
    """Raises _RefusedError: an offset or tail that is not a number."""
    streams = _STREAMS.get(request.query.get("streams", ""))
    if streams is None:
        raise _RefusedError(400, "streams must be stdout, stderr or left out (both)")
    wanted = pb.OutputRequest(id=job, follow=True, streams=streams)
    # A reconnecting EventSource says where it was (the id of the last event it had).
    offset = request.headers.get("Last-Event-ID") or request.query.get("offset")
    tail = request.query.get("tail")
    try:
        if offset:
            wanted.offset = int(offset)
        elif tail:
            wanted.tail_lines = int(tail)
    except ValueError:
        raise _RefusedError(400, "offset and tail must be whole numbers") from None
    return wanted


def _spec_of(form: dict[str, str]) -> pb.JobSpec:
    """The start form as a JobSpec (the service validates it as any other).

    Raises:
        UsageError: a field is not what it should be; the message says which and how.
    """
    argv = [line for line in form.get("argv", "").splitlines() if line.strip()]
    if not argv:
        raise UsageError("the command is empty; give the program, one argument per line")
    spec = pb.JobSpec(argv=argv, name=form.get("name", "").strip())
    spec.env.update(_pairs(form.get("env", ""), "environment"))
    spec.labels.update(_pairs(form.get("labels", ""), "labels"))
    if cpus := form.get("cpus", "").strip():
        try:
            spec.limits.cpus = float(cpus)
        except ValueError:
            raise UsageError(f"CPUs {cpus!r} is not a number; use e.g. 0.5") from None
    if memory := form.get("memory", "").strip():
        spec.limits.memory_bytes = parse_size(memory, "memory")
    if pids := form.get("pids", "").strip():
        if not pids.isdigit() or int(pids) >= 1 << 32:
            raise UsageError(f"processes {pids!r} is not a whole number; use e.g. 100")
        spec.limits.pids = int(pids)
    if timeout := form.get("timeout", "").strip():
        spec.timeout_seconds = parse_duration(timeout, "timeout")
    return spec


def _pairs(text: str, what: str) -> dict[str, str]:
    """KEY=value lines (blank ones skipped).

    Raises:
        UsageError: a line without '=' or without a key.
    """
    pairs = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{what}: {line!r} is not KEY=value; one per line")
        pairs[key.strip()] = value
    return pairs
