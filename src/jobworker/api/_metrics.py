"""The Prometheus endpoint (off unless ``[metrics] listen`` is set).

Imported only when it is on: prometheus_client costs ~50 ms of start-up.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from .. import __version__
from ..runtime import JobStatus, State
from ._config import split_address

__all__ = ["Metrics"]

# Start latency runs from ~5 ms (warm, cgroups ready) to seconds on a loaded host.
_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counts what the runtime and the service report (a JobObserver and a
    ServiceMetrics) and serves it over HTTP for Prometheus to scrape."""

    def __init__(self) -> None:
        # Our own registry: several servers in one process (tests) must not share counts.
        self.registry = CollectorRegistry()
        r = self.registry
        # Exposed as jobworker_build_info{version="..."} 1, the convention dashboards join on.
        Info("jobworker_build", "The running jobworkerd's release.", registry=r).info(
            {"version": __version__}
        )
        self._jobs = Gauge("jobworker_jobs", "Jobs known, by state.", ["state"], registry=r)
        for state in State:
            self._jobs.labels(state.value)
        self._starts = Counter(
            "jobworker_job_starts",
            "Job starts, by result: running, or failed (could not start).",
            ["result"],
            registry=r,
        )
        self._ends = Counter(
            "jobworker_job_ends",
            "Jobs that ended while this server watched, by final state.",
            ["result"],
            registry=r,
        )
        self._start_seconds = Histogram(
            "jobworker_job_start_seconds",
            "From the start request to the job running (or failed), in seconds.",
            buckets=_START_BUCKETS,
            registry=r,
        )
        self._streams = Gauge(
            "jobworker_output_streams", "Open output and watch streams.", registry=r
        )
        self._streamed = Counter(
            "jobworker_streamed_bytes", "Job output bytes sent to clients.", registry=r
        )
        self._rpcs = Counter(
            "jobworker_rpcs",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self._oom = Counter("jobworker_oom_kills", "Jobs whose cgroup saw an OOM kill.", registry=r)
        # The endpoint's port, once serving.
        self.port: int | None = None
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # JobObserver
    def job_changed(self, before: JobStatus | None, after: JobStatus) -> None:
        if before is not None:
            self._jobs.labels(before.state.value).dec()
        self._jobs.labels(after.state.value).inc()
        if before is None or before.state.is_final or not after.state.is_final:
            return  # appeared (e.g. taken back after a restart), or not an end
        self._ends.labels(after.state.value).inc()
        if after.oom_killed:
            self._oom.inc()

    def job_removed(self, last: JobStatus) -> None:
        self._jobs.labels(last.state.value).dec()

    # ServiceMetrics
    def rpc_done(self, method: str, code: str) -> None:
        self._rpcs.labels(method, code).inc()

    def job_start(self, seconds: float, status: JobStatus) -> None:
        self._starts.labels("running" if status.state is not State.FAILED else "failed").inc()
        self._start_seconds.observe(seconds)

    def stream_opened(self) -> None:
        self._streams.inc()

    def stream_closed(self) -> None:
        self._streams.dec()

    def streamed(self, nbytes: int) -> None:
        self._streamed.inc(nbytes)

    def serve(self, address: str) -> int:
        """Serve ``/metrics`` on ``address`` (HOST:PORT) from a thread; return the port.

        Raises:
            OSError: the address cannot be bound.
        """
        host, port = split_address(address)
        self._http, self._thread = start_http_server(port, host, registry=self.registry)
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None and self._thread is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(5)
