"""jobworker-certs: make the CA, server and client certificates jobworker needs.

ECDSA P-256 keys and SHA-256 signatures; private keys are written 0600 and never
overwritten by accident. Client certificates carry the role extension and a short default
validity (30 days).

    jobworker-certs init DIR [--host NAME]...   # DIR/ca.pem, ca.key, server.pem, server.key
    jobworker-certs server DIR NAME --host NAME...  # DIR/NAME.pem, NAME.key: one more server
    jobworker-certs client DIR NAME [--role admin|user] [--days N] [--p12]
                                                # DIR/NAME.pem, NAME.key (and NAME.p12)
    jobworker-certs fingerprint CERT            # SHA-256, for allow and revocation lists

The server certificate names localhost, 127.0.0.1 and ::1, plus each ``--host`` (a DNS name,
a wildcard such as ``*.jobworkerd.jobworker.svc.cluster.local``, or an IP address). A fleet
has one CA and a certificate per server (``server``), each naming where clients reach it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import __version__
from .identity import ROLE_OID, Role, encode_role, fingerprint

__all__ = [
    "issue_client",
    "issue_server",
    "main",
    "make_ca",
    "make_dev_pki",
    "make_p12",
    "make_pki",
    "make_server",
]

CLIENT_DAYS = 30
SERVER_DAYS = 365
CA_DAYS = 3650


class CertError(Exception):
    """A file is missing, exists already, or is unreadable; the message says which."""


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: never clobber an existing key; 0600 from creation, not chmod'ed afterwards.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise CertError(f"{path} exists; remove it first if you mean to replace it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    if path.exists():
        raise CertError(f"{path} exists; remove it first if you mean to replace it")
    path.write_bytes(data)
    path.chmod(0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _builder(
    subject: str, issuer: x509.Name, days: float, *, now: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def make_ca(name: str = "jobworker CA", *, now: dt.datetime | None = None) -> Issued:
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, CA_DAYS, now=now)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def _leaf(
    ca: Issued, cn: str, days: float, usage: x509.ObjectIdentifier, *, now: dt.datetime
) -> x509.CertificateBuilder:
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        _builder(cn, ca.cert.subject, days, now=now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )


def issue_server(
    ca: Issued,
    dns: list[str],
    ips: list[str],
    *,
    days: float = SERVER_DAYS,
    now: dt.datetime | None = None,
) -> Issued:
    """A server certificate whose SANs are ``dns`` names and ``ips``."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        _leaf(ca, (dns or ips)[0], days, ExtendedKeyUsageOID.SERVER_AUTH, now=now)
        .public_key(key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue_client(  # noqa: PLR0913 - keyword-only knobs for tests of odd certificates
    ca: Issued,
    cn: str,
    role: Role | None = Role.USER,
    *,
    days: float = CLIENT_DAYS,
    now: dt.datetime | None = None,
    raw_role: bytes | None = None,
) -> Issued:
    """A client certificate for user ``cn``; ``role=None`` leaves the role extension out
    (the holder is then a user). ``raw_role`` puts arbitrary bytes there (for tests of
    malformed extensions)."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _leaf(ca, cn, days, ExtendedKeyUsageOID.CLIENT_AUTH, now=now).public_key(
        key.public_key()
    )
    value = raw_role if raw_role is not None else (encode_role(role) if role else None)
    if value is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(ROLE_OID, value), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _with(prefix: Path, suffix: str) -> Path:
    # Not Path.with_suffix: a user name such as "ops.team" must keep its dot.
    return prefix.parent / (prefix.name + suffix)


def save(issued: Issued, prefix: Path) -> tuple[Path, Path]:
    """Write ``prefix.key`` (0600) and ``prefix.pem``; return their paths."""
    key_path, cert_path = _with(prefix, ".key"), _with(prefix, ".pem")
    _write_private(key_path, _key_pem(issued.key))
    _write_public(cert_path, _cert_pem(issued.cert))
    return key_path, cert_path


def load(prefix: Path) -> Issued:
    """Read ``prefix.key`` and ``prefix.pem``.

    Raises:
        CertError: a file is missing or unreadable.
    """
    try:
        key = serialization.load_pem_private_key(_with(prefix, ".key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate(_with(prefix, ".pem").read_bytes())
    except (OSError, ValueError) as e:
        raise CertError(
            f"cannot read {prefix}.key/.pem ({e}); run 'jobworker-certs init' first"
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{prefix}.key is not an ECDSA key")
    return Issued(key, cert)


LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def make_pki(directory: Path, hosts: Sequence[str] = (), *, ca_name: str = "jobworker CA") -> None:
    """Write ``ca.pem``/``ca.key`` and ``server.pem``/``server.key`` to ``directory`` (made
    0700 if missing). The server certificate names localhost, 127.0.0.1, ::1 and ``hosts``.

    Raises:
        CertError: one of the files exists already.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("ca", "server"):
        for suffix in (".key", ".pem"):
            if (directory / (name + suffix)).exists():
                raise CertError(
                    f"{directory / (name + suffix)} exists; use another DIR or remove it first"
                )
    ca = make_ca(ca_name)
    dns = [*LOCAL_NAMES, *(h for h in hosts if not _is_ip(h))]
    ips = [*LOCAL_IPS, *(h for h in hosts if _is_ip(h))]
    save(ca, directory / "ca")
    save(issue_server(ca, list(dict.fromkeys(dns)), list(dict.fromkeys(ips))), directory / "server")


def make_server(directory: Path, name: str, hosts: Sequence[str]) -> Path:
    """Write ``NAME.pem``/``NAME.key`` to ``directory``: a server certificate naming
    ``hosts``, signed by its ``ca.key`` (one more server of a fleet); return its path.

    Raises:
        CertError: a bad name, no host, no CA in ``directory``, or the files exist already.
    """
    if not hosts:
        raise CertError("name where clients reach this server: --host NAME (repeatable)")
    for suffix in (".key", ".pem"):
        if (directory / (name + suffix)).exists():
            raise CertError(f"{directory / (name + suffix)} exists; choose another NAME")
    dns = [h for h in hosts if not _is_ip(h)]
    ips = [h for h in hosts if _is_ip(h)]
    issued = issue_server(load(directory / "ca"), dns, ips)
    _, cert = save(issued, directory / _check_name(name, "server"))
    return cert


def _check_name(name: str, what: str = "client") -> str:
    if not name or name.startswith(".") or any(not (c.isalnum() or c in "._-@") for c in name):
        raise CertError(
            f"{what} name {name!r} is not usable as a name and file name; use letters, "
            "digits, '.', '_', '-' or '@', not starting with '.'"
        )
    return name


def make_client(
    directory: Path, name: str, role: Role = Role.USER, *, days: float = CLIENT_DAYS
) -> Path:
    """Write ``NAME.pem``/``NAME.key`` to ``directory``, signed by its ``ca.key``; return the
    certificate's path.

    Raises:
        CertError: a bad name, no CA in ``directory``, or the files exist already.
    """
    if days <= 0:
        raise CertError(f"--days must be positive, not {days:g}")
    _, cert = save(
        issue_client(load(directory / "ca"), _check_name(name), role, days=days), directory / name
    )
    return cert


def make_p12(directory: Path, name: str, password: str | None = None) -> str:
    """Write ``NAME.p12`` (0600): ``NAME``'s key and certificate with the CA's, for
    importing into a browser, encrypted with ``password`` (None: a new random one).
    Returns the password.

    Raises:
        CertError: no such client in ``directory``, the file exists, or an empty password.
    """
    if password is not None and not password:
        raise CertError("--p12-password must not be empty (a browser refuses an empty one)")
    issued = load(directory / _check_name(name))
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    # 18 random bytes: 24 characters a person can type, 144 bits against guessing.
    secret = password if password is not None else secrets.token_urlsafe(18)
    # PBES2 with AES-256 and PBKDF2-SHA256: what Chrome and Firefox import today.
    data = pkcs12.serialize_key_and_certificates(
        name.encode(),
        issued.key,
        issued.cert,
        [ca],
        serialization.BestAvailableEncryption(secret.encode()),
    )
    _write_private(_with(directory / name, ".p12"), data)
    return secret


def make_dev_pki(directory: Path, users: dict[str, Role] | None = None) -> Path:
    """:func:`make_pki` plus one client per user (default: ``admin`` as admin, ``alice`` as
    user); returns ``directory``."""
    make_pki(directory)
    for name, role in (users or {"admin": Role.ADMIN, "alice": Role.USER}).items():
        make_client(directory, name, role)
    return directory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobworker-certs", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--version", action="version", version=f"jobworker-certs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write DIR/ca.pem, ca.key, server.pem, server.key (keys 0600)")
    p.add_argument("dir", type=Path)
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="another DNS name or IP address for the server certificate (repeatable)",
    )
    p.add_argument("--ca-name", default="jobworker CA", help="the CA's common name")
    p = sub.add_parser(
        "server",
        help="write DIR/NAME.pem and NAME.key: a certificate for one more server, signed by "
        "DIR/ca.key",
    )
    p.add_argument("dir", type=Path)
    p.add_argument("name", help="the file name (e.g. the server's name)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name (or *.wildcard) or IP address clients reach it at (repeatable)",
    )
    p = sub.add_parser("client", help="write DIR/NAME.pem and NAME.key, signed by DIR/ca.key")
    p.add_argument("dir", type=Path)
    p.add_argument("name", help="the user name (certificate subject CN)")
    p.add_argument("--role", choices=[r.value for r in Role], default=Role.USER.value)
    p.add_argument("--days", type=float, default=CLIENT_DAYS, help="validity (default %(default)s)")
    p.add_argument(
        "--p12",
        action="store_true",
        help="also write DIR/NAME.p12 (key, certificate and CA) to import into a browser",
    )
    p.add_argument(
        "--p12-password",
        metavar="PASSWORD",
        help="the .p12's password (default: a random one, printed once)",
    )
    p = sub.add_parser("fingerprint", help="print a certificate's SHA-256 fingerprint")
    p.add_argument("cert", type=Path)
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "init":
        make_pki(args.dir, args.host, ca_name=args.ca_name)
        names = ", ".join([*LOCAL_NAMES, *LOCAL_IPS, *args.host])
        return (
            f"wrote {args.dir}/ca.pem, ca.key, server.pem, server.key (keys 0600); "
            f"the server certificate names {names}"
        )
    if args.command == "server":
        path = make_server(args.dir, args.name, args.host)
        return f"wrote {path} and its key (0600); it names {', '.join(args.host)}"
    if args.command == "client":
        if args.p12_password is not None and not args.p12:
            raise CertError("--p12-password goes with --p12")
        if args.p12 and args.p12_password == "":
            raise CertError("--p12-password must not be empty (a browser refuses an empty one)")
        path = make_client(args.dir, args.name, Role(args.role), days=args.days)
        done = f"wrote {path} and its key ({args.role}, valid {args.days:g} days)"
        if args.p12:
            secret = make_p12(args.dir, args.name, args.p12_password)
            p12 = _with(args.dir / args.name, ".p12")
            done += f"\nwrote {p12} (0600) for a browser"
            if args.p12_password is None:
                done += f"; its password, shown only now: {secret}"
        return done
    try:
        cert = x509.load_pem_x509_certificate(args.cert.read_bytes())
    except (OSError, ValueError) as e:
        raise CertError(f"cannot read certificate {args.cert}: {e}") from e
    return fingerprint(cert)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(_run(args))
    except (CertError, ValueError) as e:
        print(f"jobworker-certs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
