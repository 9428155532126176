"""The JobService: each RPC authenticates, authorizes, validates, then calls the runtime.

Every handler is declared with :func:`job_rpc`, :func:`job_stream` or :func:`caller_rpc`,
which identify the caller from its certificate, resolve and authorize the job a request
names before the handler's body runs (as grpclib's request handler does), and turn any
exception into a status in one place (``_errors``). :func:`add_to_server` refuses an RPC
declared any other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from .. import __version__
from .._labels import LabelError, Selector, parse_selector
from ..identity import Identity
from ..runtime import (
    Batch,
    ExecFailedError,
    ExecProcess,
    InvalidSpecError,
    JobEndedError,
    JobStatus,
    Runtime,
    State,
    Window,
    check_signal,
    check_window,
)
from ._auth import Authenticator, authorize_job, list_filter
from ._config import ServerIdentity, ServiceLimits
from ._convert import STREAMS, exec_spec_from_pb, job_to_pb, spec_from_pb, usage_to_pb
from ._errors import ApiError, to_status
from ._logs import AUDIT
from ._proto import jobworker_pb2 as pb
from ._wire import encode_field, encode_list_response, encode_output_response

__all__ = [
    "PRESERIALIZED",
    "RPC_SCOPES",
    "JobService",
    "NoMetrics",
    "ServiceMetrics",
    "add_to_server",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _NamesJob(Protocol):
    """A request that names a job."""

    @property
    def id(self) -> str: ...


JobReq = TypeVar("JobReq", bound=_NamesJob)

# Chunks of one read are sent together, up to this many bytes per message (the client's
# default receive limit is 4 MiB; a log record is at most 1 MiB).
MESSAGE_BYTES = 2 * 1024 * 1024
# The biggest message kept for the next follower of the same batch: a follower's new lines,
# not a reader's catching up (which would keep that much memory after the streams end).
_SHARED_MESSAGE_BYTES = 64 * 1024


class ServiceMetrics(Protocol):
    """What the service reports for metrics (see ``_metrics.Metrics``)."""

    def rpc_done(self, method: str, code: str) -> None: ...
    def job_start(self, seconds: float, status: JobStatus) -> None: ...
    def stream_opened(self) -> None: ...
    def stream_closed(self) -> None: ...
    def streamed(self, nbytes: int) -> None: ...


class NoMetrics:
    def rpc_done(self, method: str, code: str) -> None:
        pass

    def job_start(self, seconds: float, status: JobStatus) -> None:
        pass

    def stream_opened(self) -> None:
        pass

    def stream_closed(self) -> None:
        pass

    def streamed(self, nbytes: int) -> None:
        pass


class _Call:
    """One RPC, for its audit line and its count: who, from where, what, which job."""

    __slots__ = ("argv", "job", "method", "metrics", "peer", "started", "who")

    def __init__(self, method: str, request: Any, context: Any, metrics: ServiceMetrics) -> None:
        self.method = method
        # Read now: grpcio crashes (SIGSEGV) reading the peer of a call the client cancelled.
        self.peer: str = context.peer()
        self.metrics = metrics
        self.job: str = str(getattr(request, "id", ""))[:_MAX_AUDITED]
        self.argv = _argv_of(request)
        self.who: Identity | None = None
        self.started = time.perf_counter()

    def done(
        self, code: grpc.StatusCode, message: str = "", error: Exception | None = None
    ) -> None:
        name = code.name
        self.metrics.rpc_done(self.method, name)
        who = self.who
        fields: dict[str, Any] = {
            "rpc": self.method,
            "user": who.name if who else getattr(error, "subject", ""),
            "role": who.role.value if who else "",
            "fingerprint": who.fingerprint if who else getattr(error, "fingerprint", ""),
            "peer": self.peer,
            "job": self.job,
            "code": name,
            "ms": round((time.perf_counter() - self.started) * 1000, 2),
        }
        if self.argv:
            fields["argv"] = self.argv
        if message:
            fields["error"] = message
        AUDIT.info("rpc %s %s", self.method, name, extra={"fields": fields})


# The RPC being served, in its handler's task: for a body that learns the job it is about
# only as it goes (RunJob creates it).
_CALL: contextvars.ContextVar[_Call] = contextvars.ContextVar("jobworker_call")

# The most of one client-chosen value an audit line carries (argv, a malformed id).
_MAX_AUDITED = 512


def _argv_of(request: object) -> str:
    """A CreateJob's command for its audit line: argv joined by spaces (each arg quoted as
    JSON when it needs it), cut at _MAX_AUDITED characters; the formatter escapes it."""
    spec = getattr(request, "spec", None)
    argv = list(getattr(spec, "argv", ())) if spec is not None else []
    text = " ".join(a if a and a.isprintable() and " " not in a else json.dumps(a) for a in argv)
    return text if len(text) <= _MAX_AUDITED else text[:_MAX_AUDITED] + "..."


class Malformed:
    """A request body that did not parse as its message (the deserializer's stand-in, so
    the handler can refuse it with INVALID_ARGUMENT and audit it, instead of gRPC's
    UNKNOWN and a traceback)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _check_parsed(request: object) -> None:
    """Raises InvalidSpecError: the request body did not parse."""
    if isinstance(request, Malformed):
        raise InvalidSpecError(request.reason)


