"""jobworker-certs: the file names, modes, names and roles that the README and demos rely on."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from jobworker.identity import Role, fingerprint, identity_from_pem

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
