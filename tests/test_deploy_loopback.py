"""Loopback federation on 127.0.0.1: SuperLink with TLS, node authentication and a database, two site nodes.

Creates the certificates and keys with `deferredseg certs`, registers both nodes, starts them with
`deferredseg node start`, runs 2 rounds with `flwr run`, restarts the SuperLink and runs again.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "loopback"
SITE_IDS = ("site-1", "site-2")
STOP_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 480.0
POLL_S = 3.0
LOG_TAIL_CHARS = 4000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr 1.42 command-line tools are not installed"),
]

FEDERATION = """\
rounds = {rounds}
local-epochs = 1
steps-per-epoch = 3
batch-size = 2
patch-size = 32
inference-window = 32
channels = [8, 16]
features = 8
[[sites]]
id = "site-1"
[[sites]]
id = "site-2"
"""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ProcessGroup:
    """Processes started by this test, each with a log file; `stop` ends one by its PID, `stop_all` ends the rest."""

    log_dir: Path
    environment: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen:
        """Start ``command`` in the repository root, logging to ``<log_dir>/<name>.log`` (appended on restart)."""
        log = open(self.log_dir / f"{name}.log", "ab")
        self.logs[name] = log
        process = subprocess.Popen(
            list(command), cwd=REPO_ROOT, env=self.environment, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes[name] = process
        return process

    def stop(self, name: str) -> None:
        """Terminate the process ``name`` by its PID, and kill it if it is still running after a timeout."""
        process = self.processes.pop(name)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        self.logs.pop(name).close()

    def stop_all(self) -> None:
        """Stop every process still tracked, the nodes before the SuperLink."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            self.stop(name)

    def log_tails(self) -> str:
        """Return the end of every log file, for the report of a failed test."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(f"----- {path.name} (last {LOG_TAIL_CHARS} characters) -----\n{text[-LOG_TAIL_CHARS:]}")
        return "\n".join(parts)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    """A process group whose processes are stopped at teardown, also when the test fails."""
    environment = dict(os.environ)
    environment.update(
        {
            "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    group = ProcessGroup(log_dir, environment)
    try:
        yield group
    finally:
        group.stop_all()
        # Shown by pytest only when the test fails.
        print(group.log_tails())


def _run(group: ProcessGroup, command: Sequence[str], timeout: float = 120.0) -> str:
    result = subprocess.run(
        list(command), cwd=REPO_ROOT, env=group.environment, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _deferredseg(group: ProcessGroup, *args: str) -> str:
    return _run(group, [sys.executable, "-m", "cli.main", *args])


def _flwr_json(group: ProcessGroup, *args: str) -> dict:
    output = _run(group, ["flwr", *args, "--format", "json"])
    return json.loads(output[output.index("{"):])


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process exited with status {process.returncode} before opening port {port}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {READY_TIMEOUT_S:.0f} s")


def _wait_for_online_nodes(group: ProcessGroup, count: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    statuses: list[str] = []
    while time.monotonic() < deadline:
        nodes = _flwr_json(group, "supernode", "ls", CONNECTION)["nodes"]
        statuses = [node["status"] for node in nodes]
        if statuses.count("online") >= count:
            return
        time.sleep(POLL_S)
    raise AssertionError(f"{count} nodes should be online after {READY_TIMEOUT_S:.0f} s; statuses: {statuses}")


def _run_federation(group: ProcessGroup, federation: Path, run_dir: Path) -> dict:
    run_config = f"federation='{federation}' run-dir='{run_dir}'"
    started = _flwr_json(group, "run", ".", CONNECTION, "--run-config", run_config)
    run_id = started["run-id"]

    # `flwr run` exits 0 even when the run fails, so the run status is what counts.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = _flwr_json(group, "ls", CONNECTION, "--run-id", str(run_id))["runs"][0]
        if run["status"].startswith("finished"):
            return run
        time.sleep(POLL_S)
    raise AssertionError(f"run {run_id} did not finish within {RUN_TIMEOUT_S:.0f} s")


def _sites_per_round(history: Path) -> list[set[str]]:
    lines = history.read_text(encoding="utf-8").splitlines()
    return [set(json.loads(line)["sites"]) for line in lines if line.strip()]


def test_loopback_tls_auth_restart(tmp_path: Path, processes: ProcessGroup) -> None:
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    superlink_port = free_port()

    _deferredseg(processes, "certs", "ca", "--out-dir", str(certs))
    _deferredseg(processes, "certs", "superlink", "--out-dir", str(certs), "--host", "127.0.0.1", "--host", "localhost")
    for site_id in SITE_IDS:
        _deferredseg(processes, "certs", "node", site_id, "--out-dir", str(keys))
    _deferredseg(processes, "site", "synth", str(tmp_path / "sites"), "--sites", "2", "--seed", "0",
                 "--image-size", "32", "--cases", "8")

    superlink_command = [
        "flower-superlink",
        "--ssl-ca-certfile", str(certs / "ca.pem"),
        "--ssl-certfile", str(certs / "superlink.pem"),
        "--ssl-keyfile", str(certs / "superlink.key"),
        "--enable-supernode-auth",
        "--database", str(tmp_path / "superlink.db"),
        "--host", "127.0.0.1",
        "--port", str(superlink_port),
    ]
    _wait_for_port(superlink_port, processes.start("superlink", superlink_command))

    flwr_home = Path(processes.environment["FLWR_HOME"])
    flwr_home.mkdir(exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{superlink_port}"\nroot-certificates = "{certs / "ca.pem"}"\n',
        encoding="utf-8",
    )
    for site_id in SITE_IDS:
        registered = _flwr_json(processes, "supernode", "register", str(keys / f"{site_id}.pub"), CONNECTION)
        assert registered["success"] is True

    for site_id in SITE_IDS:
        processes.start(
            site_id,
            [
                sys.executable, "-m", "cli.main", "node", "start",
                "--site-dir", str(tmp_path / "sites" / site_id),
                "--state-dir", str(tmp_path / "state" / site_id),
                "--superlink", f"127.0.0.1:{superlink_port}",
                "--root-certificates", str(certs / "ca.pem"),
                "--auth-key", str(keys / f"{site_id}.key"),
                "--clientappio-port", str(free_port()),
            ],
        )
    _wait_for_online_nodes(processes, len(SITE_IDS))

    federation = tmp_path / "federation.toml"
    federation.write_text(FEDERATION.format(rounds=2), encoding="utf-8")
    first = _run_federation(processes, federation, tmp_path / "run-1")
    assert first["status"] == "finished:completed", first.get("status-details")
    rounds = _sites_per_round(tmp_path / "run-1" / "history.jsonl")
    assert len(rounds) == 2
    for sites in rounds:
        assert sites == set(SITE_IDS)

    processes.stop("superlink")
    _wait_for_port(superlink_port, processes.start("superlink", superlink_command))
    _wait_for_online_nodes(processes, len(SITE_IDS))
    for site_id in SITE_IDS:
        assert processes.processes[site_id].poll() is None, f"{site_id} exited after the SuperLink restart"

    # One round is enough to show that the reconnected nodes train again.
    federation_again = tmp_path / "federation-again.toml"
    federation_again.write_text(FEDERATION.format(rounds=1), encoding="utf-8")
    second = _run_federation(processes, federation_again, tmp_path / "run-2")
    assert second["status"] == "finished:completed", second.get("status-details")
    summary = json.loads((tmp_path / "run-2" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["sites"]) == set(SITE_IDS)
