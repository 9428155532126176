"""The messages between the server and its job processes, typed in one place.

- A **launch order** goes from the server to the launcher, once per job, and on to the job's
  supervisor: the job's directory and the few facts the supervisor needs for itself
  (:class:`LaunchOrder`). The supervisor never parses spec.json: its command does.
- A **next job** goes from the server to the launcher, and on to the supervisor forked
  ahead (the standby), before that job exists: the id the server's next job created with
  its start will take, and the cgroup made for it (:class:`NextJob`). The standby forks the
  job's command process into that cgroup then, to wait for the job.
- A **report** goes once per launch from the launcher or the job's supervisor to the server,
  over the launch's own SEQPACKET socket: the command runs (its run record, plus a pidfd of
  the supervisor passed alongside), or it could not start (an exit record when the
  supervisor recorded the failure, else only the reason).
- A **control request** goes from the server to a running job's supervisor over its
  ``control.sock``: one line, ``stop <grace seconds>``, ``signal <number>``, ``stdin 0``
  (the reply carries the write end of the job's stdin pipe, SCM_RIGHTS), ``close-stdin 0``
  or ``exec <JSON of an ExecOrder>``; the reply is one line, ``ok``, ``ended`` (the command
  has already exited) or ``error <reason>``. An exec's ``ok`` carries the new process's
  descriptors (a pidfd, then its terminal's master, or its stdin, stdout and stderr pipes),
  and the connection stays open until the process has exited: its last line is
  ``exit <status>`` (:class:`ExecExit`).

Imported by the launcher: light (NamedTuples, enum, json).
"""

from __future__ import annotations

import enum
import json
from typing import Any, NamedTuple

from ._jobdir import CgroupPaths, CorruptRecordError, ExitRecord, RunRecord, SpecRecord

__all__ = [
    "DEFAULT_GRACE_S",
    "MAX_CONTROL_BYTES",
    "MAX_ORDER_BYTES",
    "Control",
    "ExecExit",
    "ExecOrder",
    "LaunchOrder",
    "NextJob",
    "Outcome",
    "Reply",
    "Report",
    "Verb",
]

# The longest control request: an exec's argv and environment (the API caps them at 1 MiB
# together, as a job's; JSON's escapes may add to that).
MAX_CONTROL_BYTES = 8 << 20

# The grace between SIGTERM and SIGKILL when none is given: the server's default for a stop,
# and what a supervisor gives when it is itself asked to stop by a signal (SIGTERM from an
# operator or a shutting-down host).
DEFAULT_GRACE_S = 10.0

# The longest launch order the launcher reads: a job directory and a cgroup directory fit
# many times over.
MAX_ORDER_BYTES = 64 << 10


