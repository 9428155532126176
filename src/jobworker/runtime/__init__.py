"""The jobworker runtime: run commands as jobs on this host, with an asyncio API.

No gRPC here; the API layer builds on this. See docs/architecture.md for the processes.

Names are imported on first use (PEP 562): the launcher process imports this package too,
and every module it holds is memory that each job's supervisor may end up copying.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._changes import Change
    from ._config import NOBODY, RunAs, RuntimeConfig
    from ._errors import (
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
    from ._exec import ExecProcess
    from ._jobdir import Bind
    from ._logformat import Stream
    from ._observer import JobObserver
    from ._output import Batch, Chunk, Window
    from ._runtime import Runtime
    from ._spec import ExecSpec, IOLimit, JobSpec, Limits, check_signal, check_window
    from ._states import State
    from ._status import JobStatus, SandboxInfo, Usage
    from ._usage import Sample
    from .cgroups import CgroupError

_WHERE = {
    "Sample": "_usage",
    "check_signal": "_spec",
    "check_window": "_spec",
    "ExecFailedError": "_errors",
    "ExecProcess": "_exec",
    "ExecSpec": "_spec",
    "NOBODY": "_config",
    "Bind": "_jobdir",
    "CgroupError": "cgroups",
    "NameTakenError": "_errors",
    "NoStdinError": "_errors",
    "NotPermittedError": "_errors",
    "QuotaError": "_errors",
    "RunAs": "_config",
    "Usage": "_status",
    "SandboxInfo": "_status",
    "Chunk": "_output",
    "Batch": "_output",
    "IOLimit": "_spec",
    "InvalidSpecError": "_errors",
    "InvalidTransitionError": "_errors",
    "JobAlreadyStartedError": "_errors",
    "JobEndedError": "_errors",
    "JobNotFoundError": "_errors",
    "JobNotRunningError": "_errors",
    "JobRunningError": "_errors",
    "JobSpec": "_spec",
    "JobStatus": "_status",
    "JobworkerError": "_errors",
    "JobObserver": "_observer",
    "Limits": "_spec",
    "LaunchError": "_errors",
    "Runtime": "_runtime",
    "RuntimeClosedError": "_errors",
    "StateDirError": "_errors",
    "WatcherBehindError": "_errors",
    "Change": "_changes",
    "Window": "_output",
    "RuntimeConfig": "_config",
    "State": "_states",
    "Stream": "_logformat",
}

__all__ = [
    "NOBODY",
    "Batch",
    "Bind",
    "CgroupError",
    "Change",
    "Chunk",
    "ExecFailedError",
    "ExecProcess",
    "ExecSpec",
    "IOLimit",
    "InvalidSpecError",
    "InvalidTransitionError",
    "JobAlreadyStartedError",
    "JobEndedError",
    "JobNotFoundError",
    "JobNotRunningError",
    "JobObserver",
    "JobRunningError",
    "JobSpec",
    "JobStatus",
    "JobworkerError",
    "LaunchError",
    "Limits",
    "NameTakenError",
    "NoStdinError",
    "NotPermittedError",
    "QuotaError",
    "RunAs",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeConfig",
    "Sample",
    "SandboxInfo",
    "State",
    "StateDirError",
    "Stream",
    "Usage",
    "WatcherBehindError",
    "Window",
    "check_signal",
    "check_window",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
