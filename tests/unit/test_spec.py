"""Spec and limit validation: each bad input gets a clear, specific error."""

from __future__ import annotations

import pytest

from jobworker.runtime import InvalidSpecError, IOLimit, JobSpec, Limits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"argv": []}, "argv is empty"),
        ({"argv": "ls -l"}, "argv must be a list"),
        ({"argv": [""]}, "argv\\[0\\] is empty"),
        ({"argv": ["ls", "a\0b"]}, "argv\\[1\\] contains a NUL byte"),
        ({"argv": ["ls", 3]}, "argv\\[1\\] must be a string"),
        ({"argv": ["x" * 200_000]}, "longer than"),
        ({"argv": ["ls"] + ["y" * 100_000] * 11}, "exceed"),
        ({"argv": ["ls"], "env": {"A=B": "1"}}, "contains '='"),
        ({"argv": ["ls"], "env": {"": "1"}}, "is empty"),
        ({"argv": ["ls"], "env": {"A": "\0"}}, "NUL"),
        ({"argv": ["ls"], "cwd": "relative/dir"}, "not absolute"),
        ({"argv": ["ls"], "owner": ""}, "owner"),
        ({"argv": ["ls"], "owner": "a\nb"}, "owner"),
    ],
)
def test_bad_spec_is_refused_clearly(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        JobSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_round_trips_through_json() -> None:
    spec = JobSpec(
        ["echo", "hi"],
        env={"A": "1"},
        cwd="/tmp",
        owner="alice",
        limits=Limits(cpus=0.5, memory_bytes=64 << 20, pids=10, io=(IOLimit("8:0", 1000),)),
    )
    assert JobSpec.from_json(spec.to_json()) == spec


def test_spec_is_immutable() -> None:
    env = {"A": "1"}
    spec = JobSpec(["true"], env=env)
    env["A"] = "2"
    assert spec.env["A"] == "1"
    with pytest.raises(TypeError):
        spec.env["A"] = "3"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": 0}, "cpus"),
        ({"cpus": float("nan")}, "cpus"),
        ({"cpu_weight": 0}, "cpu_weight"),
        ({"memory_bytes": 10}, "memory"),
        ({"pids": 0}, "pids"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_bad_io_device_is_refused() -> None:
    with pytest.raises(InvalidSpecError, match="MAJ:MIN"):
        IOLimit("sda", read_bps=1)
    with pytest.raises(InvalidSpecError, match="positive"):
        IOLimit("8:0", read_bps=-1)
