"""The `deferredseg node start` command: check a site node's setup, then run Flower's SuperNode."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.environment import FLOWER_ENVIRONMENT
from common.site import check_site

logger = logging.getLogger(__name__)

PROFILES = ("production", "demo")
DEFAULT_CLIENTAPPIO_PORT = 9094
STATE_DIR_MODE = 0o700

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>[0-9]{1,5})$")
_NODE_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class NodeSettings:
    """Everything `deferredseg node start` needs to check a site node and start its SuperNode.

    Attributes:
        site_dir: the site data folder (contains site.toml); it never leaves the site.
        state_dir: the folder for the site's local heads and expert pseudonyms; created with mode 0700.
        superlink: the SuperLink address as HOST:PORT.
        root_certificates: the federation CA certificate (PEM) that verifies the SuperLink; ``None`` only with
            ``insecure``.
        auth_key: the node's private authentication key (OpenSSH, EC); ``None`` only in the demo profile.
        clientappio_port: the local port on which this SuperNode serves its ClientApp processes; every node on
            one machine needs its own.
        profile: ``production`` requires TLS and node authentication; ``demo`` allows ``insecure``.
        insecure: connect without TLS (demo profile only).
    """

    site_dir: Path
    state_dir: Path
    superlink: str
    root_certificates: Path | None = None
    auth_key: Path | None = None
    clientappio_port: int = DEFAULT_CLIENTAPPIO_PORT
    profile: str = "production"
    insecure: bool = False


def format_node_config(values: Mapping[str, str]) -> str:
    """Return ``values`` as Flower's ``--node-config`` string, each value a quoted TOML string.

    Flower 1.42 splits the string on spaces outside quotes and reads each value as TOML, so a path with spaces
    must be quoted. A literal string ('...') keeps backslashes as they are. Raises ValueError for a key that
    is not a bare TOML key, and for a value that contains both quote characters, which Flower cannot read.
    """
    items: list[str] = []
    for key, value in values.items():
        if not _NODE_CONFIG_KEY.match(key):
            raise ValueError(f"node config key {key!r} is invalid; use letters, digits, '_' and '-' only")
        if "'" not in value:
            items.append(f"{key}='{value}'")
        elif '"' not in value:
            escaped = value.replace("\\", "\\\\")
            items.append(f'{key}="{escaped}"')
        else:
            raise ValueError(f"{key} {value!r} contains both ' and \"; Flower cannot read it, so rename the folder")
    return " ".join(items)


def check_superlink_address(address: str) -> list[str]:
    """Return the problems of ``address``, which must be HOST:PORT (an IPv6 host in brackets)."""
    match = _HOST_PORT.match(address)
    if match is None:
        return [f"--superlink {address!r} is invalid; give HOST:PORT, for example superlink.example.org:9092"]
    if not 1 <= int(match["port"]) <= 65535:
        return [f"--superlink {address!r} has port {match['port']}, outside 1-65535"]
    return []


def check_key_file(path: Path) -> list[str]:
    """Return the problems of the node's private key: missing, readable by group or others, or not an EC key."""
    if not path.is_file():
        return [f"private key {path} not found; create it with: deferredseg certs node SITE"]

    problems: list[str] = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        problems.append(
            f"private key {path} has mode {mode:04o}, so other users can read it; run: chmod 600 {shlex.quote(str(path))}"
        )
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError) as error:
        problems.append(
            f"private key {path} is not an unencrypted OpenSSH private key ({error}); give the SITE.key file written "
            "by deferredseg certs node, not the .pub file"
        )
        return problems
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        problems.append(f"private key {path} is not an EC key; Flower needs EC on a NIST curve (deferredseg certs node)")
    return problems


def check_root_certificates(path: Path) -> list[str]:
    """Return the problems of the CA certificate file: missing, or not a PEM certificate."""
    if not path.is_file():
        return [f"CA certificate {path} not found; copy the federation's ca.pem from the coordinator"]
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as error:
        return [f"CA certificate {path} is not a PEM certificate ({error}); copy ca.pem from the coordinator again"]
    return []


def check_node(settings: NodeSettings) -> list[str]:
    """Return every problem that must stop the node before Flower starts; an empty list means it may start.

    Checks the profile and TLS options, the SuperLink address, the CA certificate, the private key (present,
    mode 0600 or stricter, EC) and the site folder (every problem that `deferredseg site check` lists).
    """
    problems: list[str] = []
    if settings.profile not in PROFILES:
        problems.append(f"--profile {settings.profile!r} is unknown; choose one of {', '.join(PROFILES)}")
    if settings.insecure and settings.profile != "demo":
        problems.append("--insecure turns TLS off, which is allowed only with --profile demo; give --root-certificates")
    if settings.insecure and settings.auth_key is not None:
        problems.append("--auth-key needs TLS, because Flower authenticates nodes only over TLS; drop --insecure")
    if not settings.insecure and settings.root_certificates is None:
        problems.append("TLS needs the federation CA certificate; give --root-certificates ca.pem")
    if settings.profile == "production" and settings.auth_key is None:
        problems.append("node authentication is required outside --profile demo; give --auth-key SITE.key")
    if not 1 <= settings.clientappio_port <= 65535:
        problems.append(f"--clientappio-port {settings.clientappio_port} is outside 1-65535")
    problems += check_superlink_address(settings.superlink)

    if settings.root_certificates is not None:
        problems += check_root_certificates(settings.root_certificates)
    if settings.auth_key is not None:
        problems += check_key_file(settings.auth_key)

    problems += [f"site check: {problem}" for problem in check_site(settings.site_dir)]
    return problems


