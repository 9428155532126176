"""jobworkerd: the gRPC server (mutual TLS 1.3 only) in front of the runtime.

    jobworkerd --ca ca.pem --cert server.pem --key server.key \\
               [--listen 127.0.0.1:50051] [--state-dir /var/lib/jobworker] [--config FILE]
    jobworkerd --check-config [--config FILE]     # explain every problem, exit 1 if any
    jobworkerd --print-default-config             # every key, documented, with its default

Settings come from the defaults, then the config file (/etc/jobworker/config.toml if it
exists, or --config), then the flags.

SIGTERM or SIGINT: stop accepting, end open streams, exit 0; running jobs keep running.
SIGHUP: re-read the client allow and revocation lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .. import __version__
from .._allocator import keep_large_buffers
from ..runtime import JobworkerError, Runtime
from ._auth import Authenticator
from ._config import (
    DEFAULT_PATH,
    FLAG_KEYS,
    ConfigError,
    ServerConfig,
    ServiceLimits,
    check_files,
    default_config_text,
    load_config,
    split_address,
)
from ._logs import configure as configure_logging
from ._logs import quiet_client_departures
from ._proto import jobworker_pb2 as pb
from ._service import JobService, add_to_server

if TYPE_CHECKING:
    from ._metrics import Metrics
    from ._web import WebConsole
from ._tls import (
    MAX_FRAME_BYTES,
    TlsError,
    check_server_material,
    check_tls13_only,
    server_credentials,
)

__all__ = ["Server", "ServerConfig", "ServiceLimits", "StartupError", "main"]

log = logging.getLogger("jobworker.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name


class StartupError(Exception):
    """The server cannot start; the message is one line naming the problem and the fix."""


def _split(address: str) -> tuple[str, int]:
    try:
        return split_address(address)
    except ValueError as e:
        raise StartupError(f"listen address {e}") from None


def _bind(server: grpc.aio.Server, listen: tuple[str, ...], credentials: object) -> list[int]:
    ports = []
    for address in listen:
        _split(address)
        try:
            ports.append(server.add_secure_port(address, credentials))
        except RuntimeError as e:
            raise StartupError(
                f"cannot listen on {address}: the port is in use or the address is "
                "not local; pick another --listen"
            ) from e
    return ports


async def _serve_metrics(metrics: Metrics, address: str) -> None:
    try:
        port = await asyncio.to_thread(metrics.serve, address)
    except OSError as e:
        raise StartupError(
            f"cannot serve metrics on {address}: {e.strerror}; pick another --metrics-listen"
        ) from e
    log.info("metrics on http://%s:%d/metrics", _split(address)[0], port)


async def _serve_web(service: JobService, config: ServerConfig) -> WebConsole | None:
    """The web console on ``config.web_listen``, TLS 1.3 only (proved as the gRPC side's);
    None when it is off.

    Raises:
        StartupError: the address cannot be bound, or it would serve TLS 1.2.
    """
    if config.web_listen is None:
        return None
    from ._web import ConnectionLimits, WebConsole  # noqa: PLC0415 - only when on (aiohttp)

    # A browser holds a connection between requests (keep-alive); one that says nothing
    # for a few handshake timeouts (15 s at the default) is let go.
    limits = ConnectionLimits(
        config.handshake_timeout, 3 * config.handshake_timeout, config.max_connections
    )
    try:
        web = await WebConsole.start(service, config.tls, config.web_listen, limits)
    except OSError as e:
        raise StartupError(
            f"cannot serve the web console on {config.web_listen}: {e.strerror or e}; pick "
            "another --web-listen"
        ) from e
    host, _ = _split(config.web_listen)
    try:
        await asyncio.to_thread(check_tls13_only, host or "127.0.0.1", web.port)
    except TlsError:
        await web.stop()
        raise
    log.info("web console on https://%s:%d", host or "127.0.0.1", web.port)
    return web


class Server:
    """A running jobworkerd: runtime, gRPC server, health and reflection."""

    def __init__(
        self,
        server: grpc.aio.Server,
        runtime: Runtime,
        service: JobService,
        ports: list[int],
        metrics: Metrics | None,
    ) -> None:
        self._server = server
        self.runtime = runtime
        self.service = service
        self.ports = ports
        # With its endpoint's port, when metrics are on.
        self.metrics = metrics
        # With its port, when the web console is on.
        self.web: WebConsole | None = None

    @classmethod
    async def start(cls, config: ServerConfig) -> Server:
        """Open the runtime, bind every address, start serving, prove TLS 1.3 only.

        Raises:
            StartupError: a problem the operator must fix (message says what).
        """
        quiet_client_departures()
        problems = check_server_material(config.tls)
        if problems:
            raise StartupError("; ".join(problems))
        try:
            credentials = server_credentials(config.tls)
            auth = Authenticator(config.pool)
        except (TlsError, OSError, ValueError) as e:
            raise StartupError(str(e)) from e
        metrics = None
        if config.metrics_listen is not None:
            from ._metrics import Metrics  # noqa: PLC0415 - only when on (50 ms of imports)

            metrics = Metrics()
        # What is alive once the runtime is open lives as long as the server (its modules,
        # the jobs read back): frozen, the collector never walks it again, where one pass
        # over 10,000 jobs took 0.18 s at start-up and again, later, in the middle of a
        # request (docs/benchmarks.md (o), (p)). Reference counting still frees a job's
        # objects when it is removed: a job holds no reference cycle.
        gc.disable()
        try:
            runtime = await Runtime.open(config.runtime, metrics)
        except (JobworkerError, OSError) as e:
            raise StartupError(f"cannot open the runtime: {e}") from e
        finally:
            gc.freeze()
            gc.enable()
        service = JobService(runtime, auth, config.limits, metrics, config.identity)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # Without this a second server could share the port instead of failing.
                ("grpc.so_reuseport", 0),
                ("grpc.http2.max_frame_size", MAX_FRAME_BYTES),
                # gRPC holds a connection that never finishes its handshake for 120 s by
                # default, and accepts any number: a flood of silent sockets then uses up
                # the fds and stops service (issue 20, measured at a 256-fd limit).
                ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout * 1000)),
                ("grpc.max_allowed_incoming_connections", config.max_connections),
            ]
        )
        add_to_server(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            if metrics is not None:
                await _serve_metrics(metrics, config.metrics_listen or "")
            ports = _bind(server, config.listen, credentials)
            await server.start()
            for address, port in zip(config.listen, ports, strict=True):
                host, _ = _split(address)
                await asyncio.to_thread(check_tls13_only, host or "127.0.0.1", port)
            web = await _serve_web(service, config)
        except (StartupError, TlsError) as e:
            await server.stop(None)
            await runtime.close()
            if metrics is not None:
                await asyncio.to_thread(metrics.close)
            raise StartupError(str(e)) from e
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        bound = [f"{_split(a)[0]}:{p}" for a, p in zip(config.listen, ports, strict=True)]
        log.info("serving on %s (TLS 1.3 only, client certificates required)", ", ".join(bound))
        running = cls(server, runtime, service, ports, metrics)
        running.web = web
        return running

    def reload_certificates(self) -> None:
        try:
            self.service.auth.reload()
        except (OSError, ValueError) as e:
            log.error("keeping the previous client certificate lists: %s", e)  # noqa: TRY400 - an operator's file error, not a bug: no traceback

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, end open streams after ``grace`` s, close the runtime.
        Jobs keep running."""
        self.service.shut_down()
        if self.web is not None:
            await self.web.stop()
        await self._server.stop(grace)
        await self.runtime.close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobworkerd",
        description="jobworker gRPC server (mutual TLS 1.3). Settings: defaults, then the "
        f"config file ({DEFAULT_PATH} if it exists, or --config), then these flags.",
    )
    parser.add_argument("--version", action="version", version=f"jobworkerd {__version__}")
    parser.add_argument("--config", type=Path, help=f"TOML settings (default {DEFAULT_PATH})")
    parser.add_argument(
        "--check-config", action="store_true", help="check the settings and files, then exit"
    )
    parser.add_argument(
        "--print-default-config",
        action="store_true",
        help="print every setting, documented, with its default, then exit",
    )
    parser.add_argument(
        "--listen", action="append", metavar="HOST:PORT", help="gRPC address (repeatable)"
    )
    parser.add_argument("--name", help="the server's name for clients (default: the host name)")
    parser.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="a label fleets select this server by (repeatable), e.g. role=web",
    )
    parser.add_argument("--state-dir", metavar="DIR", help="jobs' records and output")
    parser.add_argument("--ca", metavar="FILE", help="CA certificate that signs clients")
    parser.add_argument("--cert", metavar="FILE", help="the server's certificate")
    parser.add_argument("--key", metavar="FILE", help="the server's private key")
    parser.add_argument("--log-format", choices=["text", "json"], help="stderr log lines")
    parser.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics there"
    )
    parser.add_argument(
        "--web-listen",
        metavar="HOST:PORT",
        help="serve the web console there (HTTPS, the same certificates and authorization)",
    )
    return parser


async def _serve(config: ServerConfig) -> None:
    server = await Server.start(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_certificates)
    await stop.wait()
    log.info("shutting down; running jobs keep running")
    await server.stop(config.shutdown_grace)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.print_default_config:
        print(default_config_text(), end="")
        return 0
    flags = {name: getattr(args, name) for name in FLAG_KEYS}
    try:
        config = load_config(args.config, flags)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if args.check_config:
        problems = check_files(config)
        if args.config is None and not DEFAULT_PATH.exists():
            problems.insert(
                0, f"no configuration file at {DEFAULT_PATH}; give --config FILE to check one"
            )
        for problem in problems:
            print(f"{args.config or DEFAULT_PATH}: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"{args.config or DEFAULT_PATH}: OK")
        return 0
    keep_large_buffers()
    configure_logging(config.log_format)
    try:
        asyncio.run(_serve(config))
    except StartupError as e:
        print(f"jobworkerd: {e}", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
