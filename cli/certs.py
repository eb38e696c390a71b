"""The `deferredseg certs` commands: federation CA, SuperLink TLS certificate and node authentication keys."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

# Default output folders, relative to the working directory; .gitignore excludes both.
DEFAULT_CERT_DIR = Path("deploy/certs")
DEFAULT_KEY_DIR = Path("deploy/keys")

# Flower 1.42 accepts node keys on any NIST curve (SECP256R1, SECP384R1, SECP521R1).
NODE_CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
KEY_DIR_MODE = 0o700

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class CertificateOptions:
    """Lifetimes and curve of the federation's TLS certificates.

    Attributes:
        ca_days: validity of the CA certificate in days.
        server_days: validity of the SuperLink certificate in days; renew it before it expires.
        curve: EC curve of the CA and SuperLink keys.
    """

    ca_days: int = 3650
    server_days: int = 825
    curve: type[ec.EllipticCurve] = ec.SECP384R1


@dataclass(frozen=True)
class SuperLinkAddress:
    """Where the next-command hints point: the SuperLink's host and port, and the site node's folders.

    Attributes:
        host: host name or IP address that site nodes connect to.
        port: the SuperLink port (Fleet and Control API; Flower 1.42 serves both on one port).
    """

    host: str = "SUPERLINK_HOST"
    port: int = 9092


def parse_host(host: str) -> x509.GeneralName:
    """Return the subject alternative name for ``host``: an IP address entry or a DNS name entry.

    Raises ValueError for a name that is neither an IP address nor a valid DNS name (``*.`` wildcards allowed).
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass

    labels = host.rstrip(".").split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if not host or not labels or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(
            f"--host {host!r} is neither an IP address nor a valid DNS name; give the name or address "
            "that site nodes use to reach the SuperLink"
        )
    return x509.DNSName(host.rstrip("."))


def write_private_file(path: Path, data: bytes, force: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600, created that way so the secret is never readable by others.

    Raises FileExistsError when ``path`` exists and ``force`` is false.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=KEY_DIR_MODE)
    if force and path.exists():
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_MODE)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)

    # The umask may have removed bits, never added them; set the mode explicitly anyway.
    os.chmod(path, PRIVATE_KEY_MODE)


def write_public_file(path: Path, data: bytes, force: bool) -> None:
    """Write a certificate or public key to ``path`` with mode 0644; refuse to replace it unless ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")
    path.write_bytes(data)
    os.chmod(path, PUBLIC_FILE_MODE)


def check_free(paths: Sequence[Path], force: bool) -> None:
    """Raise FileExistsError naming every path of ``paths`` that exists, unless ``force`` is set.

    Checking all outputs before writing any keeps a refused command from leaving a half-written set.
    """
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --force to replace them, or choose --out-dir")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DeferredSeg federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    # Back-date by a few minutes so a node whose clock runs slightly behind still accepts a fresh certificate.
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)


def create_ca(
    common_name: str, options: CertificateOptions = CertificateOptions()
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed federation CA that may sign server certificates but no further CAs."""
    key = ec.generate_private_key(options.curve())
    name = _name(common_name)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=options.ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, certificate


