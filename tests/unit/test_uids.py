"""Per-job uids: round robin, never two at once, and where a restart picks up."""

from __future__ import annotations

import pytest

from jobworker.runtime import NotPermittedError
from jobworker.runtime._uids import UidAllocator


def test_ids_come_round_robin_and_are_never_shared() -> None:
    uids = UidAllocator(1000, 1002)
    a, b = uids.take("a"), uids.take("b")
    uids.give_back(a)
    # Not the lowest free one: the next in turn, so a freed number comes back last.
    assert (a, b, uids.take("c")) == (1000, 1001, 1002)
    assert uids.take("d") == 1000
    with pytest.raises(NotPermittedError, match="all 3 job user ids are in use"):
        uids.take("e")


def test_a_restart_continues_past_the_newest_job_and_keeps_running_ones() -> None:
    uids = UidAllocator(1000, 1009)
    for uid in (1003, 1007, 1005):  # records read back, oldest first
        uids.seen(uid)
    uids.keep(1006, "still running")
    uids.seen(-1)  # a job created but never started has no uid yet
    assert uids.take("next") == 1007  # just past the newest job's 1005 (1006 is taken)
    assert uids.in_use == 2
