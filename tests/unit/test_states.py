"""The job state machine, alone."""

from __future__ import annotations

import itertools

import pytest

from jobworker.runtime import InvalidTransitionError, State
from jobworker.runtime._states import transition

ALLOWED = {
    (State.CREATED, State.RUNNING),
    (State.CREATED, State.FAILED),
    (State.RUNNING, State.EXITED),
    (State.RUNNING, State.STOPPED),
    (State.RUNNING, State.FAILED),
}


@pytest.mark.parametrize(("current", "new"), sorted(itertools.product(State, State)))
def test_only_documented_transitions_are_allowed(current: State, new: State) -> None:
    if (current, new) in ALLOWED:
        assert transition(current, new) is new
    else:
        with pytest.raises(InvalidTransitionError, match=f"from {current} to {new}"):
            transition(current, new)


def test_final_states() -> None:
    assert {s for s in State if s.is_final} == {State.EXITED, State.STOPPED, State.FAILED}
