"""The web console's calls: each is an RPC of the JobService, made in-process on behalf of
the browser's client certificate.

The console has no handlers of its own that decide anything: every page and action calls
the same service methods a gRPC client does, through the same wrappers, so the identity,
the one authorization rule, input validation, stream caps, the audit line and the mapping
of errors are the gRPC API's own, not a second implementation of them. What differs is
only the transport: the certificate comes from the HTTPS connection and a refusal comes
back as :class:`CallRefusedError` instead of a gRPC status.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from ._service import PRESERIALIZED, JobService

__all__ = ["CallRefusedError", "Caller"]

M = TypeVar("M", bound=Message)


class CallRefusedError(Exception):
    """The service refused the call: its gRPC code and its one-line message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Context:
    """What the service's wrappers ask of a grpc.aio context, for a browser's call."""

    __slots__ = ("_peer", "_pem")

    def __init__(self, pem: bytes, peer: str) -> None:
        self._pem = pem
        self._peer = peer

    def auth_context(self) -> dict[str, list[bytes]]:
        # As gRPC reports a verified peer: the PEM the TLS layer checked against the CA.
        return {"x509_pem_cert": [self._pem]} if self._pem else {}

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise CallRefusedError(code, message)


class Caller:
    """The JobService, as one browser connection's certificate calls it."""

    def __init__(self, service: JobService, pem: bytes, peer: str) -> None:
        self._service = service
        self._context = _Context(pem, peer)

    async def unary(self, method: str, request: Message, reply: type[M]) -> M:
        """The reply of the unary RPC ``method``.

        Raises:
            CallRefusedError: the service refused it (not found, not permitted, invalid, ...).
        """
        # Any: the handlers are looked up by name, as gRPC itself does.
        handler: Any = getattr(self._service, method)
        response = await handler(request, self._context)
        return _as(reply, method, response)

    async def stream(
        self, method: str, request: Message, reply: type[M]
    ) -> AsyncGenerator[M, None]:
        """The replies of the server-streaming RPC ``method``, as they come.

        Raises:
            CallRefusedError: the service refused it, at the start or on the way.
        """
        handler: Any = getattr(self._service, method)  # Any: looked up by name, as above
        async with contextlib.aclosing(handler(request, self._context)) as replies:
            async for response in replies:
                yield _as(reply, method, response)


def _as(reply: type[M], method: str, response: object) -> M:
    if method in PRESERIALIZED:
        assert isinstance(response, bytes)  # noqa: S101 - the service's own contract
        return reply.FromString(response)
    assert isinstance(response, reply)  # noqa: S101 - the service's own contract
    return response
