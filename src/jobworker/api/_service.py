"""The JobService: each RPC authenticates, authorizes, validates, then calls the runtime.

Every handler goes through :func:`_unary` or :func:`_streaming`, which identify the caller
from its certificate and turn any exception into a status in one place (``_errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from ..identity import Identity
from ..runtime import InvalidSpecError, JobNotFoundError, JobStatus, Runtime
from ._auth import Authenticator, may_access
from ._config import ServiceLimits
from ._convert import job_id, job_to_pb, spec_from_pb
from ._errors import ApiError, to_status
from ._logs import AUDIT
from ._proto import jobworker_pb2 as pb
from ._proto import jobworker_pb2_grpc as pb_grpc
from ._wire import encode_list_response, encode_output_response

__all__ = ["JobService", "NoMetrics", "ServiceMetrics", "add_to_server"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Chunks of one read are sent together, up to this many bytes per message (the client's
# default receive limit is 4 MiB; a log record is at most 1 MiB).
MESSAGE_BYTES = 2 * 1024 * 1024


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

    __slots__ = ("job", "method", "metrics", "peer", "started", "who")

    def __init__(self, method: str, request: Any, context: Any, metrics: ServiceMetrics) -> None:
        self.method = method
        # Read now: grpcio crashes (SIGSEGV) reading the peer of a call the client cancelled.
        self.peer: str = context.peer()
        self.metrics = metrics
        self.job: str = getattr(request, "id", "")
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
        if message:
            fields["error"] = message
        AUDIT.info("rpc %s %s", self.method, name, extra={"fields": fields})


def _job_of(response: object) -> str:
    if isinstance(response, pb.Job):
        return response.id
    if isinstance(response, pb.StartJobsResponse):
        return ",".join(r.job.id for r in response.results if r.HasField("job"))
    return ""


def _unary(
    method: Callable[[JobService, Req, Identity], Awaitable[Resp]],
) -> Callable[[JobService, Req, Any], Awaitable[Resp]]:
    @functools.wraps(method)
    async def handler(self: JobService, request: Req, context: Any) -> Resp:
        call = _Call(method.__name__, request, context, self.metrics)
        try:
            call.who = self.auth.identify(context)
            response = await method(self, request, call.who)
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

    return handler


def _streaming(
    method: Callable[[JobService, Req, Identity], AsyncGenerator[Resp, None]],
) -> Callable[[JobService, Req, Any], AsyncIterator[Resp]]:
    @functools.wraps(method)
    async def handler(self: JobService, request: Req, context: Any) -> AsyncIterator[Resp]:
        call = _Call(method.__name__, request, context, self.metrics)
        try:
            call.who = self.auth.identify(context)
            with self._stream_slot(call.who):
                async with contextlib.aclosing(method(self, request, call.who)) as items:
                    async for item in _until_shutdown(self.shutting_down, items):
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

    return handler


async def _until_shutdown(stop: asyncio.Event, items: AsyncIterator[Resp]) -> AsyncIterator[Resp]:
    """``items``, until ``stop`` is set; then UNAVAILABLE, which tells a client to reconnect
    (a follower waiting for output would otherwise hold shutdown up for its whole grace)."""
    stopping = asyncio.ensure_future(stop.wait())
    step: asyncio.Future[Resp] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise ApiError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; reconnect to continue (output is kept)",
                )
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stopping.cancel()
        # Shutdown, or the client went away while we waited: the read in flight goes too.
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step


class JobService(pb_grpc.JobServiceServicer):
    def __init__(
        self,
        runtime: Runtime,
        auth: Authenticator,
        limits: ServiceLimits,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.auth = auth
        self._limits = limits
        self.metrics: ServiceMetrics = metrics or NoMetrics()
        self._streams: Counter[str] = Counter()
        # Set while no output or watch stream is open (so a test, or shutdown, can wait).
        self.no_streams = asyncio.Event()
        self.no_streams.set()
        # Set at shutdown: every open stream then ends with UNAVAILABLE.
        self.shutting_down = asyncio.Event()
        # job id -> (the status last listed, its serialized Job message)
        self._serialized: dict[str, tuple[JobStatus, bytes]] = {}

    @property
    def active_streams(self) -> int:
        return sum(self._streams.values())

    @contextlib.contextmanager
    def _stream_slot(self, who: Identity) -> Any:
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

    async def _visible(self, who: Identity, raw_id: str) -> JobStatus:
        """The job's status, if the caller may see it; otherwise exactly "not found"."""
        jid = job_id(raw_id)
        status = await self.runtime.status(jid)
        if not may_access(who, status.owner):
            raise JobNotFoundError(jid)
        return status

    async def _create(self, spec: pb.JobSpec, who: Identity, *, start: bool) -> JobStatus:
        runtime_spec = spec_from_pb(spec, who.name)
        workdir = runtime_spec.cwd
        if not await asyncio.to_thread(os.path.isdir, workdir):
            raise InvalidSpecError(f"working directory {workdir!r} does not exist on the server")
        active = sum(1 for s in await self.runtime.list(owner=who.name) if not s.state.is_final)
        if active >= self._limits.max_active_jobs_per_user:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{who.name} already has {active} jobs created or running (the server's "
                "limit); stop or wait for some first",
            )
        if not start:
            return await self.runtime.create(runtime_spec)
        started = time.perf_counter()
        status = await self.runtime.create(runtime_spec, start=True)
        self.metrics.job_start(time.perf_counter() - started, status)
        return status

    @_unary
    async def CreateJob(self, request: pb.CreateJobRequest, who: Identity) -> pb.Job:
        return job_to_pb(await self._create(request.spec, who, start=request.start))

    @_unary
    async def StartJob(self, request: pb.JobRequest, who: Identity) -> pb.Job:
        status = await self._visible(who, request.id)
        started = time.perf_counter()
        status = await self.runtime.start(status.id)
        self.metrics.job_start(time.perf_counter() - started, status)
        return job_to_pb(status)

    @_unary
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

    @_unary
    async def StopJob(self, request: pb.StopJobRequest, who: Identity) -> pb.Job:
        status = await self._visible(who, request.id)
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        return job_to_pb(await self.runtime.stop(status.id, grace))

    @_unary
    async def SignalJob(self, request: pb.SignalJobRequest, who: Identity) -> pb.Job:
        status = await self._visible(who, request.id)
        await self.runtime.signal(status.id, request.signal)
        return job_to_pb(await self.runtime.status(status.id))

    @_unary
    async def GetJob(self, request: pb.JobRequest, who: Identity) -> pb.Job:
        return job_to_pb(await self._visible(who, request.id))

    @_unary
    async def WaitJob(self, request: pb.JobRequest, who: Identity) -> pb.Job:
        status = await self._visible(who, request.id)
        return job_to_pb(await self.runtime.wait(status.id))

    @_unary
    async def RemoveJob(self, request: pb.JobRequest, who: Identity) -> pb.Job:
        status = await self._visible(who, request.id)
        await self.runtime.remove(status.id)
        return job_to_pb(status)

    # Returns wire bytes, not a message: see add_to_server.
    @_unary
    async def ListJobs(self, request: pb.ListJobsRequest, who: Identity) -> bytes:  # type: ignore[override]
        """A serialized ListJobsResponse. A status never changes (a job gets a new one at
        each change), so each is serialized once and reused until the job changes: listing
        10,000 ended jobs then costs a join, not 10,000 protobuf conversions."""
        owner = (request.owner or None) if who.is_admin else who.name
        statuses = await self.runtime.list(owner=owner)
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
            known = {s.id for s in await self.runtime.list()}
            for job_id in [j for j in cache if j not in known]:
                del cache[job_id]
        return encode_list_response(encoded)

    @_streaming
    async def WatchJob(self, request: pb.JobRequest, who: Identity) -> AsyncGenerator[pb.Job, None]:
        status = await self._visible(who, request.id)
        async with contextlib.aclosing(self.runtime.watch(status.id)) as changes:
            async for change in changes:
                yield job_to_pb(change)

    # Yields wire bytes, not messages: see add_to_server.
    @_streaming
    async def StreamOutput(  # type: ignore[override]
        self, request: pb.OutputRequest, who: Identity
    ) -> AsyncGenerator[bytes, None]:
        """Serialized OutputResponse messages (see ``_wire``; registered without a
        serializer by :func:`add_to_server`)."""
        status = await self._visible(who, request.id)
        selector = request.streams
        if selector not in (
            pb.OUTPUT_SELECTOR_BOTH,
            pb.OUTPUT_SELECTOR_STDOUT,
            pb.OUTPUT_SELECTOR_STDERR,
        ):
            raise InvalidSpecError(f"unknown output selector {selector}")
        batches = self.runtime.output_batches(
            status.id,
            stdout=selector != pb.OUTPUT_SELECTOR_STDERR,
            stderr=selector != pb.OUTPUT_SELECTOR_STDOUT,
            follow=request.follow,
        )
        async with contextlib.aclosing(batches) as reader:
            async for batch in reader:
                start = size = 0
                for i, chunk in enumerate(batch):
                    if i > start and size + len(chunk.data) > MESSAGE_BYTES:
                        message = encode_output_response(batch[start:i])
                        self.metrics.streamed(len(message))
                        yield message
                        start, size = i, 0
                    size += len(chunk.data)
                message = encode_output_response(batch[start:])
                self.metrics.streamed(len(message))
                yield message


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
# Methods whose handler yields already-serialized messages.
_PRESERIALIZED = frozenset({"StreamOutput", "ListJobs"})


def add_to_server(service: JobService, server: grpc.aio.Server) -> None:
    """Register ``service``: as the generated helper does, from the proto's descriptor, but
    letting StreamOutput send the bytes it encoded itself."""
    descriptor = pb.DESCRIPTOR.services_by_name["JobService"]
    handlers = {}
    for method in descriptor.methods:
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=request.FromString,
            response_serializer=None
            if method.name in _PRESERIALIZED
            else response.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(descriptor.full_name, handlers)
