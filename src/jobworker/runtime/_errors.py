"""The runtime's exceptions: one base, one subclass per condition a caller can act on."""

from __future__ import annotations

__all__ = [
    "ExecFailedError",
    "InvalidSpecError",
    "InvalidTransitionError",
    "JobAlreadyStartedError",
    "JobEndedError",
    "JobNotFoundError",
    "JobNotRunningError",
    "JobRunningError",
    "JobworkerError",
    "LaunchError",
    "NameTakenError",
    "NoStdinError",
    "NotPermittedError",
    "QuotaError",
    "RuntimeClosedError",
    "StateDirError",
    "WatcherBehindError",
]


class JobworkerError(Exception):
    """Base of every error the jobworker runtime raises on purpose."""


class InvalidSpecError(JobworkerError, ValueError):
    """A job spec, limit or argument is malformed; the message names the field and the fix."""


class JobNotFoundError(JobworkerError, LookupError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no such job: {job_id}")
        self.job_id = job_id


class InvalidTransitionError(JobworkerError):
    """The job's state machine refused a transition (a bug or a race, never user input)."""


class JobEndedError(JobworkerError):
    """The operation needs a job that has not ended, and this one has ("already exited...")."""


class JobAlreadyStartedError(JobworkerError):
    """The operation needs a job that has not been started, and this one has."""


class JobNotRunningError(JobworkerError):
    """The operation needs a running job, and this one has not started yet."""


class JobRunningError(JobworkerError):
    """The operation needs a job that is not running (e.g. deleting it); stop it first."""


class LaunchError(JobworkerError):
    """The launcher could not create the job's processes (not the user's command failing)."""


class NameTakenError(JobworkerError):
    """Another of the owner's jobs that still exists has this name."""


class ExecFailedError(JobworkerError):
    """A process could not be started inside a running job; ``reason`` is its kind, as a
    job's: "not_found", "not_executable" or "start_error"."""

    def __init__(self, message: str, reason: str = "start_error") -> None:
        super().__init__(message)
        self.reason = reason


class NoStdinError(JobworkerError):
    """Input was sent to a job whose stdin is /dev/null (stdin "none")."""


class NotPermittedError(JobworkerError):
    """The server's configuration does not allow this for this owner (e.g. host network)."""


class QuotaError(JobworkerError):
    """A per-owner cap of the server's is reached (e.g. jobs created or running)."""


class RuntimeClosedError(JobworkerError):
    """The runtime was closed; no new work is accepted."""


class StateDirError(JobworkerError):
    """The state dir cannot be written (e.g. the disk is full); the message names it."""


class WatcherBehindError(JobworkerError):
    """A watcher of all jobs fell too far behind the changes; it should watch again."""
