"""Who a client certificate says its holder is: user name (subject CN) and role.

The role is the X.509 extension 1.2.840.10070.8.1 holding a DER UTF8String, "admin" or
"user". A certificate without it is a user; one whose extension is malformed or names another
role is refused, never guessed.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

__all__ = [
    "ROLE_OID",
    "Identity",
    "IdentityError",
    "Role",
    "encode_role",
    "fingerprint",
    "identity_from_pem",
]

ROLE_OID = x509.ObjectIdentifier("1.2.840.10070.8.1")
_UTF8STRING = 0x0C


class IdentityError(ValueError):
    """The certificate does not name a valid identity; the message says what is wrong.
    ``subject`` (its CN, if readable) and ``fingerprint`` say which certificate."""

    def __init__(self, message: str, subject: str = "", fingerprint: str = "") -> None:
        super().__init__(message)
        self.subject = subject
        self.fingerprint = fingerprint


class Role(enum.StrEnum):
    ADMIN = "admin"
    USER = "user"


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller: ``name`` (subject CN), ``role``, the certificate's SHA-256, and
    the end of its validity (Unix seconds)."""

    name: str
    role: Role
    fingerprint: str
    not_after: float = float("inf")

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def encode_role(role: Role) -> bytes:
    """The role extension's DER value: a UTF8String."""
    raw = role.value.encode()
    return bytes([_UTF8STRING, len(raw)]) + raw


def _decode_role(der: bytes) -> Role:
    # A DER UTF8String: tag, then a short-form length (the valid values are 4-5 bytes long).
    if len(der) < 2 or der[0] != _UTF8STRING:
        raise IdentityError("the role extension is not a DER UTF8String")
    length = der[1]
    if length & 0x80 or len(der) != 2 + length:
        raise IdentityError("the role extension has a bad length")
    try:
        text = der[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError("the role extension is not valid UTF-8") from None
    try:
        return Role(text)
    except ValueError:
        raise IdentityError(f"the role extension says {text!r}; expected admin or user") from None


def fingerprint(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the certificate's DER form."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def identity_from_pem(pem: bytes) -> Identity:
    """The identity in a PEM certificate (already verified by the TLS layer).

    Raises:
        IdentityError: no usable CN, or a malformed role extension.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise IdentityError(f"unreadable certificate: {e}") from e
    digest = fingerprint(cert)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise IdentityError(
            "the certificate subject must have exactly one CN (the user name)", "", digest
        )
    name = names[0].value
    if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 256:
        raise IdentityError("the certificate CN is not a usable user name", "", digest)
    try:
        ext = cert.extensions.get_extension_for_oid(ROLE_OID)
    except x509.ExtensionNotFound:
        role = Role.USER
    except x509.DuplicateExtension as e:
        # Two role extensions (or two of any extension): which role would be meant is
        # exactly what must not be guessed.
        raise IdentityError(
            f"the certificate carries an extension twice ({e.oid.dotted_string}); "
            "issue it again with one role",
            name,
            digest,
        ) from None
    else:
        value = ext.value
        if not isinstance(value, x509.UnrecognizedExtension):
            raise IdentityError("the role extension is not an opaque value", name, digest)
        try:
            role = _decode_role(value.value)
        except IdentityError as e:
            raise IdentityError(str(e), name, digest) from None
    return Identity(
        name=name, role=role, fingerprint=digest, not_after=cert.not_valid_after_utc.timestamp()
    )