def build_supernode_command(settings: NodeSettings, executable: str = "flower-supernode") -> list[str]:
    """Return the `flower-supernode` command line for ``settings``, which `check_node` has accepted."""
    command = [executable, "--superlink", settings.superlink]
    if settings.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(Path(settings.root_certificates).resolve())]
    if settings.auth_key is not None:
        command += ["--auth-supernode-private-key", str(settings.auth_key.resolve())]

    node_config = format_node_config(
        {"site-dir": str(settings.site_dir.resolve()), "state-dir": str(settings.state_dir.resolve())}
    )
    command += ["--port", str(settings.clientappio_port), "--node-config", node_config]
    return command


def supernode_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``base`` (default: this process's environment) with Flower's privacy and offline switches set."""
    environment = dict(os.environ if base is None else base)
    environment.update(FLOWER_ENVIRONMENT)
    return environment


def run_supernode(command: Sequence[str], environment: Mapping[str, str]) -> int:
    """Run ``command`` until it exits and return its exit status; SIGTERM and SIGINT are passed on to it.

    A child killed by signal N yields 128 + N, as a shell reports it.
    """
    process = subprocess.Popen(list(command), env=dict(environment))

    def forward(signum: int, _frame: FrameType | None) -> None:
        logger.info("passing signal %d on to flower-supernode (pid %d)", signum, process.pid)
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def find_supernode_executable() -> str | None:
    """Return the `flower-supernode` next to this Python interpreter (a virtual environment), else from PATH."""
    beside = Path(sys.executable).parent / "flower-supernode"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("flower-supernode")


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    """Build NodeSettings from the parsed `node start` arguments."""
    return NodeSettings(
        site_dir=args.site_dir,
        state_dir=args.state_dir,
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        clientappio_port=args.clientappio_port,
        profile=args.profile,
        insecure=args.insecure,
    )


def run_start(args: argparse.Namespace) -> int:
    """Check the node's setup; print every problem and return 2, or start `flower-supernode` and return its status."""
    settings = settings_from_args(args)
    problems = check_node(settings)
    if problems:
        for problem in problems:
            print(f"deferredseg node start: {problem}", file=sys.stderr)
        print(f"deferredseg node start: {len(problems)} problem(s); the node was not started", file=sys.stderr)
        return 2

    executable = find_supernode_executable()
    if executable is None and not args.dry_run:
        print("deferredseg node start: flower-supernode not found on PATH; install flwr 1.42", file=sys.stderr)
        return 2
    command = build_supernode_command(settings, executable or "flower-supernode")
    if args.dry_run:
        print(shlex.join(command))
        return 0

    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    logger.info("starting %s", shlex.join(command))
    print(f"deferredseg node start: site {settings.site_dir} joins {settings.superlink}", file=sys.stderr)
    status = run_supernode(command, supernode_environment())
    print(f"deferredseg node start: flower-supernode exited with status {status}", file=sys.stderr)
    return status


def add_node_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `node` command and its subcommand `start`."""
    node = subparsers.add_parser("node", help="run this site's Flower SuperNode")
    commands = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")

    start = commands.add_parser(
        "start",
        help="check the site folder, key and TLS settings, then start flower-supernode",
        description="Check the site folder, the node key and the TLS settings; then run flower-supernode with "
        "them and exit with its status.",
    )
    start.add_argument("--site-dir", type=Path, required=True, help="the site data folder (contains site.toml)")
    start.add_argument(
        "--state-dir", type=Path, required=True, help="folder for the site's local model heads (created, mode 0700)"
    )
    start.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink address")
    start.add_argument("--root-certificates", type=Path, metavar="CA.pem", help="the federation CA certificate")
    start.add_argument("--auth-key", type=Path, metavar="PATH", help="this node's private key (deferredseg certs node)")
    start.add_argument(
        "--clientappio-port",
        type=int,
        default=DEFAULT_CLIENTAPPIO_PORT,
        metavar="PORT",
        help=f"local port for this node's ClientApp processes, passed as flower-supernode --port "
        f"(default {DEFAULT_CLIENTAPPIO_PORT}); each node on one machine needs its own",
    )
    start.add_argument(
        "--profile",
        choices=PROFILES,
        default="production",
        help="production (default) requires TLS and node authentication; demo allows --insecure",
    )
    start.add_argument("--insecure", action="store_true", help="connect without TLS (only with --profile demo)")
    start.add_argument("--dry-run", action="store_true", help="run the checks, print the command, start nothing")
    start.set_defaults(func=run_start)
