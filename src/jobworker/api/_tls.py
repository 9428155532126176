"""TLS material for the server and clients, and the proof that only TLS 1.3 is served."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "MAX_FRAME_BYTES",
    "TlsError",
    "TlsFiles",
    "check_tls13_only",
    "client_credentials",
    "server_credentials",
]

# HTTP/2 frames of 1 MiB instead of gRPC's 16 KiB: output streams carry big messages, and
# fewer frames cost less CPU on both ends (measured: docs/benchmarks.md (i)). Each side
# announces what it accepts, so clients set it too (see jobworker.api.client).
MAX_FRAME_BYTES = 1 << 20

_HANDSHAKE = 0x16
_SERVER_HELLO = 0x02
_ALERT = 0x15


class TlsError(Exception):
    """TLS material is missing or unreadable, or the server would accept TLS 1.2."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the CA that signs peers, and our own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) bytes.

        Raises:
            TlsError: a file is missing or unreadable; the message names it.
        """
        out = []
        for what, path in (
            ("CA certificate", self.ca),
            ("certificate", self.cert),
            ("key", self.key),
        ):
            try:
                out.append(path.read_bytes())
            except OSError as e:
                raise TlsError(f"cannot read the {what} {path}: {e.strerror}") from e
        return out[0], out[1], out[2]


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that require and verify a client certificate signed by ``files.ca``."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def client_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials presenting our certificate and verifying the server's against the CA."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def check_tls13_only(host: str, port: int, timeout: float = 5.0) -> None:
    """Offer the server a TLS 1.2-only ClientHello and look at its first reply record.

    A ServerHello means TLS 1.2 was accepted; an alert means it was refused. Looking at the
    raw reply (not at a failed handshake) tells "refused TLS 1.2" apart from "refused us for
    lacking a client certificate", which a TLS 1.2 server would also do, later.

    Raises:
        TlsError: the server accepted TLS 1.2, or did not answer.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):  # the ClientHello is all we want
        tls.do_handshake()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(outgoing.read())
            reply = b""
            while len(reply) < 6:
                data = sock.recv(4096)
                if not data:
                    break
                reply += data
    except OSError as e:
        raise TlsError(f"cannot check the TLS versions on {host}:{port}: {e}") from e
    if len(reply) >= 6 and reply[0] == _HANDSHAKE and reply[5] == _SERVER_HELLO:
        raise TlsError(
            f"{host}:{port} accepts TLS 1.2; only TLS 1.3 may be served (was grpc imported "
            "before jobworker.api set GRPC_SSL_CIPHER_SUITES?)"
        )
    if reply and reply[0] not in (_ALERT, _HANDSHAKE):
        raise TlsError(f"{host}:{port} answered a TLS ClientHello with something else")