def _lenient(parse: Callable[[bytes], object], name: str) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(f"the request is not a valid {name} message ({e}); check the client")

    return deserialize


def _job_of(response: object) -> str:
    if isinstance(response, pb.Job):
        return response.id
    if isinstance(response, pb.StartJobsResponse):
        return ",".join(r.job.id for r in response.results if r.HasField("job"))
    return ""


# Every RPC's scope, filled by the wrappers below: "job" RPCs name a job, which the wrapper
# resolves and authorizes before the handler runs; "caller" RPCs act only on the caller's
# own jobs (create, list). add_to_server refuses a method that is in neither.
RPC_SCOPES: dict[str, str] = {}


def _unary_rpc(
    name: str, scope: str, body: Callable[[JobService, Req, Identity], Awaitable[Resp]]
) -> Callable[[JobService, Req, Any], Awaitable[Resp]]:
    RPC_SCOPES[name] = scope

    async def handler(self: JobService, request: Req, context: Any) -> Resp:
        call = _Call(name, request, context, self.metrics)
        try:
            call.who = self.auth.identify(context)
            _check_parsed(request)
            response = await body(self, request, call.who)
        except asyncio.CancelledError:
            call.done(grpc.StatusCode.CANCELLED, "the client went away")
            raise
        except Exception as e:
            code, message = to_status(e)
            call.done(code, message, e)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        call.job = call.job or _job_of(response)
        call.done(grpc.StatusCode.OK)
        return response

    handler.__name__ = name
    return handler


def _stream_rpc(
    name: str, scope: str, body: Callable[[JobService, Req, Identity], AsyncGenerator[Resp, None]]
) -> Callable[[JobService, Req, Any], AsyncIterator[Resp]]:
    RPC_SCOPES[name] = scope

    async def handler(self: JobService, request: Req, context: Any) -> AsyncIterator[Resp]:
        call = _Call(name, request, context, self.metrics)
        _CALL.set(call)
        try:
            call.who = self.auth.identify(context)
            _check_parsed(request)
            with self._stream_slot(call.who):
                async with contextlib.aclosing(body(self, request, call.who)) as items:
                    async for item in _until_shutdown(self, items):
                        yield item
        except (asyncio.CancelledError, GeneratorExit):
            call.done(grpc.StatusCode.CANCELLED, "the client went away")
            raise
        except Exception as e:  # noqa: BLE001 - the single mapping point
            code, message = to_status(e)
            call.done(code, message, e)
            await context.abort(code, message)
        else:
            call.done(grpc.StatusCode.OK)

    handler.__name__ = name
    return handler


def caller_rpc(
    method: Callable[[JobService, Req, Identity], Awaitable[Resp]],
) -> Callable[[JobService, Req, Any], Awaitable[Resp]]:
    """A unary RPC that acts on the caller's own jobs only (it names none)."""
    return _unary_rpc(method.__name__, "caller", method)


def caller_stream(
    method: Callable[[JobService, Req, Identity], AsyncGenerator[Resp, None]],
) -> Callable[[JobService, Req, Any], AsyncIterator[Resp]]:
    """A server-streaming RPC on the caller's own jobs (admins: any owner's)."""
    return _stream_rpc(method.__name__, "caller", method)


def job_rpc(
    method: Callable[[JobService, JobReq, Identity, str], Awaitable[Resp]],
) -> Callable[[JobService, JobReq, Any], Awaitable[Resp]]:
    """A unary RPC on the job ``request.id`` names: the job is resolved and authorized here,
    before ``method`` runs, which gets its canonical id."""

    async def body(self: JobService, request: JobReq, who: Identity) -> Resp:
        return await method(self, request, who, self.authorize(who, request.id))

    return _unary_rpc(method.__name__, "job", body)