class LaunchOrder(NamedTuple):
    """What the server asks the launcher to start: the job in ``job_dir`` (its spec.json
    written), and what the job's supervisor needs for itself: the output cap, the stdin
    mode, the timeout and its grace, and the job's cgroup v2 directory (``unified``; "" for
    none), which its processes are born in (the command joins the v1 ones itself).

    Everything else is the command's business, and the command reads it from spec.json
    between fork and exec, where what it parses is thrown away at exec. Whatever the
    supervisor parses stays copied in every idle job's supervisor: reading and checking
    spec.json there cost 320 KiB of each (docs/benchmarks.md (d)). Fields are
    NUL-separated, which no path contains, so decoding is one split.
    """

    job_dir: str
    output_limit: int
    stdin_mode: str
    timeout_s: float | None
    stop_grace: float | None
    unified: str

    @classmethod
    def of(cls, job_dir: str, record: SpecRecord) -> LaunchOrder:
        return cls(
            job_dir,
            record.output_limit,
            record.stdin_mode,
            record.timeout_s,
            record.stop_grace,
            (record.cgroup.unified or "") if record.cgroup is not None else "",
        )

    def encode(self) -> bytes:
        def number(value: float | None) -> str:
            return "" if value is None else repr(value)

        return "\0".join(
            (
                self.job_dir,
                str(self.output_limit),
                self.stdin_mode,
                number(self.timeout_s),
                number(self.stop_grace),
                self.unified,
            )
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> LaunchOrder:
        """Raises ValueError: not an order this release sends."""
        job_dir, limit, stdin_mode, timeout, grace, unified = data.decode().split("\0")
        return cls(
            job_dir,
            int(limit),
            stdin_mode,
            float(timeout) if timeout else None,
            float(grace) if grace else None,
            unified,
        )


class NextJob(NamedTuple):
    """The id the next job created with its start will have, and its cgroup, made ahead
    (None: the server makes none). Sent with no descriptor, which tells it from an
    order: ``next``, the id and the cgroup's JSON (empty for none), NUL-separated."""

    job_id: str
    cgroup: CgroupPaths | None

    def encode(self) -> bytes:
        cgroup = "" if self.cgroup is None else json.dumps(self.cgroup.to_json())
        return f"next\0{self.job_id}\0{cgroup}".encode()

    @classmethod
    def decode(cls, data: bytes) -> NextJob:
        """Raises ValueError: not a next job this release sends."""
        tag, job_id, cgroup = data.decode().split("\0")
        if tag != "next" or not job_id:
            raise ValueError("not a next job")
        try:
            return cls(job_id, CgroupPaths.from_json(json.loads(cgroup)) if cgroup else None)
        except CorruptRecordError as e:
            raise ValueError(str(e)) from None

    def launched_by(self, job_dir: str) -> bool:
        """Whether an order of the job in ``job_dir`` launches this job (a job's directory
        is named for its id)."""
        return job_dir.rpartition("/")[2] == self.job_id


class Report(NamedTuple):
    """The outcome of one launch."""

    run: RunRecord | None = None
    exit: ExitRecord | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.run is not None

    def encode(self) -> bytes:
        if self.run is not None and self.exit is None and self.error is None:
            # The supervisor's one report of a running job, without the json module (see
            # RunRecord.json_bytes).
            return b'{"run":%s,"exit":null,"error":null}' % self.run.json_bytes()
        return json.dumps(
            {
                "run": self.run.to_json() if self.run is not None else None,
                "exit": self.exit.to_json() if self.exit is not None else None,
                "error": self.error,
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Report:
        """Raises CorruptRecordError: not a report this release sends."""
        try:
            raw = json.loads(data)
        except ValueError as e:
            raise CorruptRecordError(f"launch report is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CorruptRecordError("launch report is not a JSON object")
        run, exit_, error = raw.get("run"), raw.get("exit"), raw.get("error")
        return cls(
            run=RunRecord.from_json(run) if run is not None else None,
            exit=ExitRecord.from_json(exit_) if exit_ is not None else None,
            error=str(error) if error is not None else None,
        )


class Verb(enum.Enum):
    STOP = "stop"
    SIGNAL = "signal"
    # Hand over the write end of the job's stdin pipe (passed beside the reply).
    STDIN = "stdin"
    # Close the job's stdin for good: the supervisor lets go of its write end.
    CLOSE_STDIN = "close-stdin"
    # Run another process inside the running job (``jobctl exec``).
    EXEC = "exec"


class ExecOrder(NamedTuple):
    """A process to run inside a running job: its command, environment (added to the
    job's), working directory (None: the job's), and its stdin: a pipe the caller writes
    (``stdin``), /dev/null, or a terminal of the job's devpts (``tty``, with ``window``
    and ``term``)."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str | None
    stdin: bool
    tty: bool
    window: tuple[int, int]
    term: str

    def to_json(self) -> dict[str, object]:
        return {**self._asdict(), "argv": list(self.argv), "window": list(self.window)}

    @classmethod
    def from_json(cls, raw: Any) -> ExecOrder:  # Any: json.loads' value, checked here
        """Raises ValueError: not an order this release sends."""
        try:
            rows, cols = raw["window"]
            order = cls(
                argv=tuple(str(a) for a in raw["argv"]),
                env={str(k): str(v) for k, v in raw["env"].items()},
                cwd=None if raw["cwd"] is None else str(raw["cwd"]),
                stdin=bool(raw["stdin"]),
                tty=bool(raw["tty"]),
                window=(int(rows), int(cols)),
                term=str(raw["term"]),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"a malformed exec order: {e}") from None
        if not order.argv:
            raise ValueError("an exec order needs a command")
        return order


class Control(NamedTuple):
    """One request to a supervisor: stop with ``value`` seconds of grace, send signal
    ``value``, or run ``order`` (EXEC)."""

    verb: Verb
    value: float = 0
    order: ExecOrder | None = None

    def encode(self) -> bytes:
        if self.verb is Verb.EXEC and self.order is not None:
            return b"exec " + json.dumps(self.order.to_json()).encode() + b"\n"
        value = repr(float(self.value)) if self.verb is Verb.STOP else str(int(self.value))
        return f"{self.verb.value} {value}\n".encode()

    @classmethod
    def decode(cls, line: bytes) -> Control:
        """Raises ValueError: not a request this release sends."""
        verb, _, arg = line.decode("utf-8").strip().partition(" ")
        kind = Verb(verb)
        if kind is Verb.EXEC:
            return cls(kind, order=ExecOrder.from_json(json.loads(arg)))
        return cls(kind, float(arg) if kind is Verb.STOP else int(arg))


class ExecExit(NamedTuple):
    """How an exec'd process ended: ``status`` as ``os.waitstatus_to_exitcode`` gives it
    (negative: killed by that signal)."""

    status: int

    def encode(self) -> bytes:
        return f"exit {self.status}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> ExecExit | None:
        """None: not an exit line (the supervisor went away without sending one)."""
        word, _, value = data.decode("ascii", "replace").strip().partition(" ")
        if word != "exit":
            return None
        try:
            return cls(int(value))
        except ValueError:
            return None


class Outcome(enum.Enum):
    OK = "ok"
    ENDED = "ended"
    ERROR = "error"


class Reply(NamedTuple):
    """A supervisor's answer; ``detail`` explains an error."""

    outcome: Outcome
    detail: str = ""

    def encode(self) -> bytes:
        text = self.outcome.value if not self.detail else f"{self.outcome.value} {self.detail}"
        return text.encode("utf-8", "replace") + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        """An empty answer is ENDED: the supervisor closed its socket on the way out."""
        word, _, detail = data.decode("utf-8", "replace").strip().partition(" ")
        if not word:
            return cls(Outcome.ENDED)
        try:
            return cls(Outcome(word), detail)
        except ValueError:
            return cls(Outcome.ERROR, f"unexpected reply {word!r}")
