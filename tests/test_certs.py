"""Tests of `deferredseg certs`: the files written, their modes, overwrite refusal and certificate checks."""

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import PolicyBuilder, Store

from cli.main import main

HOSTS = ["127.0.0.1", "localhost", "superlink.hospital.example", "::1"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    """Run with umask 0, so only the code itself can make key files private."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def _make_ca(folder: Path) -> None:
    assert main(["certs", "ca", "--out-dir", str(folder)]) == 0


def test_ca_files_and_modes(tmp_path: Path, loose_umask: None) -> None:
    _make_ca(tmp_path)

    assert _mode(tmp_path / "ca.key") == 0o600
    assert _mode(tmp_path / "ca.pem") == 0o644
    certificate = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    key = load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=None)
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert certificate.subject == certificate.issuer
    assert certificate.public_key() == key.public_key()
    certificate.verify_directly_issued_by(certificate)


def test_superlink_verifies_each_host(tmp_path: Path, loose_umask: None) -> None:
    _make_ca(tmp_path)
    host_args = [arg for host in HOSTS for arg in ("--host", host)]
    assert main(["certs", "superlink", "--out-dir", str(tmp_path), *host_args]) == 0

    assert _mode(tmp_path / "superlink.key") == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((tmp_path / "superlink.pem").read_bytes())
    key = load_pem_private_key((tmp_path / "superlink.key").read_bytes(), password=None)
    assert leaf.public_key() == key.public_key()

    for host in HOSTS:
        try:
            subject = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            subject = x509.DNSName(host)
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == ca, host


def test_superlink_rejects_other_host(tmp_path: Path) -> None:
    _make_ca(tmp_path)
    assert main(["certs", "superlink", "--out-dir", str(tmp_path), "--host", "localhost"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((tmp_path / "superlink.pem").read_bytes())

    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("other.example"))
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(leaf, [])


def test_superlink_invalid_host(tmp_path: Path) -> None:
    _make_ca(tmp_path)
    assert main(["certs", "superlink", "--out-dir", str(tmp_path), "--host", "bad host!"]) == 2
    assert not (tmp_path / "superlink.pem").exists()


def test_superlink_without_ca(tmp_path: Path) -> None:
    assert main(["certs", "superlink", "--out-dir", str(tmp_path), "--host", "localhost"]) == 2
    assert not (tmp_path / "superlink.key").exists()


def test_node_key_pair(tmp_path: Path, loose_umask: None) -> None:
    assert main(["certs", "node", "site-1", "--out-dir", str(tmp_path)]) == 0

    private_path, public_path = tmp_path / "site-1.key", tmp_path / "site-1.pub"
    assert _mode(private_path) == 0o600
    assert _mode(public_path) == 0o644
    assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = load_ssh_private_key(private_path.read_bytes(), password=None)
    public = load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert public == private.public_key()
    assert public_path.read_text().split()[0] == "ecdsa-sha2-nistp384"
    assert public_path.read_text().split()[-1] == "site-1"


def test_node_key_accepted_by_flower(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    assert main(["certs", "node", "site-2", "--out-dir", str(tmp_path), "--curve", "P-256"]) == 0
    loaded = try_load_public_key(tmp_path / "site-2.pub")
    assert b"BEGIN PUBLIC KEY" in loaded


@pytest.mark.parametrize(
    ("command", "files"),
    [
        (["ca"], ["ca.key", "ca.pem"]),
        (["superlink", "--host", "localhost"], ["superlink.key", "superlink.pem"]),
        (["node", "site-1"], ["site-1.key", "site-1.pub"]),
    ],
)
def test_overwrite_refused_then_forced(tmp_path: Path, command: list[str], files: list[str]) -> None:
    _make_ca(tmp_path / "ca")
    extra = ["--ca-dir", str(tmp_path / "ca")] if command[0] == "superlink" else []
    args = ["certs", *command, "--out-dir", str(tmp_path), *extra]
    assert main(args) == 0
    before = {name: (tmp_path / name).read_bytes() for name in files}

    assert main(args) == 1
    for name in files:
        assert (tmp_path / name).read_bytes() == before[name], name

    assert main([*args, "--force"]) == 0
    for name in files:
        assert (tmp_path / name).read_bytes() != before[name], name
    private = next(name for name in files if name.endswith(".key"))
    assert _mode(tmp_path / private) == 0o600


def test_partial_existing_refused(tmp_path: Path) -> None:
    (tmp_path / "site-1.pub").write_text("old\n")

    assert main(["certs", "node", "site-1", "--out-dir", str(tmp_path)]) == 1
    assert not (tmp_path / "site-1.key").exists()
    assert (tmp_path / "site-1.pub").read_text() == "old\n"


def test_next_commands_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_ca(tmp_path)
    assert main(["certs", "superlink", "--out-dir", str(tmp_path), "--host", "localhost", "--port", "9443"]) == 0
    assert main(["certs", "node", "site-1", "--out-dir", str(tmp_path / "keys")]) == 0
    output = capsys.readouterr().out

    assert "flower-superlink --ssl-ca-certfile" in output
    assert "--enable-supernode-auth" in output
    assert "--port 9443" in output
    assert "--host 127.0.0.1 --port 9443" in output  # a loopback-only certificate listens on loopback
    assert f"flwr supernode register {tmp_path / 'keys' / 'site-1.pub'}" in output
    assert "--clientappio-port 9094" in output
    assert "deferredseg node start --site-dir SITE_DIR --state-dir STATE_DIR --superlink SUPERLINK_HOST:9092" in output
    assert f"--auth-key {tmp_path / 'keys' / 'site-1.key'}" in output