def job_stream(
    method: Callable[[JobService, JobReq, Identity, str], AsyncGenerator[Resp, None]],
) -> Callable[[JobService, JobReq, Any], AsyncIterator[Resp]]:
    """A server-streaming RPC on the job ``request.id`` names, authorized as :func:`job_rpc`."""

    def body(self: JobService, request: JobReq, who: Identity) -> AsyncGenerator[Resp, None]:
        # The method's own generator, not one wrapped around it: every layer costs each
        # message of a stream a step (docs/benchmarks.md (j)).
        return method(self, request, who, self.authorize(who, request.id))

    return _stream_rpc(method.__name__, "job", body)


Start = TypeVar("Start", bound=_NamesJob)


def job_bidi(
    method: Callable[
        [JobService, Start, AsyncIterator[Any], Identity, str], AsyncGenerator[Resp, None]
    ],
) -> Callable[[JobService, AsyncIterator[Any], Any], AsyncIterator[Resp]]:
    """A bidirectional RPC whose first request (``start``) names the job: resolved and
    authorized here, as :func:`job_rpc` does, before ``method`` reads anything else.
    Any: the later requests are whatever the client sends, checked by ``method``."""

    async def body(
        self: JobService, requests: AsyncIterator[Any], who: Identity
    ) -> AsyncGenerator[Resp, None]:
        first = await anext(requests, None)
        _check_parsed(first)
        if first is None or first.WhichOneof("request") != "start":
            raise InvalidSpecError("the first request must be start, naming the job")
        job = self.authorize(who, first.start.id)
        async with contextlib.aclosing(method(self, first.start, requests, who, job)) as items:
            async for item in items:
                yield item

    return _stream_rpc(method.__name__, "job", body)


async def _until_shutdown(service: JobService, items: AsyncIterator[Resp]) -> AsyncIterator[Resp]:
    """``items``, until the server shuts down; then UNAVAILABLE, which tells a client to
    reconnect (a follower waiting for output would otherwise hold shutdown up for its whole
    grace).

    A stream waiting for its next item is cancelled there by :meth:`JobService.shut_down`;
    one that is sending checks on its way back. Racing every item against shutdown in a
    task of its own, as this did before, cost a task and an ``asyncio.wait`` per message:
    a third of what a follower cost the server (docs/benchmarks.md (j)).
    """
    task = asyncio.current_task()
    assert task is not None  # noqa: S101 - gRPC runs every handler in a task of its own
    waiting = service.waiting
    while True:
        if service.shutting_down.is_set():
            raise _shutting_down()
        waiting.add(task)
        try:
            item = await anext(items)
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            if not service.shutting_down.is_set():
                raise  # the client went away
            # The cancel was shutdown's own: the call ends with a status, not cancelled.
            task.uncancel()
            raise _shutting_down() from None
        finally:
            waiting.discard(task)
        yield item


def _shutting_down() -> ApiError:
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; reconnect to continue (output is kept)",
    )


