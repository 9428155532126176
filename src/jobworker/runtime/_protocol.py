"""The messages between the server and its job processes, typed in one place.

- A **report** goes once per launch from the launcher or the job's supervisor to the server,
  over the launch's own SEQPACKET socket: the command runs (its run record, plus a pidfd of
  the supervisor passed alongside), or it could not start (an exit record when the
  supervisor recorded the failure, else only the reason).
- A **control request** goes from the server to a running job's supervisor over its
  ``control.sock``: one line, ``stop <grace seconds>``, ``signal <number>``, ``stdin 0``
  (the reply carries the write end of the job's stdin pipe, SCM_RIGHTS) or ``close-stdin 0``;
  the reply is one line, ``ok``, ``ended`` (the command has already exited) or
  ``error <reason>``.

Imported by the launcher: light (NamedTuples, enum, json).
"""

from __future__ import annotations

import enum
import json
from typing import NamedTuple

from ._jobdir import CorruptRecordError, ExitRecord, RunRecord

__all__ = ["DEFAULT_GRACE_S", "Control", "Outcome", "Reply", "Report", "Verb"]

# The grace between SIGTERM and SIGKILL when none is given: the server's default for a stop,
# and what a supervisor gives when it is itself asked to stop by a signal (SIGTERM from an
# operator or a shutting-down host).
DEFAULT_GRACE_S = 10.0


class Report(NamedTuple):
    """The outcome of one launch."""

    run: RunRecord | None = None
    exit: ExitRecord | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.run is not None

    def encode(self) -> bytes:
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


class Control(NamedTuple):
    """One request to a supervisor: stop with ``value`` seconds of grace, or send signal
    ``value``."""

    verb: Verb
    value: float

    def encode(self) -> bytes:
        value = repr(float(self.value)) if self.verb is Verb.STOP else str(int(self.value))
        return f"{self.verb.value} {value}\n".encode()

    @classmethod
    def decode(cls, line: bytes) -> Control:
        """Raises ValueError: not a request this release sends."""
        verb, _, arg = line.decode("ascii").strip().partition(" ")
        kind = Verb(verb)
        return cls(kind, float(arg) if kind is Verb.STOP else int(arg))


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
