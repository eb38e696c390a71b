"""Tests of `deferredseg node start`: the checks before Flower starts, the command it builds, exit status and signals."""

import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

import cli.node
from cli.main import main
from cli.node import NodeSettings, build_supernode_command, check_node, format_node_config, run_supernode


@pytest.fixture
def node_files(tmp_path: Path) -> dict[str, Path]:
    """A CA certificate and a node key written by `deferredseg certs`."""
    assert main(["certs", "ca", "--out-dir", str(tmp_path / "certs")]) == 0
    assert main(["certs", "node", "site-1", "--out-dir", str(tmp_path / "keys")]) == 0
    return {"ca": tmp_path / "certs" / "ca.pem", "key": tmp_path / "keys" / "site-1.key", "pub": tmp_path / "keys" / "site-1.pub"}


@pytest.fixture
def no_flower(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the commands that would start Flower, and start nothing."""
    calls: list[list[str]] = []
    monkeypatch.setattr(cli.node, "run_supernode", lambda command, environment: calls.append(list(command)) or 0)
    return calls


def _start_args(site: Path, state: Path, files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "node", "start", "--site-dir", str(site), "--state-dir", str(state), "--superlink", "127.0.0.1:9092",
        "--root-certificates", str(files["ca"]), "--auth-key", str(files["key"]), *extra,
    ]


@pytest.mark.parametrize(
    "path",
    ["/data/site one", "/data/it's here", 'C:\\sites\\"quoted"', "/plain/path"],
)
def test_node_config_roundtrip(path: str) -> None:
    text = format_node_config({"site-dir": path, "state-dir": "/var/lib/state"})

    parsed = parse_config_args([text])
    assert parsed == {"site-dir": path, "state-dir": "/var/lib/state"}


def test_node_config_both_quotes() -> None:
    with pytest.raises(ValueError, match="contains both"):
        format_node_config({"site-dir": "/a'b\"c"})


def test_check_accepts_good_setup(tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path) -> None:
    settings = NodeSettings(tiny_sites[0], tmp_path / "state", "127.0.0.1:9092", node_files["ca"], node_files["key"])

    assert check_node(settings) == []


def test_command_flags(tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path) -> None:
    settings = NodeSettings(
        tiny_sites[0], tmp_path / "state dir", "superlink.example:9092", node_files["ca"], node_files["key"], 19101
    )

    command = build_supernode_command(settings)
    assert command[0] == "flower-supernode"
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--superlink"] == "superlink.example:9092"
    assert flags["--root-certificates"] == str(node_files["ca"].resolve())
    assert flags["--auth-supernode-private-key"] == str(node_files["key"].resolve())
    assert flags["--port"] == "19101"
    assert "--insecure" not in command
    node_config = parse_config_args([flags["--node-config"]])
    assert node_config == {"site-dir": str(tiny_sites[0].resolve()), "state-dir": str((tmp_path / "state dir").resolve())}


def test_dry_run_prints_command(
    tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_flower: list[list[str]],
) -> None:
    assert main(_start_args(tiny_sites[0], tmp_path / "state", node_files, "--dry-run")) == 0

    printed = shlex.split(capsys.readouterr().out.strip())
    assert printed[0].endswith("flower-supernode")
    assert printed[printed.index("--superlink") + 1] == "127.0.0.1:9092"
    assert no_flower == []
    assert not (tmp_path / "state").exists()


def test_start_runs_flower(tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path, no_flower: list[list[str]]) -> None:
    assert main(_start_args(tiny_sites[0], tmp_path / "state", node_files, "--clientappio-port", "19555")) == 0

    assert len(no_flower) == 1
    assert no_flower[0][no_flower[0].index("--port") + 1] == "19555"
    assert (tmp_path / "state").is_dir()


def test_stops_on_site_problem(
    tmp_path: Path, node_files: dict[str, Path], capsys: pytest.CaptureFixture[str], no_flower: list[list[str]]
) -> None:
    empty_site = tmp_path / "empty-site"
    empty_site.mkdir()

    assert main(_start_args(empty_site, tmp_path / "state", node_files)) == 2
    assert "site check:" in capsys.readouterr().err
    assert no_flower == []


def test_stops_on_missing_key(
    tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_flower: list[list[str]],
) -> None:
    node_files["key"].unlink()

    assert main(_start_args(tiny_sites[0], tmp_path / "state", node_files)) == 2
    assert "not found" in capsys.readouterr().err
    assert no_flower == []


def test_stops_on_loose_key(
    tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_flower: list[list[str]],
) -> None:
    node_files["key"].chmod(0o640)

    assert main(_start_args(tiny_sites[0], tmp_path / "state", node_files)) == 2
    error = capsys.readouterr().err
    assert "mode 0640" in error
    assert "chmod 600" in error
    assert no_flower == []


def test_stops_on_public_key_given(tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path) -> None:
    node_files["pub"].chmod(0o600)
    settings = NodeSettings(tiny_sites[0], tmp_path / "state", "127.0.0.1:9092", node_files["ca"], node_files["pub"])

    problems = check_node(settings)
    assert len(problems) == 1
    assert "not an unencrypted OpenSSH private key" in problems[0]


def test_stops_without_tls_outside_demo(
    tiny_sites: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_flower: list[list[str]]
) -> None:
    args = ["node", "start", "--site-dir", str(tiny_sites[0]), "--state-dir", str(tmp_path / "s"),
            "--superlink", "127.0.0.1:9092", "--insecure"]

    assert main(args) == 2
    assert "only with --profile demo" in capsys.readouterr().err
    assert no_flower == []

    assert main([*args, "--profile", "demo"]) == 0
    assert "--insecure" in no_flower[0]
    assert "--root-certificates" not in no_flower[0]


def test_stops_without_root_certificates(tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path) -> None:
    settings = NodeSettings(tiny_sites[0], tmp_path / "state", "127.0.0.1:9092", None, node_files["key"])

    problems = check_node(settings)
    assert problems == ["TLS needs the federation CA certificate; give --root-certificates ca.pem"]


@pytest.mark.parametrize("address", ["127.0.0.1", "host:port", "host:70000", "http://host:9092"])
def test_invalid_superlink_address(tiny_sites: list[Path], node_files: dict[str, Path], tmp_path: Path, address: str) -> None:
    settings = NodeSettings(tiny_sites[0], tmp_path / "state", address, node_files["ca"], node_files["key"])

    problems = check_node(settings)
    assert len(problems) == 1
    assert address in problems[0]


def test_exit_status_passed_on() -> None:
    status = run_supernode([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ))

    assert status == 3


def test_sigterm_forwarded(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(30)\n"
        "sys.exit(1)\n"
    )

    def send_sigterm_when_ready() -> None:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous_handler = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_sigterm_when_ready)
    sender.start()
    status = run_supernode([sys.executable, "-c", child], dict(os.environ))
    sender.join()

    assert status == 7
    assert signal.getsignal(signal.SIGTERM) == previous_handler


def test_killed_child_status() -> None:
    status = run_supernode([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], dict(os.environ))

    assert status == 128 + signal.SIGKILL


# Static checks of the deployment files: no container engine or systemd instance runs them in CI.

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
FLOWER_SWITCHES = {k: v for k, v in cli.node.FLOWER_ENVIRONMENT.items() if k.startswith("FLWR_")}


def test_compose_three_site_demo() -> None:
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]

    sites = [name for name in services if name.startswith("site-")]
    assert sites == ["site-1", "site-2", "site-3"]
    for name in sites:
        environment = services[name]["environment"]
        assert environment["SITE_DIR"] == f"/demo/sites/{name}"
        assert environment["NODE_KEY"] == f"/demo/keys/{name}.key"
        assert environment["SUPERLINK_ADDRESS"] == "superlink:${SUPERLINK_PORT:-9092}"
        assert services[name]["build"]["dockerfile"] == "deploy/docker/node.Dockerfile"
        assert services[name]["depends_on"]["register"]["condition"] == "service_completed_successfully"
    for name in ("setup", "superlink", "register", "run", *sites):
        for key, value in FLOWER_SWITCHES.items():
            assert services[name]["environment"][key] == value, (name, key)
    assert services["superlink"]["ports"] == [
        "${SUPERLINK_PUBLISH_ADDRESS:-127.0.0.1}:${SUPERLINK_PORT:-9092}:${SUPERLINK_PORT:-9092}"
    ]


@pytest.mark.parametrize("unit", ["deferredseg-superlink.service", "deferredseg-node@.service"])
def test_systemd_unit_environment(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text(encoding="utf-8")

    for key, value in FLOWER_SWITCHES.items():
        assert f"Environment={key}={value}" in text
    assert "--enable-supernode-auth" in text or "deferredseg node start" in text


@pytest.mark.parametrize("dockerfile", ["node.Dockerfile", "coordinator.Dockerfile"])
def test_dockerfile_environment(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text(encoding="utf-8")

    for key, value in FLOWER_SWITCHES.items():
        assert f"{key}={value}" in text
    assert "USER deferredseg" in text


def test_example_federation_lists_ids() -> None:
    from common.config import load_federation

    federation = load_federation(DEPLOY / "examples" / "federation.toml")

    assert [site.site_id for site in federation.sites] == ["site-1", "site-2"]
    assert [site.site_dir for site in federation.sites] == [None, None]
    assert federation.rounds == 2


def test_example_node_env_complete() -> None:
    lines = (DEPLOY / "examples" / "node.env").read_text(encoding="utf-8").splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    unit = (DEPLOY / "systemd" / "deferredseg-node@.service").read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Z_]+)\}", unit))
    assert used == set(values)