class JobService:
    """The jobworker.v1.JobService methods, registered by :func:`add_to_server` (not a
    subclass of the generated servicer: two methods return pre-serialized bytes)."""

    def __init__(
        self,
        runtime: Runtime,
        auth: Authenticator,
        limits: ServiceLimits,
        metrics: ServiceMetrics | None = None,
        identity: ServerIdentity | None = None,
    ) -> None:
        self.runtime = runtime
        self.auth = auth
        self.identity = identity or ServerIdentity()
        self._limits = limits
        self.metrics: ServiceMetrics = metrics or NoMetrics()
        self._streams: Counter[str] = Counter()
        # Set while no output or watch stream is open (so a test, or shutdown, can wait).
        self.no_streams = asyncio.Event()
        self.no_streams.set()
        # Set at shutdown (shut_down): every open stream then ends with UNAVAILABLE.
        self.shutting_down = asyncio.Event()
        # The streams' tasks while they wait for their next item (_until_shutdown).
        self.waiting: set[asyncio.Task[object]] = set()
        # The last batch encoded whole into one message, and that message (_messages).
        self._encoded_batch: Batch | None = None
        self._encoded = b""
        # job id -> (the status last listed, its serialized Job message)
        self._serialized: dict[str, tuple[JobStatus, bytes]] = {}

    def shut_down(self) -> None:
        """End every open stream with UNAVAILABLE: those waiting for their next item now,
        the others once they have sent the one in hand."""
        self.shutting_down.set()
        for task in list(self.waiting):
            task.cancel()

    @property
    def active_streams(self) -> int:
        return sum(self._streams.values())

    def authorize(self, who: Identity, raw_id: str) -> str:
        """The canonical id of the job ``raw_id`` names, if the caller may reach it.

        Raises:
            InvalidSpecError: not a job id.
            JobNotFoundError: no such job, or another user's (the same answer).
        """
        return authorize_job(who, raw_id, self.runtime.owner_of)

    @contextlib.contextmanager
    def _stream_slot(self, who: Identity) -> Iterator[None]:
        if self._streams[who.name] >= self._limits.max_streams_per_user:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{who.name} already has {self._limits.max_streams_per_user} open streams "
                "(the server's limit); close some first",
            )
        self._streams[who.name] += 1
        self.no_streams.clear()
        self.metrics.stream_opened()
        try:
            yield
        finally:
            self.metrics.stream_closed()
            self._streams[who.name] -= 1
            if not self._streams[who.name]:
                del self._streams[who.name]
            if not self._streams:
                self.no_streams.set()

    async def _create(self, spec: pb.JobSpec, who: Identity, *, start: bool) -> JobStatus:
        runtime_spec = spec_from_pb(spec, who.name)
        cap = self._limits.max_active_jobs_per_user
        if not start:
            return await self.runtime.create(runtime_spec, max_active=cap)
        started = time.perf_counter()
        status = await self.runtime.create(runtime_spec, start=True, max_active=cap)
        self.metrics.job_start(time.perf_counter() - started, status)
        return status

    @caller_rpc
    async def CreateJob(self, request: pb.CreateJobRequest, who: Identity) -> pb.Job:
        return job_to_pb(await self._create(request.spec, who, start=request.start))

    @job_rpc
    async def StartJob(self, _request: pb.JobRequest, _who: Identity, job: str) -> pb.Job:
        started = time.perf_counter()
        status = await self.runtime.start(job)
        self.metrics.job_start(time.perf_counter() - started, status)
        return job_to_pb(status)

    @caller_rpc
    async def StartJobs(self, request: pb.StartJobsRequest, who: Identity) -> pb.StartJobsResponse:
        if len(request.specs) > self._limits.max_batch:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self._limits.max_batch} commands per call; split the batch",
            )
        results = []
        for spec in request.specs:
            try:
                status = await self._create(spec, who, start=True)
            except Exception as e:  # noqa: BLE001 - each spec gets its own mapped result
                code, message = to_status(e)
                results.append(
                    pb.StartJobResult(error=pb.ErrorStatus(code=code.value[0], message=message))
                )
            else:
                results.append(pb.StartJobResult(job=job_to_pb(status)))
        return pb.StartJobsResponse(results=results)

    @job_rpc
    async def StopJob(self, request: pb.StopJobRequest, _who: Identity, job: str) -> pb.Job:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        return job_to_pb(await self.runtime.stop(job, grace))

    @job_rpc
    async def SignalJob(self, request: pb.SignalJobRequest, _who: Identity, job: str) -> pb.Job:
        await self.runtime.signal(job, request.signal)
        return job_to_pb(await self.runtime.status(job))

    @job_rpc
    async def GetJob(self, _request: pb.JobRequest, _who: Identity, job: str) -> pb.Job:
        return job_to_pb(await self.runtime.status(job))

    @job_rpc
    async def WaitJob(self, _request: pb.JobRequest, _who: Identity, job: str) -> pb.Job:
        return job_to_pb(await self.runtime.wait(job))

    @job_rpc
    async def RemoveJob(self, _request: pb.JobRequest, _who: Identity, job: str) -> pb.Job:
        status = await self.runtime.status(job)
        await self.runtime.remove(job)
        return job_to_pb(status)

    # Returns wire bytes, not a message: see add_to_server.
    @caller_rpc
    async def ListJobs(self, request: pb.ListJobsRequest, who: Identity) -> bytes:
        """A serialized ListJobsResponse. A status never changes (a job gets a new one at
        each change), so each is serialized once and reused until the job changes: listing
        10,000 ended jobs then costs a join, not 10,000 protobuf conversions."""
        owner = list_filter(who, request.owner)
        selector = _selector(request.selector)
        statuses = await self.runtime.jobs(owner=owner)
        if selector:
            statuses = [s for s in statuses if selector.matches(s.labels)]
        cache = self._serialized
        encoded = []
        for status in statuses:
            hit = cache.get(status.id)
            if hit is None or hit[0] is not status:
                hit = (status, job_to_pb(status).SerializeToString())
                cache[status.id] = hit
            encoded.append(hit[1])
        if len(cache) > 2 * max(len(statuses), 1000):
            # Forget deleted jobs (rarely: only once the cache has doubled).
            for gone in [j for j in cache if self.runtime.owner_of(j) is None]:
                del cache[gone]
        return encode_list_response(encoded)

    @caller_rpc
    async def GetServerInfo(self, _request: pb.ServerInfoRequest, who: Identity) -> pb.ServerInfo:
        runtime = self.runtime
        default, maximum = runtime.timeouts
        jobs = await runtime.jobs(list_filter(who, ""))
        return pb.ServerInfo(
            version=__version__,
            caller=who.name,
            role=who.role.value,
            default_timeout_seconds=default,
            max_timeout_seconds=maximum,
            name=self.identity.name,
            labels=dict(self.identity.labels),
            cgroups=runtime.cgroup_kind or "",
            features=list(runtime.features),
            cpus=len(os.sched_getaffinity(0)),
            memory_bytes=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
            running_jobs=sum(1 for j in jobs if j.state is State.RUNNING),
            jobs=len(jobs),
        )

    @caller_stream
    async def WatchJobs(
        self, request: pb.WatchJobsRequest, who: Identity
    ) -> AsyncGenerator[pb.JobEvent, None]:
        owner = list_filter(who, request.owner)
        selector = _selector(request.selector)

        def wants(status: JobStatus) -> bool:
            return (owner is None or status.owner == owner) and selector.matches(status.labels)

        changes = self.runtime.changes(wants, existing=request.existing)
        async with contextlib.aclosing(changes) as batches:
            if request.existing:
                for change in await anext(batches):
                    yield pb.JobEvent(job=job_to_pb(change.status))
                yield pb.JobEvent(synced=True)
            async for batch in batches:
                for change in batch:
                    yield pb.JobEvent(job=job_to_pb(change.status), deleted=change.deleted)

    @job_rpc
    async def GetUsage(
        self, request: pb.UsageRequest, _who: Identity, job: str
    ) -> pb.UsageResponse:
        since, step = _usage_window(request)
        samples = await self.runtime.usage(job, since, step)
        return pb.UsageResponse(samples=[usage_to_pb(s) for s in samples])

    @caller_rpc
    async def ListUsage(self, request: pb.ListUsageRequest, who: Identity) -> pb.ListUsageResponse:
        recent = self.runtime.recent_usage(list_filter(who, request.owner))
        return pb.ListUsageResponse(
            jobs=[
                pb.JobUsage(id=job, samples=[usage_to_pb(s) for s in samples])
                for job, samples in recent.items()
            ]
        )

    @job_stream
    async def WatchUsage(
        self, request: pb.UsageRequest, _who: Identity, job: str
    ) -> AsyncGenerator[pb.UsageResponse, None]:
        since, _ = _usage_window(request)
        async with contextlib.aclosing(self.runtime.watch_usage(job, since)) as batches:
            async for batch in batches:
                yield pb.UsageResponse(samples=[usage_to_pb(s) for s in batch])

    @job_stream
    async def WatchJob(
        self, _request: pb.JobRequest, _who: Identity, job: str
    ) -> AsyncGenerator[pb.Job, None]:
        async with contextlib.aclosing(self.runtime.watch(job)) as changes:
            async for change in changes:
                yield job_to_pb(change)

    # Yields wire bytes, not messages: see add_to_server.
    @job_stream
    async def StreamOutput(
        self, request: pb.OutputRequest, _who: Identity, job: str
    ) -> AsyncGenerator[bytes, None]:
        """Serialized OutputResponse messages (see ``_wire``; registered without a
        serializer by :func:`add_to_server`)."""
        batches = self._batches(
            job, request.streams, follow=request.follow, window=_window(request)
        )
        async with contextlib.aclosing(batches) as reader:
            async for batch in reader:
                for message in self._messages(batch):
                    yield message

    # Yields wire bytes, not messages: see add_to_server.
    @caller_stream
    async def RunJob(self, request: pb.RunJobRequest, who: Identity) -> AsyncGenerator[bytes, None]:
        """Serialized RunJobResponse messages: the job as started, its output, its end."""
        _check_streams(request.streams)  # before the job exists: a bad request runs nothing
        status = await self._create(request.spec, who, start=True)
        _CALL.get().job = status.id
        yield encode_field(1, job_to_pb(status).SerializeToString())
        if status.started_at is None:
            return  # it could not be started: no output, and the first response says why
        batches = self._batches(status.id, request.streams, follow=True, window=None)
        async with contextlib.aclosing(batches) as reader:
            async for batch in reader:
                for message in self._messages(batch):
                    yield encode_field(2, message)
        yield encode_field(3, job_to_pb(await self.runtime.wait(status.id)).SerializeToString())

    def _batches(
        self, job: str, selector: int, *, follow: bool, window: Window | None
    ) -> AsyncGenerator[Batch, None]:
        """The job's output in batches, of the streams ``selector`` (an OutputSelector)
        picks.

        Raises:
            InvalidSpecError: ``selector`` is not an OutputSelector.
        """
        _check_streams(selector)
        return self.runtime.output_batches(
            job,
            stdout=selector != pb.OUTPUT_SELECTOR_STDERR,
            stderr=selector != pb.OUTPUT_SELECTOR_STDOUT,
            follow=follow,
            window=window,
        )

    def _messages(self, batch: Batch) -> Iterator[bytes]:
        """A batch as OutputResponse messages of at most about MESSAGE_BYTES each."""
        chunks, offset = batch
        if batch is self._encoded_batch:
            # The followers of one job at the same offset get the same batch (the runtime's
            # shared reads); it is encoded once for all of them.
            message = self._encoded
            self.metrics.streamed(len(message))
            yield message
            return
        start = size = 0
        for i, chunk in enumerate(chunks):
            if i > start and size + len(chunk.data) > MESSAGE_BYTES:
                # Resuming here goes on with chunk i: what this message carries ends where
                # the record before it ends.
                message = encode_output_response(chunks[start:i], chunks[i - 1].end)
                self.metrics.streamed(len(message))
                yield message
                start, size = i, 0
            size += len(chunk.data)
        message = encode_output_response(chunks[start:], offset)
        if not start and len(message) <= _SHARED_MESSAGE_BYTES:
            self._encoded_batch, self._encoded = batch, message
        self.metrics.streamed(len(message))
        yield message

    # Yields wire bytes, not messages: see add_to_server.
    @job_bidi
    async def Attach(
        self, start: pb.AttachStart, requests: AsyncIterator[Any], who: Identity, job: str
    ) -> AsyncGenerator[bytes, None]:
        """Serialized AttachResponse messages: the output as it comes, then the final
        status; meanwhile the requests' input goes to the job's stdin."""
        runtime = self.runtime
        mode = runtime.input_mode(job) if start.stdin else None
        # "Only new output" starts here, before the resize below makes the job redraw.
        batches = runtime.output_batches(
            job,
            stdout=start.streams != pb.OUTPUT_SELECTOR_STDERR,
            stderr=start.streams != pb.OUTPUT_SELECTOR_STDOUT,
            follow=True,
            window=None if start.from_start else Window(offset=await runtime.output_end(job)),
        )
        fields = {"rpc": "Attach", "user": who.name, "job": job, "stdin": start.stdin}
        AUDIT.info("attach %s begins", job, extra={"fields": {**fields, "event": "begin"}})
        window = start.window
        if mode == "tty" and window.rows and window.cols:
            await runtime.resize(job, window.rows, window.cols, redraw=True)
        feeding = asyncio.ensure_future(
            _feed(requests, _JobInput(runtime, job), sends_input=start.stdin)
        )
        feeding.add_done_callback(_retrieved)
        try:
            yield _ATTACHED
            async with contextlib.aclosing(_while_feeding(batches, feeding)) as reader:
                async for batch in reader:
                    for message in self._messages(batch):
                        yield encode_field(1, message)
            final = await runtime.wait(job)
            yield encode_field(2, job_to_pb(final).SerializeToString())
            # Let the client stop sending before the call ends: a write of its that fails
            # because the call is over would fail its reads too, the status included.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(feeding), _FINISH_SENDING_S)
        finally:
            feeding.cancel()
            AUDIT.info("attach %s ends", job, extra={"fields": {**fields, "event": "end"}})

    @job_bidi
    async def Exec(
        self, start: pb.ExecStart, requests: AsyncIterator[Any], who: Identity, job: str
    ) -> AsyncGenerator[pb.ExecResponse, None]:
        """Start a process inside the job; its output as it comes, then how it ended;
        meanwhile the requests' input, resizes and signals go to it."""
        spec = exec_spec_from_pb(start)
        fields: dict[str, object] = {
            "rpc": "Exec",
            "user": who.name,
            "job": job,
            "argv": list(spec.argv),
            "stdin": spec.stdin,
            "tty": spec.tty,
        }
        try:
            process = await self.runtime.exec(job, spec)
        except ExecFailedError as e:
            AUDIT.info("exec in %s failed", job, extra={"fields": {**fields, "event": "failed"}})
            yield pb.ExecResponse(ended=pb.ExecEnd(error=str(e), reason=e.reason))
            return
        AUDIT.info("exec in %s begins", job, extra={"fields": {**fields, "event": "begin"}})
        feeding = asyncio.ensure_future(
            _feed(requests, _ProcessInput(process), sends_input=spec.stdin)
        )
        feeding.add_done_callback(_retrieved)
        ended: dict[str, object] = {}
        try:
            yield pb.ExecResponse(started=True)
            async with contextlib.aclosing(_while_feeding(_exec_output(process), feeding)) as out:
                async for chunk in out:
                    yield pb.ExecResponse(output=pb.OutputResponse(chunks=[chunk]))
            status = await process.wait()
            end = pb.ExecEnd(exit_code=status) if status >= 0 else pb.ExecEnd(signal=-status)
            ended = {"exit_code": end.exit_code} if status >= 0 else {"signal": end.signal}
            yield pb.ExecResponse(ended=end)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(feeding), _FINISH_SENDING_S)
        finally:
            feeding.cancel()
            process.close()
            AUDIT.info(
                "exec in %s ends", job, extra={"fields": {**fields, **ended, "event": "end"}}
            )