def create_server_certificate(
    hosts: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    options: CertificateOptions = CertificateOptions(),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a SuperLink TLS certificate, signed by the CA, whose subject alternative names are ``hosts``.

    Each host is an IP address or a DNS name. Raises ValueError when ``hosts`` is empty or a host is invalid.
    """
    if not hosts:
        raise ValueError("no --host given; name every DNS name and IP address that site nodes use for the SuperLink")
    names = [parse_host(host) for host in hosts]

    key = ec.generate_private_key(options.curve())
    public = key.public_key()
    ca_identifier = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=options.server_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_identifier), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, certificate


def create_node_key(curve: str = "P-384", comment: str = "") -> tuple[bytes, bytes]:
    """Create a node authentication key pair; return (OpenSSH private key, OpenSSH public key line).

    Flower 1.42 SuperNodes authenticate with an EC key on a NIST curve, in OpenSSH encoding.
    """
    if curve not in NODE_CURVES:
        raise ValueError(f"--curve {curve!r} is not supported; choose one of {sorted(NODE_CURVES)}")
    key = ec.generate_private_key(NODE_CURVES[curve]())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode("ascii")
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    for path in (cert_path, key_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; create the CA first with: deferredseg certs ca --out-dir {ca_dir}")
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key; recreate the CA with deferredseg certs ca --force")
    return key, certificate


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def run_ca(args: argparse.Namespace) -> int:
    """Write ``ca.pem`` and ``ca.key`` into ``args.out_dir`` and print the next command."""
    options = CertificateOptions(ca_days=args.days)
    cert_path, key_path = args.out_dir / "ca.pem", args.out_dir / "ca.key"
    check_free([cert_path, key_path], args.force)

    key, certificate = create_ca(args.name, options)
    write_private_file(key_path, _pem_key(key), args.force)
    write_public_file(cert_path, _pem_certificate(certificate), args.force)

    print(f"wrote {cert_path} (CA certificate: give it to every site) and {key_path} (CA private key: keep it offline)")
    print("next, create the SuperLink certificate for every name and address that sites use to reach it:")
    print(f"  deferredseg certs superlink --ca-dir {_q(args.out_dir)} --out-dir {_q(args.out_dir)} --host SUPERLINK_HOST")
    return 0


def run_superlink(args: argparse.Namespace) -> int:
    """Write ``superlink.pem`` and ``superlink.key`` signed by the CA in ``args.ca_dir``; print the next commands."""
    options = CertificateOptions(server_days=args.days)
    out_dir: Path = args.out_dir
    ca_dir: Path = args.ca_dir or out_dir
    cert_path, key_path = out_dir / "superlink.pem", out_dir / "superlink.key"
    check_free([cert_path, key_path], args.force)

    ca_key, ca_certificate = _load_ca(ca_dir)
    key, certificate = create_server_certificate(args.host, ca_key, ca_certificate, options)
    write_private_file(key_path, _pem_key(key), args.force)
    write_public_file(cert_path, _pem_certificate(certificate), args.force)

    ca_path = ca_dir / "ca.pem"
    # A certificate for loopback names only serves a test on this machine, so listen on loopback then.
    loopback_only = all(host in ("127.0.0.1", "localhost", "::1") for host in args.host)
    listen = "127.0.0.1" if loopback_only else "0.0.0.0"
    print(f"wrote {cert_path} and {key_path} for {', '.join(args.host)}")
    print("next, start the SuperLink with TLS and node authentication:")
    print(
        f"  flower-superlink --ssl-ca-certfile {_q(ca_path)} --ssl-certfile {_q(cert_path)} "
        f"--ssl-keyfile {_q(key_path)} --enable-supernode-auth --database superlink.db "
        f"--host {listen} --port {args.port}"
    )
    print("then create each site's node key (at the site) with: deferredseg certs node SITE")
    return 0


def run_node(args: argparse.Namespace) -> int:
    """Write the node key pair ``<site>.key`` and ``<site>.pub`` into ``args.out_dir``; print the next commands."""
    if not _SITE_NAME.match(args.site):
        raise ValueError(f"site name {args.site!r} is invalid; use letters, digits, '.', '_' and '-' only")
    key_path, public_path = args.out_dir / f"{args.site}.key", args.out_dir / f"{args.site}.pub"
    check_free([key_path, public_path], args.force)

    private, public = create_node_key(args.curve, comment=args.site)
    write_private_file(key_path, private, args.force)
    write_public_file(public_path, public, args.force)

    address = SuperLinkAddress(args.superlink_host, args.port)
    print(f"wrote {key_path} (private: stays at the site) and {public_path} (public: send it to the coordinator)")
    print("next, the coordinator registers the public key with the SuperLink:")
    print(f"  flwr supernode register {_q(public_path)} CONNECTION")
    print("then the site starts its node (give each node on one machine its own --clientappio-port):")
    print(
        f"  deferredseg node start --site-dir SITE_DIR --state-dir STATE_DIR "
        f"--superlink {address.host}:{address.port} --root-certificates ca.pem --auth-key {_q(key_path)} "
        "--clientappio-port 9094"
    )
    return 0


def _refusing_overwrite(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap ``handler`` so that a refused overwrite prints one error line and returns 1 instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except FileExistsError as error:
            print(f"deferredseg certs {args.certs_command}: error: {error}", file=sys.stderr)
            return 1

    return run


def add_certs_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `certs` command and its subcommands `ca`, `superlink` and `node`."""
    certs = subparsers.add_parser("certs", help="create the federation CA, the SuperLink certificate and node keys")
    commands = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    defaults = CertificateOptions()

    ca = commands.add_parser("ca", help="create the federation CA (ca.pem, ca.key)")
    ca.add_argument("--out-dir", type=Path, default=DEFAULT_CERT_DIR, help=f"output folder (default {DEFAULT_CERT_DIR})")
    ca.add_argument("--name", default="DeferredSeg federation CA", help="common name of the CA certificate")
    ca.add_argument("--days", type=int, default=defaults.ca_days, help=f"validity in days (default {defaults.ca_days})")
    ca.add_argument("--force", action="store_true", help="replace existing files")
    ca.set_defaults(func=_refusing_overwrite(run_ca))

    superlink = commands.add_parser(
        "superlink", help="create the SuperLink TLS certificate (superlink.pem, superlink.key) signed by the CA"
    )
    superlink.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="DNS name or IP address that site nodes use to reach the SuperLink (repeatable)",
    )
    superlink.add_argument(
        "--out-dir", type=Path, default=DEFAULT_CERT_DIR, help=f"output folder (default {DEFAULT_CERT_DIR})"
    )
    superlink.add_argument("--ca-dir", type=Path, help="folder with ca.pem and ca.key (default: --out-dir)")
    superlink.add_argument(
        "--days", type=int, default=defaults.server_days, help=f"validity in days (default {defaults.server_days})"
    )
    superlink.add_argument(
        "--port", type=int, default=SuperLinkAddress.port, help="SuperLink port shown in the printed command"
    )
    superlink.add_argument("--force", action="store_true", help="replace existing files")
    superlink.set_defaults(func=_refusing_overwrite(run_superlink))

    node = commands.add_parser("node", help="create a site node's authentication key pair (SITE.key, SITE.pub)")
    node.add_argument("site", metavar="SITE", help="site name, used for the file names and the key comment")
    node.add_argument("--out-dir", type=Path, default=DEFAULT_KEY_DIR, help=f"output folder (default {DEFAULT_KEY_DIR})")
    node.add_argument("--curve", choices=sorted(NODE_CURVES), default="P-384", help="NIST curve (default P-384)")
    node.add_argument(
        "--superlink-host",
        default=SuperLinkAddress.host,
        help="SuperLink host shown in the printed command",
    )
    node.add_argument("--port", type=int, default=SuperLinkAddress.port, help="SuperLink port shown in the printed command")
    node.add_argument("--force", action="store_true", help="replace existing files")
    node.set_defaults(func=_refusing_overwrite(run_node))
