"""Smoke test of `deferredseg train` on a built-in synthetic site."""

import json
import tomllib

import pytest
import tomli_w

from cli.main import main


def _move_calibration(site_dir, split):
    """Move the calibration cases of the site at ``site_dir`` into ``split``, leaving it with none."""
    toml_path = site_dir / "site.toml"
    raw = tomllib.loads(toml_path.read_text())
    raw["splits"][split] += raw["splits"].pop("calibration")
    toml_path.write_text(tomli_w.dumps(raw))


def _train_cli(site_dir, out, *options):
    """Run `deferredseg train` for one epoch of 32-pixel patches on ``site_dir`` and return status and summary."""
    status = main(
        [
            "train", "--site", str(site_dir), "--out", str(out), "--epochs", "1", "--batch-size", "2",
            "--patch-size", "32", "--no-progress", *options,
        ]
    )
    return status, json.loads((out / "summary.json").read_text())


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

    import client.engine

    seen = []
    real_routing_cases = cli.train.routing_cases

    def spy(calibration, train):
        cases = real_routing_cases(calibration, train)
        seen.extend(case.case_id for case in cases)
        return cases

    # Every sampler of the run: the training one, the cross-fitting ones and the routing ones.
    sampled = []
    real_sampler = client.engine.PatchSampler

    def sampler_spy(cases, patch_size, seed):
        sampled.append([case.case_id for case in cases])
        return real_sampler(cases, patch_size, seed)

    monkeypatch.setattr(cli.train, "routing_cases", spy)
    monkeypatch.setattr(cli.train, "PatchSampler", sampler_spy)
    monkeypatch.setattr(client.engine, "PatchSampler", sampler_spy)
    site = open_site(tiny_sites[0])
    settings = TrainSettings(
        epochs=1, steps_per_epoch=3, batch_size=2, patch_size=32, router="benefit", calibration_epochs=1
    )
    network = NetworkConfig(in_channels=1, channels=(8, 16), features=8)
    summary = cli.train.train_sites([site], tmp_path / "run", settings, network, LossWeights(), progress=False)

    # The routing data is the calibration split plus the held-out folds of the train split: never a
    # validation or test case.
    splits = site.spec.splits
    assert sorted(seen) == sorted(splits["calibration"])
    evens, odds = splits["train"][0::2], splits["train"][1::2]
    assert sampled == [list(splits["train"]), list(splits["calibration"]), odds, evens, evens, odds]
    used = {case_id for cases in sampled for case_id in cases}
    assert used == set(splits["train"]) | set(splits["calibration"])
    assert not used & (set(splits["test"]) | set(splits["validation"]))
    note = summary["sites"]["site-1"]["routing_data"]
    assert len(splits["calibration"]) == 1
    assert len(splits["train"]) == 4
    assert note == "calibration split (1 case) and cross-fitted within the train split (2 folds of 4 cases)"

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
    status, summary = _train_cli(tiny_sites[0], out, "--steps-per-epoch", "2", "--load-balancing", "1.0")
    assert status == 0
    assert summary["config"]["loss"]["load_balancing"] == 1.0
    for expert in summary["sites"]["site-1"]["experts"].values():
        assert expert["load"] <= expert["capacity"] + 1e-12


def test_benefit_cross_fits_without_calibration(tmp_path, tiny_sites, monkeypatch):
    import cli.train
    import client.engine
    from client.sitedata import open_site
    from common.config import TrainSettings
    from common.losses import LossWeights
    from common.model import NetworkConfig

    # Move the calibration cases into train: the site now has none to spare.
    _move_calibration(tiny_sites[0], "train")
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