def _retrieved(task: asyncio.Future[None]) -> None:
    """An input side's failure is raised through the output side (``_while_feeding``), or
    was moot (the call was over); either way it is not "never retrieved", even when it
    ends only after the call did."""
    if not task.cancelled():
        task.exception()


class _Input(Protocol):
    """Where an Attach's or an Exec's later requests go."""

    async def write(self, data: bytes) -> bool: ...
    async def close_stdin(self) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def signal(self, signum: int) -> None: ...


class _JobInput:
    """An attached job's stdin, terminal and signals.

    Raises (each call):
        NoStdinError: the job reads no input.
        JobEndedError: its stdin was closed (EOF sent) while it runs.
    """

    def __init__(self, runtime: Runtime, job: str) -> None:
        self._runtime, self._job = runtime, job

    async def write(self, data: bytes) -> bool:
        return await self._ended_is_false(self._runtime.write_stdin(self._job, data))

    async def close_stdin(self) -> None:
        await self._ended_is_false(self._runtime.close_stdin(self._job))

    async def resize(self, rows: int, cols: int) -> None:
        await self._ended_is_false(self._runtime.resize(self._job, rows, cols))

    async def signal(self, signum: int) -> None:
        await self._ended_is_false(self._runtime.signal(self._job, signum))

    async def _ended_is_false(self, step: Awaitable[object]) -> bool:
        """``step``'s outcome; False (not an error) once the job has ended."""
        try:
            return await step is not False
        except JobEndedError:
            if not (await self._runtime.status(self._job)).state.is_final:
                raise  # its stdin was closed (EOF sent) while it runs
            return False


