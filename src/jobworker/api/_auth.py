"""Authentication (who is calling) and authorization (may they touch this job).

Identity comes only from the client certificate the TLS layer verified, never from request
fields or metadata. Authorization is decided in :func:`may_access`, and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..identity import Identity, IdentityError, identity_from_pem
from ..runtime import JobNotFoundError, NotPermittedError
from ._convert import job_id

__all__ = ["AuthError", "Authenticator", "CertPool", "authorize_job", "list_filter", "may_access"]

log = logging.getLogger("jobworker.auth")
_CACHE_SIZE = 1024


class AuthError(Exception):
    """The caller is not authenticated; the message says why (for the client and the log).
    ``subject`` and ``fingerprint`` name the refused certificate when there was one (for
    the audit log)."""

    def __init__(self, message: str, subject: str = "", fingerprint: str = "") -> None:
        super().__init__(message)
        self.subject = subject
        self.fingerprint = fingerprint


def may_access(who: Identity, owner: str | None) -> bool:
    """The one authorization rule: admins reach every job, users only their own."""
    return owner is not None and (who.is_admin or who.name == owner)


def authorize_job(who: Identity, raw_id: str, owner_of: Callable[[str], str | None]) -> str:
    """The canonical id of the job ``raw_id`` names, if ``who`` may reach it.

    ``owner_of`` answers from the runtime's in-memory owner index, so an unknown id and
    another owner's id take the same path and the same time.

    Raises:
        InvalidSpecError: ``raw_id`` is not a job id at all.
        JobNotFoundError: no such job, or not the caller's: the same error either way.
    """
    canonical = job_id(raw_id)
    if not may_access(who, owner_of(canonical)):
        raise JobNotFoundError(canonical)
    return canonical


def list_filter(who: Identity, requested_owner: str) -> str | None:
    """Whose jobs a listing or a watch shows: a user's own always; an admin's choice
    (None: all).

    Raises:
        NotPermittedError: a user asked for another owner's jobs (said, not silently
            answered with their own).
    """
    if who.is_admin:
        return requested_owner or None
    if requested_owner and requested_owner != who.name:
        raise NotPermittedError(
            "only admins may list other owners' jobs; leave out the owner to see your own"
        )
    return who.name


def _read_fingerprints(path: Path) -> frozenset[str]:
    """SHA-256 fingerprints, one per line (hex, colons allowed); '#' starts a comment."""
    found = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().replace(":", "").lower()
        if not line:
            continue
        if len(line) != 64 or any(c not in "0123456789abcdef" for c in line):
            raise ValueError(f"{path}: {raw.strip()!r} is not a SHA-256 fingerprint")
        found.add(line)
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class CertPool:
    """Optional allow list and revocation list of client-certificate fingerprints."""

    allowlist: Path | None = None
    revoked: Path | None = None

    def load(self) -> tuple[frozenset[str] | None, frozenset[str]]:
        """(allowed or None for "any", revoked).

        Raises:
            OSError, ValueError: a list is unreadable or malformed.
        """
        allowed = _read_fingerprints(self.allowlist) if self.allowlist else None
        revoked = _read_fingerprints(self.revoked) if self.revoked else frozenset()
        return allowed, revoked


class Authenticator:
    """Turns a gRPC call's verified peer certificate into an :class:`Identity`."""

    def __init__(
        self, pool: CertPool | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._pool = pool or CertPool()
        # Settable: tests move it past a certificate's end on a live connection.
        self.clock = clock
        self._allowed, self._revoked = self._pool.load()
        self._cache: OrderedDict[bytes, Identity | AuthError] = OrderedDict()

    def reload(self) -> None:
        """Re-read the allow and revocation lists (on SIGHUP); a bad file keeps the old ones.

        Raises:
            OSError, ValueError: a list could not be read; the previous lists stay in force.
        """
        self._allowed, self._revoked = self._pool.load()
        log.info(
            "client certificate lists reloaded: %s allowed, %d revoked",
            "any" if self._allowed is None else len(self._allowed),
            len(self._revoked),
        )

    def identify(self, context: Any) -> Identity:
        """The caller of a grpc.aio call (Any: grpc.aio's context is untyped; the web
        console's stand-in answers the same ``auth_context``).

        Raises:
            AuthError: no verified certificate, a malformed identity, or a certificate
                expired (since the connection was made), revoked or not on the allow list.
        """
        certs = context.auth_context().get("x509_pem_cert")
        if not certs:
            raise AuthError("no verified client certificate")
        pem: bytes = certs[0]
        found = self._cache.get(pem)
        if found is None:
            try:
                found = identity_from_pem(pem)
            except IdentityError as e:
                found = AuthError(
                    f"the client certificate is not acceptable: {e}",
                    e.subject,
                    e.fingerprint,
                )
            self._cache[pem] = found
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        if isinstance(found, AuthError):
            raise found
        if found.not_after < self.clock():
            # The handshake checked it, but an HTTP/2 connection (a long follow, a jobctl
            # connection keeper) can outlive the certificate: each call checks again.
            raise AuthError(
                "the client certificate has expired; get a new one and reconnect",
                found.name,
                found.fingerprint,
            )
        if found.fingerprint in self._revoked:
            raise AuthError(
                "the client certificate has been revoked", found.name, found.fingerprint
            )
        if self._allowed is not None and found.fingerprint not in self._allowed:
            raise AuthError(
                "the client certificate is not on the server's allow list",
                found.name,
                found.fingerprint,
            )
        return found
