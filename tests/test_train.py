"""Smoke test of `deferredseg train` on a built-in synthetic site."""

import json
import tomllib

from cli.main import main


def test_train_smoke_writes_summary(tmp_path, tiny_sites):
    out = tmp_path / "run"
    status = main(
        [
            "train", "--site", str(tiny_sites[0]), "--out", str(out), "--epochs", "2", "--steps-per-epoch", "4",
            "--batch-size", "4", "--patch-size", "32", "--no-progress",
        ]
    )
    assert status == 0

    summary = json.loads((out / "summary.json").read_text())
    site = summary["sites"]["site-1"]
    for key in ("model_dice", "system_dice", "oracle_system_dice", "confidence_system_dice", "deferral_rate"):
        assert 0.0 <= site[key] <= 1.0, key
    assert site["capacity_violations"] == 0
    assert site["oracle_system_dice"] >= site["model_dice"]
    declared = [e["id"] for e in tomllib.loads((tiny_sites[0] / "site.toml").read_text())["experts"]]
    assert list(site["experts"]) == declared
    for expert in site["experts"].values():
        assert expert["load"] <= expert["capacity"] + 1e-12
        assert abs(expert["utilization"] - expert["load"] / expert["capacity"]) < 1e-9
    assert (out / "model.safetensors").exists()


def test_train_pools_two_sites(tmp_path, tiny_sites):
    out = tmp_path / "pooled"
    status = main(
        [
            "train", "--site", str(tiny_sites[0]), "--site", str(tiny_sites[1]), "--out", str(out), "--epochs", "1",
            "--steps-per-epoch", "2", "--batch-size", "2", "--patch-size", "32", "--no-progress",
        ]
    )
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sites"]) == {"site-1", "site-2"}
    experts = summary["config"]["experts"]
    for site_id, result in summary["sites"].items():
        assert list(result["experts"]) == experts[site_id]
