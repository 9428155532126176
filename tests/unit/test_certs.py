"""jobworker-certs: the file names, modes, names and roles that the README and demos rely on."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from jobworker.certs import issue_client, load, make_dev_pki
from jobworker.identity import (
    ROLE_OID,
    IdentityError,
    Role,
    encode_role,
    fingerprint,
    identity_from_pem,
)

CERTS = str(Path(sys.executable).parent / "jobworker-certs")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CERTS, *args], capture_output=True, text=True, timeout=60, check=False)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_and_client_write_the_contract_files(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    result = _run("init", str(pki), "--host", "worker1.example", "--host", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    result = _run("client", str(pki), "alice")
    assert result.returncode == 0, result.stderr
    result = _run("client", str(pki), "root.ops", "--role", "admin", "--days", "2")
    assert result.returncode == 0, result.stderr
    names = ["ca", "server", "alice", "root.ops"]
    assert sorted(p.name for p in pki.iterdir()) == sorted(
        [f"{n}.pem" for n in names] + [f"{n}.key" for n in names]
    )
    for name in names:
        assert stat.S_IMODE((pki / f"{name}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700

    ca = _cert(pki / "ca.pem")
    server = _cert(pki / "server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "worker1.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")
    ]
    for leaf, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (_cert(pki / "alice.pem"), ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        assert leaf.issuer == ca.subject
        leaf.verify_directly_issued_by(ca)
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        assert isinstance(leaf.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
        assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
        assert usage in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    alice = identity_from_pem((pki / "alice.pem").read_bytes())
    assert (alice.name, alice.role) == ("alice", Role.USER)
    ops_cert = _cert(pki / "root.ops.pem")
    ops = identity_from_pem((pki / "root.ops.pem").read_bytes())
    assert (ops.name, ops.role) == ("root.ops", Role.ADMIN)
    life = ops_cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=1, hours=23) < life <= dt.timedelta(days=2)
    default_life = _cert(pki / "alice.pem").not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert default_life <= dt.timedelta(days=30)

    result = _run("fingerprint", str(pki / "alice.pem"))
    assert result.stdout.strip() == fingerprint(_cert(pki / "alice.pem"))


def test_server_adds_a_certificate_for_one_more_server_of_a_fleet(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert _run("init", str(pki)).returncode == 0
    hosts = ("web-1.example", "*.jobworkerd.jobworker.svc.cluster.local", "10.0.0.5")
    result = _run("server", str(pki), "web-1", *(f"--host={h}" for h in hosts))
    assert result.returncode == 0, result.stderr
    cert = _cert(pki / "web-1.pem")
    cert.verify_directly_issued_by(_cert(pki / "ca.pem"))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == list(hosts[:2])
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(hosts[2])]
    assert stat.S_IMODE((pki / "web-1.key").stat().st_mode) == 0o600
    for args, message in (
        (("server", str(pki), "web-2"), "name where clients reach this server: --host NAME"),
        (("server", str(pki), "web-1", "--host", "x"), "web-1.key exists; choose another"),
    ):
        refused = _run(*args)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1
        assert message in refused.stderr, refused.stderr


def test_client_p12_for_a_browser_holds_key_certificate_and_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert _run("init", str(pki)).returncode == 0
    result = _run("client", str(pki), "carol", "--p12")
    assert result.returncode == 0, result.stderr
    password = result.stdout.strip().rsplit(": ", 1)[1]
    assert len(password) >= 20
    p12 = pki / "carol.p12"
    assert stat.S_IMODE(p12.stat().st_mode) == 0o600
    key, cert, cas = pkcs12.load_key_and_certificates(p12.read_bytes(), password.encode())
    assert cert == _cert(pki / "carol.pem")
    assert key is not None
    assert key.public_key() == load(pki / "carol").key.public_key()
    assert cas == [_cert(pki / "ca.pem")]
    chosen = _run("client", str(pki), "dave", "--p12", "--p12-password", "s3cret")
    assert "password" not in chosen.stdout  # given, so not printed
    pkcs12.load_key_and_certificates((pki / "dave.p12").read_bytes(), b"s3cret")
    for args, message in (
        (("client", str(pki), "erin", "--p12-password", "x"), "--p12-password goes with --p12"),
        (("client", str(pki), "erin", "--p12", "--p12-password", ""), "must not be empty"),
    ):
        refused = _run(*args)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1
        assert message in refused.stderr


def test_errors_are_one_line_and_nothing_is_overwritten(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert _run("init", str(pki)).returncode == 0
    key = (pki / "ca.key").read_bytes()
    cases = [
        (("init", str(pki)), f"jobworker-certs: {pki}/ca.key exists; use another DIR"),
        (("client", str(tmp_path / "none"), "bob"), "run 'jobworker-certs init' first"),
        (("client", str(pki), "../bob"), "client name '../bob' is not usable"),
        (("client", str(pki), "bob", "--days", "0"), "--days must be positive, not 0"),
        (("fingerprint", str(tmp_path / "x.pem")), "cannot read certificate"),
    ]
    for args, message in cases:
        result = _run(*args)
        assert result.returncode == 1, args
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr
    assert _run("client", str(pki), "bob").returncode == 0
    result = _run("client", str(pki), "bob")
    assert result.returncode == 1
    assert "bob.key exists" in result.stderr
    assert (pki / "ca.key").read_bytes() == key


def _der(tag: int, body: bytes) -> bytes:
    """One DER TLV."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + body


