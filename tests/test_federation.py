"""Federation end to end: ledger prices in the history, faults survived, resume after an interruption."""

import json
import subprocess
import sys
import tomllib

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.test_simulate import run_cli, write_federation

pytestmark = pytest.mark.slow


def run_faulty(federation, run_dir, fault="none", partition=-1, stop_after=0):
    return subprocess.run(
        [sys.executable, "-m", "tests.federation_faults", str(federation), str(run_dir), fault, str(partition),
         str(stop_after)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=420,
    )


def read_history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def real_expert_ids(sites):
    return {e["id"] for site in sites for e in tomllib.loads((site / "site.toml").read_text())["experts"]}


def test_two_rounds_prices_follow_pressure(tmp_path, tiny_sites):
    federation = write_federation(
        tmp_path / "fed.toml", tiny_sites, rounds=2, aggregation="workload-aware", **{"price-step": 0.5}
    )
    run_dir = tmp_path / "run"
    result = run_faulty(federation, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    history = read_history(run_dir)
    assert [h["round"] for h in history] == [1, 2]
    first, second = history
    for site_id, site in first["sites"].items():
        assert site["bounds"] == {e: [0.0, v["capacity"]] for e, v in site["experts"].items()}
        for expert_id, values in site["experts"].items():
            assert values["price"] == 0.0
            expected = max(0.0, 0.5 * (values["demand"] - values["capacity"]))
            assert second["sites"][site_id]["experts"][expert_id]["price"] == pytest.approx(expected)

    # Workload-aware weights: n * (1 + max(0, P - 1)), normalized over the sites of the round.
    raw = {
        s: v["num_examples"] * (1 + max(0.0, max(e["pressure"] for e in v["experts"].values()) - 1))
        for s, v in first["sites"].items()
    }
    for site_id, site in first["sites"].items():
        assert site["aggregation_weight"] == pytest.approx(raw[site_id] / sum(raw.values()))

    assert (run_dir / "plots" / "dice.png").exists()
    assert (run_dir / "plots" / "workload.png").exists()
    assert (run_dir / "checkpoints" / "round-0002.json").exists()

    # Only pseudonyms leave the sites: no real expert id in any reply or in the coordinator's files.
    sent = "".join(p.read_text() for p in (run_dir / "replies").iterdir())
    written = (run_dir / "history.jsonl").read_text() + (run_dir / "summary.json").read_text()
    for expert_id in real_expert_ids(tiny_sites):
        assert expert_id not in sent
        assert expert_id not in written


def test_nan_weights_left_out(tmp_path, tiny_sites):
    federation = write_federation(tmp_path / "fed.toml", tiny_sites, rounds=1, **{"min-sites": 1})
    run_dir = tmp_path / "run"
    result = run_faulty(federation, run_dir, fault="nan", partition=1)
    assert result.returncode == 0, result.stderr[-3000:]

    history = read_history(run_dir)
    assert list(history[0]["excluded"]) == ["site-2"]
    assert "non-finite" in history[0]["excluded"]["site-2"]
    assert "site-2 left out" in result.stderr + result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["sites"]) == {"site-1", "site-2"}


def test_site_failing_mid_round_does_not_stop_run(tmp_path, tiny_sites):
    federation = write_federation(tmp_path / "fed.toml", tiny_sites, rounds=1)
    run_dir = tmp_path / "run"
    result = run_faulty(federation, run_dir, fault="crash", partition=0)
    assert result.returncode == 0, result.stderr[-3000:]

    history = read_history(run_dir)
    assert "site failed" in history[0]["excluded"]["site-1"]
    assert list(history[0]["sites"]) == ["site-2"]
    assert (run_dir / "summary.json").exists()


def test_resume_after_interruption(tmp_path, tiny_sites):
    federation = write_federation(tmp_path / "fed.toml", tiny_sites, rounds=2)
    run_dir = tmp_path / "run"
    interrupted = run_faulty(federation, run_dir, stop_after=1)
    assert not (run_dir / "summary.json").exists(), interrupted.stderr[-2000:]
    assert [h["round"] for h in read_history(run_dir)] == [1]
    saved = json.loads((run_dir / "checkpoints" / "round-0001.json").read_text())["ledger"]["prices"]

    resumed = run_cli("simulate", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr + resumed.stdout

    history = read_history(run_dir)
    assert [h["round"] for h in history] == [1, 2]
    # Round 2 ran with the prices saved at round 1.
    for site_id, site in history[1]["sites"].items():
        for expert_id, values in site["experts"].items():
            assert values["price"] == pytest.approx(saved[site_id][expert_id])
    # Each site continued from its own round-1 heads and saved round-2 heads.
    for index in (1, 2):
        assert (run_dir / "state" / f"site-{index}" / "run" / "heads" / "round-0002.safetensors").exists()
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2


def test_benefit_router_federated(tmp_path, tiny_sites):
    from safetensors.torch import load_file

    federation = write_federation(
        tmp_path / "fed.toml", tiny_sites, rounds=2, router="benefit", **{"calibration-epochs": 1}
    )
    run_dir = tmp_path / "run"
    result = run_faulty(federation, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    # The correctness trunk, the model head and its anchors are shared. The expert heads never leave the site.
    replies = [json.loads(p.read_text()) for p in (run_dir / "replies").glob("train-*.json")]
    assert len(replies) == 4
    for reply in replies:
        names = reply["arrays"]["arrays"]
        assert {"correctness.confidence_scale", "correctness.model_head.weight", "correctness.trunk.0.weight"} <= set(
            names
        )
        assert not [name for name in names if name.startswith("correctness.expert_heads.")]
    final = load_file(str(run_dir / "model-final.safetensors"))
    assert "correctness.model_head.weight" in final
    assert not [name for name in final if name.startswith("correctness.expert_heads.")]

    # Each site kept expert heads of its own, fitted to its own experts' accuracy (anchors differ by site).
    heads = [
        load_file(str(run_dir / "state" / f"site-{i}" / "run" / "heads" / "round-0002.safetensors")) for i in (1, 2)
    ]
    biases = [h["correctness.expert_heads.bias"] for h in heads]
    for site_dir, bias in zip(tiny_sites, biases):
        assert bias.numel() == len(tomllib.loads((site_dir / "site.toml").read_text())["experts"])
    assert not torch.equal(biases[0], biases[1])

    # The coordinator's prices reached the benefit router: round 2 ran with the prices from round 1's demand.
    history = read_history(run_dir)
    assert [h["round"] for h in history] == [1, 2]
    for site in history[1]["sites"].values():
        assert all(values["price"] >= 0 for values in site["experts"].values())