class _ProcessInput:
    """An exec'd process's stdin, terminal and signals."""

    def __init__(self, process: ExecProcess) -> None:
        self._process = process

    async def write(self, data: bytes) -> bool:
        return await self._process.write(data)

    async def close_stdin(self) -> None:
        await self._process.close_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        check_window(rows, cols)
        self._process.resize(rows, cols)

    async def signal(self, signum: int) -> None:
        self._process.signal(check_signal(signum))


async def _feed(requests: AsyncIterator[Any], sink: _Input, *, sends_input: bool) -> None:
    """Hand an Attach's or an Exec's later requests to ``sink``, until the client stops
    sending. Once the input's reader no longer reads (it closed its stdin, or ended), what
    comes is read and dropped, as ssh does, so the client is never left blocked on a write.

    Raises:
        InvalidSpecError: a malformed request, a second start, or input from a client that
            did not say it sends any.
        (from ``sink``) why the input cannot be taken.
    """
    reading = True
    async for request in requests:
        _check_parsed(request)
        kind = request.WhichOneof("request")
        if kind not in ("stdin", "close_stdin", "resize", "signal"):
            raise InvalidSpecError("only the first request may be start")
        if kind == "signal":
            await sink.signal(request.signal)
            continue
        if not sends_input:
            raise InvalidSpecError(
                "this call did not ask to send input (start.stdin); call again with it"
            )
        if not reading:
            continue
        if kind == "close_stdin":
            await sink.close_stdin()
        elif kind == "resize":
            await sink.resize(request.resize.rows, request.resize.cols)
        else:
            reading = await sink.write(request.stdin)


