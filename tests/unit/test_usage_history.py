"""A job's usage history on disk: bounded, merged, thinned (no cgroup needed)."""

from __future__ import annotations

from pathlib import Path

from jobworker.runtime import Sample
from jobworker.runtime._usage import MAX_POINTS, UsageHistory, merge_pairs, thin

MIB = 1 << 20


def _sample(t: int, memory: int = 0, cpu: float = 0.0, pids: int = 1) -> Sample:
    return Sample(t, cpu, memory, 0, 0, pids)


def test_a_week_at_one_second_keeps_a_few_thousand_points_and_every_peak(tmp_path: Path) -> None:
    history = UsageHistory(str(tmp_path))
    week = 7 * 86400
    peak_at = 1234
    for t in range(week):  # ~8 s: each append opens, checks and writes the file
        history.append(_sample(t, memory=999 * MIB if t == peak_at else MIB, cpu=t / 2))
    samples = history.samples()
    assert len(samples) <= MAX_POINTS
    assert samples[-1] == _sample(week - 1, MIB, cpu=(week - 1) / 2)  # the newest, exact
    assert [s.time_ns for s in samples] == sorted(s.time_ns for s in samples)
    assert max(s.memory_bytes for s in samples) == 999 * MIB  # a peak is never averaged away
    # Totals stay totals: the last of each merged pair.
    assert all(s.cpu_seconds == s.time_ns / 2 for s in samples)


def test_merge_and_thin_keep_the_later_totals_and_the_larger_peaks() -> None:
    a, b, c = _sample(1, 5, 1.0, 2), _sample(2, 9, 2.0, 1), _sample(3, 1, 3.0, 7)
    assert merge_pairs([a, b, c]) == [_sample(2, 9, 2.0, 2), c]
    assert thin([a, b, c], since_ns=1) == [b, c]
    assert thin([a, b, c], step_ns=10) == [_sample(1, 9, 3.0, 7)]
