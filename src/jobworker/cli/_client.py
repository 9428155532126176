"""jobctl's connection to the server: one place that turns gRPC failures into one line."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import jobworker.api  # noqa: F401  # isort: skip  (TLS 1.3 only: before grpc)
import grpc
from google.protobuf.message import Message

from ..api._tls import TlsError, TlsFiles
from ..api.client import JobServiceStub, connect, pb
from ._config import Target
from ._tlsdiag import diagnose

__all__ = ["CliError", "Session", "explain", "pick", "session"]

MIN_PREFIX = 4
M = TypeVar("M", bound=Message)


class CliError(Exception):
    """Exit status 1 with this one-line message on stderr."""


def _tls_failure(error: grpc.aio.AioRpcError) -> bool:
    low = (error.details() or "").lower()
    return error.code() is grpc.StatusCode.UNAVAILABLE and any(
        word in low for word in ("handshake", "socket closed", "ssl", "tls", "verif")
    )


async def explain(error: grpc.aio.AioRpcError, target: Target) -> CliError:
    """One line naming the problem and what to check. A TLS failure is looked into (the
    files, and what the server presents), in a thread: it may take a connection attempt,
    and the event loop may be a connection keeper's, serving other commands."""
    found = await asyncio.to_thread(diagnose, target) if _tls_failure(error) else None
    return CliError(found) if found is not None else _explain(error, target)


def _explain(error: grpc.aio.AioRpcError, target: Target) -> CliError:  # noqa: PLR0911 - one return per diagnosis
    code, details = error.code(), error.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE:
        low = details.lower()
        if "connection refused" in low:
            return CliError(
                f"cannot connect to {target.server}: connection refused; is jobworkerd "
                "running there? (--server, JOBWORKER_SERVER)"
            )
        if "dns" in low or "resolv" in low or "lookup" in low:
            return CliError(
                f"cannot resolve the server name in {target.server!r}: check --server or "
                "JOBWORKER_SERVER"
            )
        if _tls_failure(error):
            return CliError(
                f"the TLS handshake with {target.server} failed: check that the server's "
                f"certificate is signed by {target.ca}, and that {target.cert} is signed by "
                "the server's CA, not expired and not revoked"
            )
        return CliError(f"cannot reach {target.server}: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(
            f"{target.server} did not answer within {target.timeout:g} s: is it a jobworkerd, "
            "and reachable? (--timeout to wait longer)"
        )
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"the server rejected your certificate {target.cert}: {details}")
    return CliError(details or code.name.lower())


class Session:
    def __init__(self, channel: grpc.aio.Channel, target: Target) -> None:
        self.channel = channel
        self.stub = JobServiceStub(channel)
        self.target = target

    async def call(
        self, method: str, reply: type[M], request: Message, *, waits: bool = False
    ) -> M:
        """The unary RPC ``method``, whose reply is a ``reply``; ``waits`` for calls that last
        as long as the job (wait, stop).

        Raises:
            CliError: the call failed (one line saying what to check).
        """
        try:
            response = await getattr(self.stub, method)(
                request, timeout=None if waits else self.target.timeout
            )
        except grpc.aio.AioRpcError as e:
            raise await explain(e, self.target) from None
        if not isinstance(response, reply):
            raise CliError(f"the server answered {method} with an unexpected message")
        return response

    async def resolve(self, ref: str) -> str:
        """A full job id from an id or a unique prefix of at least 4 characters.

        Raises:
            CliError: no job, or more than one, matches.
        """
        if len(ref) == 36:
            return ref
        if len(ref) < MIN_PREFIX:
            raise CliError(f"job id prefix {ref!r} is too short: give at least 4 characters")
        jobs = await self.call("ListJobs", pb.ListJobsResponse, pb.ListJobsRequest())
        return pick(ref, [j.id for j in jobs.jobs])


def pick(ref: str, ids: list[str]) -> str:
    matches = [i for i in ids if i.startswith(ref.lower())]
    if not matches:
        raise CliError(f"no job matches {ref!r}")
    if len(matches) > 1:
        shown = ", ".join(m[:12] for m in matches[:5])
        raise CliError(f"job id prefix {ref!r} is ambiguous: it matches {shown}; give more")
    return matches[0]


@contextlib.asynccontextmanager
async def session(target: Target) -> AsyncIterator[Session]:
    try:
        channel = connect(target.server, TlsFiles(target.ca, target.cert, target.key))
    except TlsError as e:
        raise CliError(f"{e} (--ca/--cert/--key or JOBWORKER_CA/CERT/KEY)") from e
    async with channel:
        yield Session(channel, target)
