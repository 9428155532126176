"""The read budget every output reader shares (``_output.ReadBudget``)."""

from __future__ import annotations

import contextlib

from jobworker.runtime._output import BATCH, LEAST_BATCH, ReadBudget

MIB = 1 << 20


async def test_batches_shrink_as_readers_multiply_within_bounds() -> None:
    budget = ReadBudget(128 * MIB)
    sizes = {}
    with contextlib.ExitStack() as stack:
        for n in range(1, 3001):
            stack.enter_context(budget.reader())
            if n in (1, 32, 100, 1000, 3000):
                sizes[n] = budget.batch_bytes()
        assert budget.readers == 3000
        assert not budget.idle.is_set()
    assert sizes == {
        1: BATCH,
        32: BATCH,
        100: 128 * MIB // 100,
        1000: 128 * MIB // 1000,
        3000: LEAST_BATCH,
    }
    assert budget.readers == 0
    assert budget.idle.is_set()


async def test_memory_is_handed_back_only_after_a_crowd() -> None:
    """A lone follower's end costs nothing; the end of more readers than the budget holds
    full batches for hands the memory back, once."""
    calls: list[int] = []
    budget = ReadBudget(128 * MIB, on_idle=lambda: calls.append(1))
    for _ in range(5):
        with budget.reader():
            pass
    assert calls == []
    with contextlib.ExitStack() as stack:
        for _ in range(33):
            stack.enter_context(budget.reader())
    assert calls == [1]
    with budget.reader():
        pass
    assert calls == [1]
