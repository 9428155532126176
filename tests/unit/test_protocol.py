"""The launch order and the supervisor's hand-made JSON read back as what was sent."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.runtime._jobdir import CgroupPaths, RunRecord
from jobworker.runtime._protocol import LaunchOrder, NextJob, Report

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
    unified=st.just("") | paths,
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


next_jobs = st.builds(
    NextJob,
    job_id=paths.filter(lambda p: "/" not in p),
    cgroup=st.none()
    | st.builds(CgroupPaths, st.dictionaries(paths, paths.map(lambda p: "/" + p), min_size=1)),
)


@given(next_jobs)
def test_a_next_job_decodes_to_what_was_encoded_and_knows_its_launch(job: NextJob) -> None:
    assert NextJob.decode(job.encode()) == job
    assert job.launched_by(f"/state/jobs/{job.job_id}")
    assert not job.launched_by(f"/state/jobs/{job.job_id}x")


@pytest.mark.parametrize(
    "data", [b"", b"next", b"next\0\0", b"order\0id\0", b"next\0id\0{", b'next\0id\0{"a": "rel"}']
)
def test_a_broken_next_job_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each broken part raises its own text
        NextJob.decode(data)


@given(runs)
def test_the_run_record_text_is_the_json_of_the_record(run: RunRecord) -> None:
    assert json.loads(run.json_bytes()) == run.to_json()
    assert RunRecord.from_json(json.loads(run.json_bytes())) == run


@given(runs)
def test_a_run_report_decodes_to_what_was_encoded(run: RunRecord) -> None:
    assert Report.decode(Report(run=run).encode()) == Report(run=run)


def test_a_process_joins_v1_cgroups_by_tasks_and_the_v2_one_by_procs_unless_born_there() -> None:
    """A write to cgroup.procs takes the kernel's global threadgroup lock for writing (an
    RCU grace period on a quiet host); a thread moving itself through ``tasks`` does not."""
    paths = CgroupPaths(
        {
            "cpu": "/c/cpu,cpuacct/j",
            "cpuacct": "/c/cpu,cpuacct/j",
            "memory": "/c/m/j",
            "unified": "/u/j",
        }
    )
    assert paths.unified == "/u/j"
    assert paths.join_files(born_in_unified=True) == (
        "/c/cpu,cpuacct/j/tasks",
        "/c/m/j/tasks",
    )
    assert paths.join_files(born_in_unified=False)[-1] == "/u/j/cgroup.procs"
    # A record that did not name its hierarchies (numbered keys): cgroup.procs, always valid.
    assert CgroupPaths({"0": "/x/j"}).join_files(born_in_unified=True) == ("/x/j/cgroup.procs",)
    assert CgroupPaths({"0": "/x/j"}).unified is None
