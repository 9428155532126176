"""Mutual TLS 1.3: who gets in, who does not, and the identity a certificate carries."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc
from jobworker.api._tls import check_tls13_only
from jobworker.certs import issue_client, make_ca, save
from jobworker.identity import IdentityError, Role, fingerprint, identity_from_pem

from .conftest import Pki, Running, cert_pool, serving

UNKNOWN = "00000000-0000-4000-8000-000000000000"


async def _status_of(stub: pb_grpc.JobServiceStub) -> grpc.StatusCode:
    try:
        await stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _raw_client(running: Running, cert: str | None, *, ca: str = "ca") -> grpc.StatusCode:
    d = running.pki.dir
    root = (d / f"{ca}.pem").read_bytes()
    key = (d / f"{cert}.key").read_bytes() if cert else None
    chain = (d / f"{cert}.pem").read_bytes() if cert else None
    creds = grpc.ssl_channel_credentials(root, key, chain)
    async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", creds) as channel:
        return await _status_of(pb_grpc.JobServiceStub(channel))


async def test_valid_certificate_is_accepted(api: Running) -> None:
    async with api.client("alice") as stub:
        assert await _status_of(stub) == grpc.StatusCode.OK


async def test_a_certificate_that_expires_on_an_open_connection_is_refused(api: Running) -> None:
    api.pki.issue("brief", cn="alice", days=1)
    async with api.client("brief") as stub:
        assert await _status_of(stub) == grpc.StatusCode.OK
        auth = api.server.service.auth
        auth.clock = lambda: time.time() + 2 * 86400
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (caught.value.details() or "")
        auth.clock = time.time
        assert await _status_of(stub) == grpc.StatusCode.OK


async def test_no_client_certificate_is_rejected(api: Running) -> None:
    assert await _raw_client(api, None) == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_another_ca_is_rejected(api: Running) -> None:
    other = make_ca("some other CA")
    save(other, api.pki.dir / "other-ca")
    save(issue_client(other, "alice", Role.ADMIN), api.pki.dir / "mallory")
    assert await _raw_client(api, "mallory") == grpc.StatusCode.UNAVAILABLE


async def test_expired_certificate_is_rejected(api: Running) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    api.pki.issue("expired", cn="alice", days=1, now=past)
    assert await _raw_client(api, "expired") == grpc.StatusCode.UNAVAILABLE


async def test_revoked_certificate_is_rejected_and_reload_applies(tmp_path: Path, pki: Pki) -> None:
    bob = fingerprint(_cert(pki, "bob"))
    pool = cert_pool(tmp_path, revoked=[bob])
    async with serving(tmp_path, pki, pool=pool) as running:
        async with running.client("bob") as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListJobs(pb.ListJobsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (err.value.details() or "")
        async with running.client("alice") as stub:
            assert await _status_of(stub) == grpc.StatusCode.OK
        # Revoke alice instead, as an operator would, and reload (what SIGHUP does).
        assert pool.revoked is not None
        pool.revoked.write_text(fingerprint(_cert(pki, "alice")) + "\n")
        running.server.reload_certificates()
        async with running.client("alice") as stub:
            assert await _status_of(stub) == grpc.StatusCode.UNAUTHENTICATED
        async with running.client("bob") as stub:
            assert await _status_of(stub) == grpc.StatusCode.OK


async def test_allowlist_admits_only_listed_certificates(tmp_path: Path, pki: Pki) -> None:
    pool = cert_pool(tmp_path, allowed=[fingerprint(_cert(pki, "alice"))])
    async with serving(tmp_path, pki, pool=pool) as running:
        async with running.client("alice") as stub:
            assert await _status_of(stub) == grpc.StatusCode.OK
        async with running.client("bob") as stub:
            assert await _status_of(stub) == grpc.StatusCode.UNAUTHENTICATED


def _cert(pki: Pki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki.dir / f"{name}.pem").read_bytes())


def _tls_handshake(running: Running, user: str, version: ssl.TLSVersion) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(running.pki.dir / "ca.pem")
    context.load_cert_chain(running.pki.dir / f"{user}.pem", running.pki.dir / f"{user}.key")
    context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        return tls.version() or ""


async def test_tls12_client_is_rejected_and_tls13_accepted(api: Running) -> None:
    # A TLS 1.2 client with a perfectly valid certificate still cannot get in.
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(_tls_handshake, api, "alice", ssl.TLSVersion.TLSv1_2)
    assert (
        await asyncio.to_thread(_tls_handshake, api, "alice", ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    )
    # And the server's own start-up check agrees.
    await asyncio.to_thread(check_tls13_only, "127.0.0.1", api.port)


async def test_client_refuses_wrong_server_hostname(api: Running) -> None:
    async with api.client("alice", target_name="not-the-server.example") as stub:
        assert await _status_of(stub) == grpc.StatusCode.UNAVAILABLE


async def test_malformed_role_is_rejected_with_reason(api: Running) -> None:
    api.pki.issue("weird", cn="carol", raw_role=b"\x0c\x04root")
    async with api.client("weird") as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expected admin or user" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x13\x05admin", "not a DER UTF8String"),  # PrintableString, not UTF8String
        (b"\x0c\x09admin", "bad length"),
        (b"\x0c\x81\x05admin", "bad length"),
        (b"\x0c\x02\xff\xfe", "not valid UTF-8"),
        (b"\x0c\x05Admin", "expected admin or user"),
        (b"", "not a DER UTF8String"),
    ],
)
def test_role_extension_parsing_rejects_malformed_values(
    pki: Pki, raw: bytes, message: str
) -> None:
    cert = issue_client(pki.ca, "carol", raw_role=raw).cert
    with pytest.raises(IdentityError, match=message):
        identity_from_pem(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(
    ("role", "expected"), [(Role.ADMIN, Role.ADMIN), (Role.USER, Role.USER), (None, Role.USER)]
)
def test_role_extension_parsing(pki: Pki, role: Role | None, expected: Role) -> None:
    cert = issue_client(pki.ca, "dave", role).cert
    identity = identity_from_pem(cert.public_bytes(serialization.Encoding.PEM))
    assert (identity.name, identity.role) == ("dave", expected)
    assert identity.fingerprint == fingerprint(cert)
