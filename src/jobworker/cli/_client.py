"""jobctl's connection to the server: one place that turns gRPC failures into one line."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
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


def no_answer(target: Target) -> CliError:
    """The server took longer than ``target.timeout`` to answer."""
    return CliError(
        f"{target.server} did not answer within {target.timeout:g} s: is it a jobworkerd, "
        "and reachable? (--timeout to wait longer)"
    )


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
        return no_answer(target)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"the server rejected your certificate {target.cert}: {details}")
    return CliError(details or code.name.lower())


class Session:
    def __init__(self, channel: grpc.aio.Channel, target: Target) -> None:
        self.channel = channel
        self.stub = JobServiceStub(channel)
        self.target = target
        # The caller's jobs, listed once per command to resolve prefixes and names.
        self._listing: asyncio.Future[list[pb.Job]] | None = None

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
        """A full job id from an id, a unique prefix of at least 4 characters, or a name
        (the id wins when both match).

        Raises:
            CliError: no job, or more than one, matches.
        """
        if not ref:
            raise CliError("an empty job name; give a job's id, id prefix or name")
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            pass
        if self._listing is None:
            # One listing for every name in the command (stop A B C resolves concurrently).
            self._listing = asyncio.ensure_future(self._jobs())
        return pick(ref, await asyncio.shield(self._listing))

    async def _jobs(self) -> list[pb.Job]:
        return list((await self.call("ListJobs", pb.ListJobsResponse, pb.ListJobsRequest())).jobs)


def pick(ref: str, jobs: list[pb.Job]) -> str:
    """The id of the one job ``ref`` names: as an id prefix first, then as a name.

    Raises:
        CliError: none matches, or several do.
    """
    if len(ref) >= MIN_PREFIX:
        matches = [j.id for j in jobs if j.id.startswith(ref.lower())]
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = ", ".join(m[:12] for m in matches[:5])
            raise CliError(f"job id prefix {ref!r} is ambiguous: it matches {shown}; give more")
    named = [j for j in jobs if j.name == ref]
    if len(named) == 1:
        return named[0].id
    if named:
        owners = ", ".join(sorted({j.owner for j in named}))
        raise CliError(f"jobs of {owners} are all named {ref!r}; give the id instead")
    if len(ref) < MIN_PREFIX:
        raise CliError(f"no job is named {ref!r} (an id prefix needs at least 4 characters)")
    raise CliError(f"no job matches {ref!r} (by id or name)")


@contextlib.asynccontextmanager
async def session(target: Target) -> AsyncIterator[Session]:
    try:
        channel = connect(target.server, TlsFiles(target.ca, target.cert, target.key))
    except TlsError as e:
        raise CliError(f"{e} (--ca/--cert/--key or JOBWORKER_CA/CERT/KEY)") from e
    async with channel:
        yield Session(channel, target)
