"""The job state machine, kept apart from any I/O.

``created -> running -> exited | stopped | failed``, and ``created -> failed`` when the command
could not be started at all. Every change of a job's state goes through :func:`transition`.
"""

from __future__ import annotations

import enum

from ._errors import InvalidTransitionError

__all__ = ["State", "transition"]


class State(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({State.EXITED, State.STOPPED, State.FAILED})

_ALLOWED: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.RUNNING, State.FAILED}),
    State.RUNNING: _FINAL,
    State.EXITED: frozenset(),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}


def transition(current: State, new: State) -> State:
    """Return ``new`` if the machine allows ``current -> new``.

    Raises:
        InvalidTransitionError: the transition is not allowed (e.g. exited -> running).
    """
    if new not in _ALLOWED[current]:
        raise InvalidTransitionError(f"a job cannot go from {current} to {new}")
    return new
