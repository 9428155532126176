"""TLS material for the server and clients, and the proof that only TLS 1.3 is served."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = [
    "MAX_FRAME_BYTES",
    "TlsError",
    "TlsFiles",
    "check_server_material",
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


def check_server_material(files: TlsFiles, now: float | None = None) -> list[str]:
    """Every problem with the server's TLS files, loaded as the server will load them: one
    line each, naming the setting, the file and what to do.

    Without this, a key that does not match its certificate makes gRPC refuse to bind with
    a misleading "port in use", and a client certificate in the server's place only fails
    at each client's handshake.
    """
    problems = []
    try:
        ca_pem, cert_pem, key_pem = files.read()
    except TlsError as e:
        return [str(e)]
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        cas = []
        problems.append(f"tls.ca: {files.ca} holds no PEM certificate; give the CA's ca.pem")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return [*problems, f"tls.cert: {files.cert} is not a PEM certificate"]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return [
            *problems,
            f"tls.key: {files.key} is not an unencrypted PEM private key",
        ]
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != cert.public_key().public_bytes(*public):
        problems.append(
            f"tls.key: {files.key} is not the key of {files.cert}; give the key made with "
            "that certificate (jobworker-certs init writes server.pem and server.key)"
        )
    with contextlib.suppress(x509.ExtensionNotFound):
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usage:
            problems.append(
                f"tls.cert: {files.cert} is not a server certificate (it is for clients: no "
                "serverAuth usage); give the server's certificate"
            )
    when = time.time() if now is None else now
    if cert.not_valid_after_utc.timestamp() < when:
        problems.append(f"tls.cert: {files.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cas and not any(_issued_by(cert, ca) for ca in cas):
        problems.append(
            f"tls.cert: {files.cert} is not signed by the CA in {files.ca}; clients that "
            "trust that CA will refuse the server"
        )
    return problems


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


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