async def _exec_output(process: ExecProcess) -> AsyncGenerator[pb.OutputChunk, None]:
    while (piece := await process.read()) is not None:
        stream, data = piece
        yield pb.OutputChunk(stream=STREAMS[stream], data=data, time_unix_nano=time.time_ns())


# How long an attach whose job has ended waits for its client to stop sending input.
_FINISH_SENDING_S = 10.0
# The AttachResponse {attached: true} (field 3, varint 1).
_ATTACHED = b"\x18\x01"


Item = TypeVar("Item")


async def _while_feeding(
    batches: AsyncGenerator[Item, None], feeding: asyncio.Future[None]
) -> AsyncGenerator[Item, None]:
    """``batches``, failing as soon as ``feeding`` (the input side) fails, even while no
    output comes."""
    step: asyncio.Future[Item | None] | None = None
    async with contextlib.aclosing(batches) as reader:
        try:
            while True:
                if step is None:
                    step = asyncio.ensure_future(anext(reader, None))
                waits: set[asyncio.Future[Any]] = {step} if feeding.done() else {step, feeding}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if feeding.done() and (error := feeding.exception()) is not None:
                    raise error
                if not step.done():
                    continue
                batch, step = step.result(), None
                if batch is None:
                    return
                yield batch
        finally:
            # Before the reader is closed: it cannot be while a step is inside it.
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step