def _tlv(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the TLV) of the DER element at ``at``."""
    tag, first = data[at], data[at + 1]
    if first < 0x80:
        return tag, at + 2, at + 2 + first
    size = first & 0x7F
    length = int.from_bytes(data[at + 2 : at + 2 + size], "big")
    return tag, at + 2 + size, at + 2 + size + length


def _with_role_twice(tmp_path: Path) -> bytes:
    """A client certificate whose role extension appears twice, signed by the CA: the kind
    cryptography's builder refuses to make, so the extension is doubled in the DER."""
    make_dev_pki(tmp_path / "pki", {"alice": Role.USER})
    ca = load(tmp_path / "pki" / "ca")
    cert = issue_client(ca, "mallory", Role.ADMIN).cert
    der = cert.public_bytes(serialization.Encoding.DER)
    _, cert_body, _ = _tlv(der, 0)
    _, tbs_body, tbs_end = _tlv(der, cert_body)
    tbs = der[tbs_body:tbs_end]
    sigalg = der[tbs_end : _tlv(der, tbs_end)[2]]
    oid = x509.ObjectIdentifier(ROLE_OID.dotted_string)
    role_ext = _der(0x30, _der(0x06, _oid_body(oid)) + _der(0x04, encode_role(Role.ADMIN)))
    assert tbs.endswith(role_ext), "the role extension is expected last"
    # Walk to the [3] extensions element (the last of the TBS), and rebuild it doubled.
    at = 0
    while True:
        tag, body, end = _tlv(tbs, at)
        if tag == 0xA3:
            break
        at = end
    _, seq_body, seq_end = _tlv(tbs, body)
    extensions = tbs[seq_body:seq_end] + role_ext
    new_tbs = _der(0x30, tbs[:at] + _der(0xA3, _der(0x30, extensions)))
    signature = ca.key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    doubled = _der(0x30, new_tbs + sigalg + _der(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(doubled).public_bytes(serialization.Encoding.PEM)


def _oid_body(oid: x509.ObjectIdentifier) -> bytes:
    parts = [int(p) for p in oid.dotted_string.split(".")]
    out = bytes([parts[0] * 40 + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        rest = part >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return out


def test_a_certificate_with_two_role_extensions_is_refused_with_its_fingerprint(
    tmp_path: Path,
) -> None:
    pem = _with_role_twice(tmp_path)
    with pytest.raises(IdentityError, match="extension twice") as caught:
        identity_from_pem(pem)
    assert caught.value.subject == "mallory"
    assert caught.value.fingerprint == fingerprint(x509.load_pem_x509_certificate(pem))
