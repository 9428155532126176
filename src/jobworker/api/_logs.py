"""jobworkerd's log lines on stderr, as text or JSON, and the audit line of each RPC.

An event's own fields go in ``extra={"fields": {...}}``: text lines append them as
``key=value``, JSON lines as keys of the object, so both carry the same facts.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime
from typing import Any

from .._text import escape

__all__ = ["AUDIT", "configure", "quiet_client_departures"]

AUDIT = logging.getLogger("jobworker.audit")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record)} {record.levelname} {record.name}: {escape(record.getMessage())}"
        for key, value in _fields(record).items():
            text = str(value)
            # Quote what would break the key=value split (spaces, quotes, empties) or the
            # line (any character that is not printable: json escapes them all).
            if not text or not text.isprintable() or any(c in text for c in ' "='):
                text = json.dumps(text)
            line += f" {key}={text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str) -> None:
    """Send INFO and above to stderr, one line per event, as ``text`` or ``json``.

    Lines are formatted and written by a thread of their own (a queue in between): an
    audit line per RPC took a tenth of the event loop's time when 1,000 StopJob calls
    came at once (issue 15), and a stderr that blocks (a slow journald, a full pipe) must
    not stop the server. The thread writes what is queued before the process exits.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(_Enqueue(records))
    root.setLevel(logging.INFO)
    listener.start()
    atexit.register(listener.stop)


class _Enqueue(logging.handlers.QueueHandler):
    """The stdlib's QueueHandler formats the message on the caller's thread (to make the
    record picklable for other processes); this queue stays in the process, so the record
    goes as it is and the writer thread does all the formatting."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _DepartureFilter(logging.Filter):
    """gRPC logs at ERROR, with a traceback, every send that fails because the client
    cancelled or went away while the server was blocked sending to it (a slow follower
    pressing Ctrl+C). That is normal: it becomes a DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            # A logger's filters run before its level check: drop it here unless DEBUG
            # lines are wanted at all.
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_DEPARTURES = _DepartureFilter()


def quiet_client_departures() -> None:
    """Install the filter above on gRPC's logger (idempotent)."""
    logging.getLogger("grpc._cython.cygrpc").addFilter(_DEPARTURES)
