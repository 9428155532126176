"""The launch order and the supervisor's hand-made JSON read back as what was sent."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.runtime._jobdir import RunRecord
from jobworker.runtime._protocol import LaunchOrder, Report

# What a path can hold: anything UTF-8 can say but NUL.
paths = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1)
seconds = st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False)
orders = st.builds(
    LaunchOrder,
    job_dir=paths,
    output_limit=st.integers(min_value=0, max_value=2**63 - 1),
    stdin_mode=st.sampled_from(["none", "pipe", "tty"]),
    timeout_s=seconds,
    stop_grace=seconds,
    cgroup_procs=st.lists(paths, max_size=6).map(tuple),
)
runs = st.builds(
    RunRecord, *(st.integers(min_value=0, max_value=2**63 - 1) for _ in RunRecord._fields)
)


@given(orders)
def test_a_launch_order_decodes_to_what_was_encoded(order: LaunchOrder) -> None:
    assert LaunchOrder.decode(order.encode()) == order


@pytest.mark.parametrize("data", [b"", b"/job", b"/job\0many\0none\0\0", b"\xff\0" * 5])
def test_a_broken_launch_order_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each broken part raises its own text
        LaunchOrder.decode(data)


@given(runs)
def test_the_run_record_text_is_the_json_of_the_record(run: RunRecord) -> None:
    assert json.loads(run.json_bytes()) == run.to_json()
    assert RunRecord.from_json(json.loads(run.json_bytes())) == run


@given(runs)
def test_a_run_report_decodes_to_what_was_encoded(run: RunRecord) -> None:
    assert Report.decode(Report(run=run).encode()) == Report(run=run)