def _usage_window(request: pb.UsageRequest) -> tuple[int, int]:
    """(since, step) of a UsageRequest in nanoseconds.

    Raises:
        InvalidSpecError: a step that is not a positive number of seconds.
    """
    since = request.since_unix_nano if request.HasField("since_unix_nano") else 0
    step = 0
    if request.HasField("step_seconds"):
        if not 0 < request.step_seconds < 1e9:
            raise InvalidSpecError("step must be a positive number of seconds, e.g. 60")
        step = int(request.step_seconds * 1e9)
    return since, step


def _selector(text: str) -> Selector:
    """Raises InvalidSpecError: the selector does not parse."""
    try:
        return parse_selector(text)
    except LabelError as e:
        raise InvalidSpecError(str(e)) from None


def _check_streams(selector: int) -> None:
    """Raises InvalidSpecError: ``selector`` is not an OutputSelector."""
    if selector not in (
        pb.OUTPUT_SELECTOR_BOTH,
        pb.OUTPUT_SELECTOR_STDOUT,
        pb.OUTPUT_SELECTOR_STDERR,
    ):
        raise InvalidSpecError(f"unknown output selector {selector}")


def _window(request: pb.OutputRequest) -> Window:
    """The part of the log an OutputRequest asks for.

    Raises:
        InvalidSpecError: it asks for both an offset and a tail.
    """
    offset = request.offset if request.HasField("offset") else None
    tail = request.tail_lines if request.HasField("tail_lines") else None
    if offset is not None and tail is not None:
        raise InvalidSpecError("give an offset to resume from or a number of lines, not both")
    return Window(
        offset=offset,
        tail_lines=tail,
        since_ns=request.since_unix_nano if request.HasField("since_unix_nano") else None,
        until_ns=request.until_unix_nano if request.HasField("until_unix_nano") else None,
    )


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
# Methods whose handler yields already-serialized messages.
PRESERIALIZED = frozenset({"StreamOutput", "ListJobs", "Attach", "RunJob"})


def add_to_server(service: JobService, server: grpc.aio.Server) -> None:
    """Register ``service``: as the generated helper does, from the proto's descriptor, but
    letting StreamOutput send the bytes it encoded itself."""
    descriptor = pb.DESCRIPTOR.services_by_name["JobService"]
    handlers = {}
    for method in descriptor.methods:
        if method.name not in RPC_SCOPES:
            # Every RPC goes through the authorization wrappers; one that does not is a bug.
            raise TypeError(f"RPC {method.name} is not declared with job_rpc or caller_rpc")
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=_lenient(request.FromString, method.input_type.name),
            response_serializer=None
            if method.name in PRESERIALIZED
            else response.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(descriptor.full_name, handlers)
