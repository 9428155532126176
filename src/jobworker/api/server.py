"""jobworkerd: the gRPC server (mutual TLS 1.3 only) in front of the runtime.

    jobworkerd --tls-ca ca.crt --tls-cert server.crt --tls-key server.key \\
               [--listen 127.0.0.1:50051] [--state-dir /var/lib/jobworker] \\
               [--client-allowlist FILE] [--client-revoked FILE]

SIGTERM or SIGINT: stop accepting, end open streams, exit 0; running jobs keep running.
SIGHUP: re-read the client allow and revocation lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .._allocator import keep_large_buffers
from ..cli._units import UsageError, parse_duration, parse_size
from ..runtime import JobworkerError, Runtime, RuntimeConfig
from ._auth import Authenticator, CertPool
from ._proto import jobworker_pb2 as pb
from ._service import JobService, ServiceLimits, add_to_server
from ._tls import MAX_FRAME_BYTES, TlsError, TlsFiles, check_tls13_only, server_credentials

__all__ = ["Server", "ServerConfig", "StartupError", "main"]

log = logging.getLogger("jobworker.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name


class StartupError(Exception):
    """The server cannot start; the message is one line naming the problem and the fix."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    tls: TlsFiles
    runtime: RuntimeConfig
    listen: tuple[str, ...] = ("127.0.0.1:50051",)
    pool: CertPool = field(default_factory=CertPool)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    max_message_bytes: int = 4 * 1024 * 1024
    shutdown_grace: float = 5.0


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise StartupError(f"listen address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Server:
    """A running jobworkerd: runtime, gRPC server, health and reflection."""

    def __init__(
        self, server: grpc.aio.Server, runtime: Runtime, service: JobService, ports: list[int]
    ) -> None:
        self._server = server
        self.runtime = runtime
        self.service = service
        self.ports = ports

    @classmethod
    async def start(cls, config: ServerConfig) -> Server:
        """Open the runtime, bind every address, start serving, prove TLS 1.3 only.

        Raises:
            StartupError: a problem the operator must fix (message says what).
        """
        try:
            credentials = server_credentials(config.tls)
            auth = Authenticator(config.pool)
        except (TlsError, OSError, ValueError) as e:
            raise StartupError(str(e)) from e
        try:
            runtime = await Runtime.open(config.runtime)
        except (JobworkerError, OSError) as e:
            raise StartupError(f"cannot open the runtime: {e}") from e
        service = JobService(runtime, auth, config.limits)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # Without this a second server could share the port instead of failing.
                ("grpc.so_reuseport", 0),
                ("grpc.http2.max_frame_size", MAX_FRAME_BYTES),
            ]
        )
        add_to_server(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        ports = []
        try:
            for address in config.listen:
                _split(address)
                try:
                    ports.append(server.add_secure_port(address, credentials))
                except RuntimeError as e:
                    raise StartupError(
                        f"cannot listen on {address}: the port is in use or the address is "
                        "not local; pick another --listen"
                    ) from e
            await server.start()
            for address, port in zip(config.listen, ports, strict=True):
                host, _ = _split(address)
                await asyncio.to_thread(check_tls13_only, host or "127.0.0.1", port)
        except (StartupError, TlsError) as e:
            await server.stop(None)
            await runtime.close()
            raise StartupError(str(e)) from e
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        bound = [f"{_split(a)[0]}:{p}" for a, p in zip(config.listen, ports, strict=True)]
        log.info("serving on %s (TLS 1.3 only, client certificates required)", ", ".join(bound))
        return cls(server, runtime, service, ports)

    def reload_certificates(self) -> None:
        try:
            self.service.auth.reload()
        except (OSError, ValueError) as e:
            log.error("keeping the previous client certificate lists: %s", e)  # noqa: TRY400

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, end open streams after ``grace`` s, close the runtime.
        Jobs keep running."""
        self.service.shutting_down.set()
        await self._server.stop(grace)
        await self.runtime.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobworkerd", description="jobworker gRPC server")
    parser.add_argument("--listen", action="append", help="HOST:PORT (repeatable)")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/jobworker"))
    parser.add_argument("--tls-ca", type=Path, required=True, help="CA that signs clients")
    parser.add_argument("--tls-cert", type=Path, required=True)
    parser.add_argument("--tls-key", type=Path, required=True)
    parser.add_argument("--client-allowlist", type=Path, help="SHA-256 fingerprints allowed")
    parser.add_argument("--client-revoked", type=Path, help="SHA-256 fingerprints revoked")
    defaults = ServiceLimits()
    parser.add_argument(
        "--max-jobs-per-user",
        type=int,
        default=defaults.max_active_jobs_per_user,
        help="created or running jobs per user (default %(default)s)",
    )
    parser.add_argument(
        "--max-streams-per-user",
        type=int,
        default=defaults.max_streams_per_user,
        help="open output and watch streams per user (default %(default)s)",
    )
    runtime_defaults = RuntimeConfig(state_dir=Path())
    parser.add_argument(
        "--retention",
        type=_argument(parse_duration),
        default=runtime_defaults.retention_seconds,
        help="delete ended jobs this long after they ended, e.g. 12h, 7d (default 7d)",
    )
    parser.add_argument(
        "--retention-size",
        type=_argument(parse_size),
        default=runtime_defaults.retention_bytes,
        help="keep jobs' output within this much disk, deleting the oldest ended jobs "
        "first, e.g. 500M, 10G (default 10G)",
    )
    return parser


def _argument(parse: Callable[[str, str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text, "value")
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


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
    keep_large_buffers()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        tls=TlsFiles(args.tls_ca, args.tls_cert, args.tls_key),
        runtime=RuntimeConfig(
            state_dir=args.state_dir,
            retention_seconds=args.retention,
            retention_bytes=args.retention_size,
        ),
        listen=tuple(args.listen or ["127.0.0.1:50051"]),
        pool=CertPool(args.client_allowlist, args.client_revoked),
        limits=ServiceLimits(
            max_active_jobs_per_user=args.max_jobs_per_user,
            max_streams_per_user=args.max_streams_per_user,
        ),
    )
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
