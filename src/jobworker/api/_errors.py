"""The one place where errors become gRPC status codes."""

from __future__ import annotations

import logging
import secrets

import grpc

from ..runtime import (
    ExecFailedError,
    InvalidSpecError,
    InvalidTransitionError,
    JobAlreadyStartedError,
    JobEndedError,
    JobNotFoundError,
    JobNotRunningError,
    JobRunningError,
    JobworkerError,
    LaunchError,
    NameTakenError,
    NoStdinError,
    NotPermittedError,
    QuotaError,
    RuntimeClosedError,
    StateDirError,
    WatcherBehindError,
)
from ..runtime.cgroups import CgroupError
from ._auth import AuthError

__all__ = ["CODES", "ApiError", "to_status"]

log = logging.getLogger("jobworker.api")


class ApiError(Exception):
    """An expected refusal raised by the service itself, with its gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# Every runtime error class has a deliberate code here (a test checks it); None means
# "a bug, never the caller's doing": INTERNAL with a reference to the server log.
CODES: dict[type[Exception], grpc.StatusCode | None] = {
    AuthError: grpc.StatusCode.UNAUTHENTICATED,
    JobNotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidSpecError: grpc.StatusCode.INVALID_ARGUMENT,
    JobAlreadyStartedError: grpc.StatusCode.FAILED_PRECONDITION,
    JobEndedError: grpc.StatusCode.FAILED_PRECONDITION,
    JobNotRunningError: grpc.StatusCode.FAILED_PRECONDITION,
    JobRunningError: grpc.StatusCode.FAILED_PRECONDITION,
    NotPermittedError: grpc.StatusCode.PERMISSION_DENIED,
    NameTakenError: grpc.StatusCode.ALREADY_EXISTS,
    NoStdinError: grpc.StatusCode.FAILED_PRECONDITION,
    # Exec reports it as the process's end (its reason), not as an error; anywhere else
    # it is the command that cannot run here.
    ExecFailedError: grpc.StatusCode.FAILED_PRECONDITION,
    LaunchError: grpc.StatusCode.UNAVAILABLE,
    RuntimeClosedError: grpc.StatusCode.UNAVAILABLE,
    StateDirError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QuotaError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WatcherBehindError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # The runtime wraps cgroup failures of a launch in LaunchError; a bare one is a bug.
    CgroupError: None,
    InvalidTransitionError: None,
    JobworkerError: None,
}


def to_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``.

    Anything unexpected becomes INTERNAL with an opaque reference; the traceback goes to the
    server log under that reference, never to the client.
    """
    if isinstance(exc, ApiError):
        return exc.code, str(exc)
    for kind in type(exc).__mro__:
        code = CODES.get(kind)
        if code is not None:
            return code, str(exc)
        if kind in CODES:
            break
    ref = secrets.token_hex(6)
    if isinstance(exc, JobworkerError):
        log.error("error ref=%s: %s", ref, exc, exc_info=exc)
    else:
        log.error("unexpected error ref=%s", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (reference {ref} in the server log)"
