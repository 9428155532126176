"""Why a TLS handshake with the server failed, found out rather than guessed.

Under TLS 1.3, gRPC reports every handshake failure the same way ("Socket closed",
"handshake failed"). On that path only, jobctl looks: at its own certificate and key (do
they match, are they in date) and at the certificate the server presents (is it signed by
the CA jobctl trusts, does it name the host jobctl dialled, is it in date).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ._config import Target

__all__ = ["diagnose"]

_PROBE_TIMEOUT_S = 5.0


def _local(target: Target, now: float) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(target.cert.read_bytes())
        key = serialization.load_pem_private_key(target.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None  # unreadable files are reported before any connection is tried
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != cert.public_key().public_bytes(*public):
        return f"the key {target.key} is not the key of your certificate {target.cert}"
    if cert.not_valid_after_utc.timestamp() < now:
        return (
            f"your certificate {target.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "get a new one (jobworker-certs client)"
        )
    if cert.not_valid_before_utc.timestamp() > now:
        return f"your certificate {target.cert} is not valid before {cert.not_valid_before_utc}"
    return None


def _server_certificate(host: str, port: int) -> x509.Certificate | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to look at what it presents; nothing is sent
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _issued_by_one_of(cert: x509.Certificate, cas: list[x509.Certificate]) -> bool:
    for ca in cas:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            cert.verify_directly_issued_by(ca)
            return True
    return False


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *map(str, san.get_values_for_type(x509.IPAddress)),
    ]


def _names_host(names: list[str], host: str) -> bool:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host)) in names
    return host.lower() in (n.lower() for n in names)


def _remote(target: Target, now: float) -> str | None:
    host, _, port = target.server.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    cert = _server_certificate(host, int(port)) if port.isdigit() else None
    if cert is None:
        return None
    return _judge(target, cert, host, now)


def _judge(target: Target, cert: x509.Certificate, host: str, now: float) -> str | None:
    try:
        cas = x509.load_pem_x509_certificates(target.ca.read_bytes())
    except (OSError, ValueError):
        return f"the CA file {target.ca} holds no PEM certificate"
    if not _issued_by_one_of(cert, cas):
        issuer = cert.issuer.rfc4514_string() or "an unnamed CA"
        return (
            f"the server's certificate is not signed by the CA in {target.ca} (its issuer is "
            f"{issuer}); use that server's CA (--ca, JOBWORKER_CA)"
        )
    if cert.not_valid_after_utc.timestamp() < now:
        return f"the server's certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    names = _names(cert)
    if not _names_host(names, host):
        return (
            f"the server's certificate does not name {host} (it names {', '.join(names)}); "
            "connect by one of those names, or reissue it with jobworker-certs init --host"
        )
    return None


def diagnose(target: Target) -> str | None:
    """The reason a handshake with ``target`` fails, if it can be told; else None."""
    now = time.time()
    return _local(target, now) or _remote(target, now)