def test_calibration_alone_trains_no_folds(tmp_path, tiny_sites, monkeypatch):
    import cli.train
    from client.sitedata import open_site
    from common.config import TrainSettings
    from common.losses import LossWeights
    from common.model import NetworkConfig

    def no_folds(*args, **kwargs):
        raise AssertionError("cross-fit-folds 0 must not train fold networks")

    monkeypatch.setattr(cli.train, "cross_fitted_sources", no_folds)
    site = open_site(tiny_sites[0])
    settings = TrainSettings(
        epochs=1, steps_per_epoch=2, batch_size=2, patch_size=32, router="benefit", calibration_epochs=1,
        cross_fit_folds=0,
    )
    network = NetworkConfig(in_channels=1, channels=(8, 16), features=8)
    summary = cli.train.train_sites([site], tmp_path / "run", settings, network, LossWeights(), progress=False)
    assert len(site.spec.splits["calibration"]) == 1
    assert summary["sites"]["site-1"]["routing_data"] == "calibration split (1 case)"


def test_no_routing_data_names_fix(tmp_path, tiny_sites, monkeypatch):
    import cli.train
    from cli.train import train_sites
    from client.sitedata import open_site
    from common.config import TrainSettings
    from common.losses import LossWeights
    from common.model import NetworkConfig

    _move_calibration(tiny_sites[0], "train")
    settings = TrainSettings(epochs=1, steps_per_epoch=1, batch_size=2, patch_size=32, cross_fit_folds=0)
    network = NetworkConfig(in_channels=1, channels=(8, 16), features=8)
    trained = []
    monkeypatch.setattr(cli.train, "train_epochs", lambda *args, **kwargs: trained.append(1))
    with pytest.raises(ValueError, match="site-1 have no calibration split and cross-fit-folds is 0"):
        train_sites([open_site(tiny_sites[0])], tmp_path / "run", settings, network, LossWeights(), progress=False)
    # The check comes before training, so no training time is lost.
    assert trained == []
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("folds", [-1, 1])
def test_cross_fit_folds_rejects_invalid(folds):
    from common.config import TrainSettings

    with pytest.raises(ValueError, match=f"cross-fit-folds must be 0 .* or at least 2, got {folds}"):
        TrainSettings(cross_fit_folds=folds)


def test_train_cli_passes_cross_fit_folds(tmp_path, tiny_sites):
    status, summary = _train_cli(tiny_sites[0], tmp_path / "run", "--steps-per-epoch", "1", "--cross-fit-folds", "0")
    assert status == 0
    assert summary["config"]["train"]["cross_fit_folds"] == 0
    assert summary["sites"]["site-1"]["routing_data"].startswith("calibration split")


def test_local_mode_skips_cross_fitting(tmp_path, tiny_sites):
    # The federation's heads learn from the calibration split alone, so the local comparison must too.
    federation = tmp_path / "federation.toml"
    raw = {
        "rounds": 1, "local-epochs": 1, "steps-per-epoch": 1, "batch-size": 2, "patch-size": 32,
        "inference-window": 32, "channels": [8, 16], "features": 8,
        "sites": [{"dir": str(tiny_sites[0])}],
    }
    federation.write_text(tomli_w.dumps(raw))
    out = tmp_path / "local"
    assert main(["simulate", "--federation", str(federation), "--mode", "local", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"]["site-1"]["routing_data"].startswith("calibration split (")
    assert "cross-fitted" not in summary["sites"]["site-1"]["routing_data"]


def test_too_few_cases_to_cross_fit(tmp_path, tiny_sites):
    from cli.train import train_sites
    from client.sitedata import open_site
    from common.config import TrainSettings
    from common.losses import LossWeights
    from common.model import NetworkConfig

    # 4 training cases and no calibration split: 5 folds cannot be dealt, so training never starts.
    _move_calibration(tiny_sites[0], "test")
    settings = TrainSettings(epochs=1, steps_per_epoch=1, batch_size=2, patch_size=32, cross_fit_folds=5)
    network = NetworkConfig(in_channels=1, channels=(8, 16), features=8)
    with pytest.raises(ValueError, match="4 training cases are too few for 5 cross-fitting folds"):
        train_sites([open_site(tiny_sites[0])], tmp_path / "run", settings, network, LossWeights(), progress=False)
    assert not (tmp_path / "run").exists()
