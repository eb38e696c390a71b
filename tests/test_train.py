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


def test_benefit_router_uses_calibration_and_fits_prices(tmp_path, tiny_sites, monkeypatch):
    import cli.train
    from client.engine import evaluate_cases, expert_priority, select_device
    from client.sitedata import open_site
    from common.config import TrainSettings
    from common.losses import LossWeights
    from common.model import DeferredSegNet, NetworkConfig

    seen = []
    real_routing_cases = cli.train.routing_cases

    def spy(calibration, train):
        cases = real_routing_cases(calibration, train)
        seen.extend(case.case_id for case in cases)
        return cases

    monkeypatch.setattr(cli.train, "routing_cases", spy)
    site = open_site(tiny_sites[0])
    settings = TrainSettings(
        epochs=1, steps_per_epoch=3, batch_size=2, patch_size=32, router="benefit", calibration_epochs=1
    )
    network = NetworkConfig(in_channels=1, channels=(8, 16), features=8)
    summary = cli.train.train_sites([site], tmp_path / "run", settings, network, LossWeights(), progress=False)

    # The routing data is the calibration split: never a validation or test case.
    assert sorted(seen) == sorted(site.spec.splits["calibration"])
    assert not set(seen) & (set(site.spec.splits["test"]) | set(site.spec.splits["validation"]))

    # The fitted prices keep each expert's mean validation demand within capacity.
    result = summary["sites"]["site-1"]
    assert result["router"] == "benefit"
    prices = [result["prices"][e] for e in site.expert_ids]
    assert all(p >= 0 for p in prices)
    model = DeferredSegNet(network, num_experts=len(site.experts))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    priority = expert_priority(site.split("validation"), len(site.experts))
    validation, _ = evaluate_cases(
        model, site.split("validation"), site.expert_ids, site.capacity, settings, select_device("cpu"), priority,
        prices=prices,
    )
    for expert_id in site.expert_ids:
        expert = validation["experts"][expert_id]
        assert expert["demand"] <= expert["capacity"] + 1e-9


def test_train_with_load_balancing_on(tmp_path, tiny_sites):
    out = tmp_path / "balanced"
    status = main(
        [
            "train", "--site", str(tiny_sites[0]), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "2", "--patch-size", "32", "--load-balancing", "1.0", "--no-progress",
        ]
    )
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["loss"]["load_balancing"] == 1.0
    for expert in summary["sites"]["site-1"]["experts"].values():
        assert expert["load"] <= expert["capacity"] + 1e-12


def test_benefit_cross_fits_without_calibration(tmp_path, tiny_sites, monkeypatch):
    import tomli_w

    import cli.train
    import client.engine
    from client.sitedata import open_site
    from common.config import TrainSettings
    from common.losses import LossWeights
    from common.model import NetworkConfig

    # Move the calibration cases into train: the site now has none to spare.
    toml_path = tiny_sites[0] / "site.toml"
    raw = tomllib.loads(toml_path.read_text())
    raw["splits"]["train"] += raw["splits"].pop("calibration")
    toml_path.write_text(tomli_w.dumps(raw))
    site = open_site(tiny_sites[0])
    train_ids = list(site.spec.splits["train"])

    samplers = []
    real_sampler = client.engine.PatchSampler

    def spy(cases, patch_size, seed):
        samplers.append([case.case_id for case in cases])
        return real_sampler(cases, patch_size, seed)

    monkeypatch.setattr(client.engine, "PatchSampler", spy)
    settings = TrainSettings(
        epochs=1, steps_per_epoch=2, batch_size=2, patch_size=32, router="benefit", calibration_epochs=1
    )
    network = NetworkConfig(in_channels=1, channels=(8, 16), features=8)
    summary = cli.train.train_sites([site], tmp_path / "run", settings, network, LossWeights(), progress=False)

    # Two folds dealt in turn: each fold network trains on one half and its routing data is the other half.
    evens, odds = train_ids[0::2], train_ids[1::2]
    assert samplers == [odds, evens, evens, odds]
    held_out = set(samplers[1]) | set(samplers[3])
    assert held_out == set(train_ids)
    assert not held_out & (set(site.spec.splits["test"]) | set(site.spec.splits["validation"]))
    assert summary["sites"]["site-1"]["routing_data"].startswith("cross-fitted within the train split")
