"""End-to-end federation with Flower's simulation engine on tiny synthetic sites."""

import json
import subprocess
import sys

import pytest
import tomli_w

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def write_federation(path, sites, rounds=1, **extra):
    raw = {
        "rounds": rounds,
        "local-epochs": 1,
        "steps-per-epoch": 3,
        "batch-size": 2,
        "patch-size": 32,
        "inference-window": 32,
        "channels": [8, 16],
        "features": 8,
        "sites": [{"dir": str(s)} for s in sites],
        **extra,
    }
    path.write_text(tomli_w.dumps(raw))
    return path


def run_cli(*args, timeout=420):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_two_sites_one_round(tmp_path, tiny_sites):
    federation = write_federation(tmp_path / "federation.toml", tiny_sites)
    run_dir = tmp_path / "run"
    result = run_cli("simulate", "--federation", str(federation), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["sites"]) == {"site-1", "site-2"}
    for site in summary["sites"].values():
        assert site["capacity_violations"] == 0
        assert 0.0 <= site["system_dice"] <= 1.0
        # Only pseudonyms leave a site, and deferral precision stays there.
        assert all(e.startswith("expert-") for e in site["experts"])
        assert all("deferral_precision" not in e for e in site["experts"].values())
    federation_entry = summary["federation"]
    means = sum(s["system_dice"] for s in summary["sites"].values()) / 2
    assert federation_entry["system_dice"] == pytest.approx(means)
    assert "experts" not in federation_entry

    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1]
    assert set(history[0]["sites"]) == {"site-1", "site-2"}
    assert (run_dir / "model-final.safetensors").exists()

    # Each site kept its local heads under the run name, in its own state folder.
    for index in (1, 2):
        site_state = run_dir / "state" / f"site-{index}" / "run"
        assert (site_state / "heads" / "round-0001.safetensors").exists()
        # Sample overlays stay in the site's state folder.
        assert len(list((site_state / "overlays" / "test-round-0002").glob("*.png"))) == 2

    # No real expert id reaches the coordinator's files.
    text = (run_dir / "history.jsonl").read_text() + (run_dir / "summary.json").read_text()
    assert "sim-pixel" not in text
    assert "sim-block" not in text
