"""The one place where errors become gRPC status codes."""

from __future__ import annotations

import logging
import secrets

import grpc

from ..runtime import (
    InvalidSpecError,
    JobEndedError,
    JobNotFoundError,
    JobNotRunningError,
    JobRunningError,
    JobworkerError,
    LaunchError,
    NotPermittedError,
    StateDirError,
)
from ._auth import AuthError

__all__ = ["ApiError", "to_status"]

log = logging.getLogger("jobworker.api")


class ApiError(Exception):
    """An expected refusal raised by the service itself, with its gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (JobNotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidSpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (JobEndedError, grpc.StatusCode.FAILED_PRECONDITION),
    (JobNotRunningError, grpc.StatusCode.FAILED_PRECONDITION),
    (JobRunningError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotPermittedError, grpc.StatusCode.PERMISSION_DENIED),
    (LaunchError, grpc.StatusCode.UNAVAILABLE),
    (StateDirError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def to_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``.

    Anything unexpected becomes INTERNAL with an opaque reference; the traceback goes to the
    server log under that reference, never to the client.
    """
    if isinstance(exc, ApiError):
        return exc.code, str(exc)
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    ref = secrets.token_hex(6)
    if isinstance(exc, JobworkerError):
        log.error("error ref=%s: %s", ref, exc, exc_info=exc)
    else:
        log.error("unexpected error ref=%s", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (reference {ref} in the server log)"
