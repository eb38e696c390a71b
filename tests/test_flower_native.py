"""The Flower-native path: `flwr run .` on the local simulation SuperLink, checked by the run status."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.test_simulate import write_federation

pytestmark = pytest.mark.slow


def local_superlink_pids(flwr_home):
    """PIDs of the SuperLink that `flwr run` started in the background for this test's FLWR_HOME."""
    marker = f"{flwr_home}/local-superlink/"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in command and marker in command:
            pids.append(int(entry))
    return pids


def stop(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_flwr_run_completes(tmp_path, tiny_sites):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(flwr_home)}
    federation = write_federation(tmp_path / "fed.toml", tiny_sites, rounds=1)
    run_dir = tmp_path / "run"

    try:
        result = subprocess.run(
            [
                "flwr", "run", ".", "--stream",
                "--federation-config", "num-supernodes=2 client-resources-num-cpus=1",
                "--run-config", f"federation='{federation}' run-dir='{run_dir}'",
            ],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=480,
        )
        assert result.returncode == 0, result.stderr[-3000:]

        # `flwr run` exits 0 even when the run failed, so the run status decides.
        listing = subprocess.run(
            ["flwr", "ls", "--format", "json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        runs = json.loads(listing.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], listing.stdout
    finally:
        stop(local_superlink_pids(flwr_home))

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["sites"]) == {"site-1", "site-2"}
    assert summary["federation"]["capacity_violations"] == 0
