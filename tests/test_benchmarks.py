"""Benchmarks: statistics, tables, resumable cells, the full suite's skip, and one small real cell."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import measure, report, suites
from benchmarks import run as bench_run
from benchmarks.cells import Cell, CellStore, run_cells
from benchmarks.measure import deferral_cell, process_tree_rss, round_costs, throughput_cell
from benchmarks.report import NOT_BUILT, markdown_tables, summarize_cells, verdict
from benchmarks.stats import Estimate, all_finite, mean_ci, oracle_gain_share, paired_difference, utilization_spread
from common.config import TrainSettings
from common.model import NetworkConfig

# Student t quantiles t(0.975, df), from printed tables.
T_975_DF1 = 12.7062047
T_975_DF2 = 4.30265273


def test_mean_ci_three_values():
    estimate = mean_ci([1.0, 2.0, 3.0])
    half_width = T_975_DF2 * 1.0 / math.sqrt(3)  # sample standard deviation 1
    assert estimate.mean == pytest.approx(2.0)
    assert estimate.n == 3
    assert estimate.low == pytest.approx(2.0 - half_width, rel=1e-6)
    assert estimate.high == pytest.approx(2.0 + half_width, rel=1e-6)


def test_mean_ci_one_value():
    estimate = mean_ci([0.7])
    assert estimate == Estimate(0.7, 1)
    assert estimate.format(2) == "0.70 (1 seed, CI n/a)"


def test_mean_ci_constant_values():
    estimate = mean_ci([0.5, 0.5])
    assert (estimate.low, estimate.high) == (0.5, 0.5)


def test_mean_ci_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([1.0, float("nan")])


def test_mean_ci_rejects_empty():
    with pytest.raises(ValueError, match="at least one seed"):
        mean_ci([])


def test_paired_difference_two_seeds():
    estimate = paired_difference([0.8, 0.9], [0.7, 0.7])
    # Differences 0.1 and 0.2: mean 0.15, standard error 0.05.
    assert estimate.mean == pytest.approx(0.15)
    assert estimate.low == pytest.approx(0.15 - T_975_DF1 * 0.05, rel=1e-6)
    assert estimate.high == pytest.approx(0.15 + T_975_DF1 * 0.05, rel=1e-6)


def test_paired_difference_unpaired():
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.1, 0.2], [0.1])


def test_oracle_gain_share_values():
    assert oracle_gain_share(0.85, 0.8, 1.0) == pytest.approx(0.25)
    assert oracle_gain_share(0.7, 0.8, 1.0) == pytest.approx(-0.5)
    assert oracle_gain_share(0.8, 0.8, 0.8) == 0.0


def test_utilization_spread_counts_idle():
    sites = {
        "a": {"experts": {"e1": {"utilization": 0.5}, "e2": {"utilization": 0.0}}},
        "b": {"experts": {"e1": {"utilization": 1.0}}},
    }
    assert utilization_spread(sites) == (1.0, 1)


def test_utilization_spread_no_experts():
    with pytest.raises(ValueError, match="no experts"):
        utilization_spread({"a": {"experts": {}}})


def test_all_finite_paths():
    value = {"a": 1.0, "b": [2, float("nan")], "c": {"d": None, "e": float("inf")}, "f": "text"}
    assert all_finite(value) == ["/b[1]", "/c/d", "/c/e"]
    assert all_finite(value, allow_none=True) == ["/b[1]", "/c/e"]


def test_verdict_cases():
    assert verdict(Estimate(0.02, 3, 0.01, 0.03)) == "better"
    assert verdict(Estimate(0.02, 3, -0.01, 0.05)) == "not significant"
    assert verdict(Estimate(-0.01, 3, -0.02, 0.01)) == "not better"
    assert verdict(Estimate(0.0, 3, 0.0, 0.0)) == "not better"
    assert verdict(Estimate(0.01, 1)) == "better (1 seed)"
    assert verdict(Estimate(-0.01, 1)) == "not better (1 seed)"


def test_round_costs_means(tmp_path):
    lines = [
        {"timing": {"round_seconds": 10.0, "max_train_seconds": 6.0}, "bytes": {"sent": 100, "received": 80}},
        {"timing": {"round_seconds": 14.0, "max_train_seconds": 8.0}, "bytes": {"sent": 300, "received": 120}},
    ]
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    costs = round_costs(path)
    assert costs == {
        "rounds": 2, "round_seconds": 12.0, "train_seconds": 7.0, "other_seconds": 5.0,
        "bytes_sent": 200.0, "bytes_received": 100.0,
    }


def test_cell_store_resume(tmp_path):
    path = tmp_path / "full.json"
    calls = []

    def cell(key, value, fail=False):
        def run():
            calls.append(key)
            if fail:
                raise RuntimeError("interrupted")
            return {"value": value}

        return Cell(key, run)

    # The second cell fails, as a killed run would: the first stays saved.
    with pytest.raises(RuntimeError):
        run_cells([cell("a", 1.0), cell("b", 2.0, fail=True)], CellStore(path, "full"))
    assert set(json.loads(path.read_text())["cells"]) == {"a"}

    calls.clear()
    store = CellStore(path, "full")
    assert run_cells([cell("a", 1.0), cell("b", 2.0), cell("c", 3.0)], store) == []
    assert calls == ["b", "c"]
    saved = json.loads(path.read_text())["cells"]
    assert [saved[k]["value"] for k in ("a", "b", "c")] == [1.0, 2.0, 3.0]

    # A fresh store drops the saved cells; the quick suite always starts fresh.
    assert CellStore(path, "full", fresh=True).cells == {}


def test_cell_store_other_suite(tmp_path):
    path = tmp_path / "results.json"
    CellStore(path, "quick").write()
    with pytest.raises(ValueError, match="suite 'quick'"):
        CellStore(path, "full")


def test_run_cells_reports_nan(tmp_path):
    store = CellStore(tmp_path / "q.json", "quick")
    invalid = run_cells([Cell("ok", lambda: {"x": 1.0}), Cell("bad", lambda: {"x": float("nan")})], store)
    assert invalid == ["bad"]
    assert "bad" in store.cells


def test_run_cells_duplicate_keys(tmp_path):
    store = CellStore(tmp_path / "q.json", "quick")
    with pytest.raises(ValueError, match=r"\['a'\]"):
        run_cells([Cell("a", dict), Cell("a", dict)], store)


TINY = replace(
    suites.QUICK,
    name="full",
    seeds=(0, 1),
    scale_sites=(3,),
    scale_image_sizes=(32,),
    scale_image_sites=3,
    synthetic_cases=4,
)


def _fake_deferral(site_dir, router, variant, seed, train, network):
    # The router trails confidence deferral by 0.01 on both seeds.
    return {
        "model_dice": 0.7, "system_dice": 0.75 + 0.01 * seed, "confidence_system_dice": 0.76 + 0.01 * seed,
        "oracle_system_dice": 0.9, "oracle_gain_share": 0.25, "confidence_gain_share": 0.3,
        "deferral_rate": 0.05, "deferral_regions": 3.0 if variant.coherence else 9.0, "capacity_violations": 0,
        "utilization_spread": 0.1, "idle_experts": 0, "num_experts": 2,
    }


def _fake_simulation(raw, run_dir, mode, cpus_per_site, timeout):
    dice = 0.5
    if Path(run_dir).parent.name == "federation":
        mode_name = Path(run_dir).name.rsplit("-seed", 1)[0]
        dice = {"fedavg": 0.8, "workload-aware": 0.82, "local": 0.7, "pooled": 0.85}[mode_name]
    result = {
        "sites": {"site-1": {"system_dice": dice}, "site-2": {"system_dice": dice}},
        "system_dice": dice, "utilization_spread": 0.2, "idle_experts": 1, "peak_rss_bytes": 3 * 2**20,
        "wall_seconds": 1.0,
    }
    if mode == "federated":
        result["round"] = {
            "rounds": 1, "round_seconds": 4.0, "train_seconds": 3.0, "other_seconds": 1.0,
            "bytes_sent": 2**20, "bytes_received": 2**20,
        }
    return result


def _fake_throughput(site_dir, train, network, steps, repeats):
    return {"deferredseg_images_per_second": 50.0, "plain_images_per_second": 100.0, "throughput_ratio": 0.5}


@pytest.fixture
def fake_cells(monkeypatch):
    calls = []

    def record(function):
        def wrapped(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(suites, "deferral_cell", record(_fake_deferral))
    monkeypatch.setattr(suites, "simulation_cell", record(_fake_simulation))
    monkeypatch.setattr(suites, "throughput_cell", record(_fake_throughput))
    return calls


@pytest.fixture
def benefit_unbuilt(monkeypatch):
    """Pretend the benefit router is not built, to exercise the "not built yet" rows."""
    routers = {"softmax": measure.ROUTERS["softmax"], "benefit": None}
    for module in (measure, suites, report):
        monkeypatch.setattr(module, "ROUTERS", routers)


def test_both_routers_built():
    assert measure.built_routers() == ["softmax", "benefit"]


def test_full_suite_resumes(tmp_path, monkeypatch, tiny_sites, fake_cells, benefit_unbuilt):
    monkeypatch.setattr(bench_run, "prepare_real", lambda data_dir, work_dir: tiny_sites)
    results = tmp_path / "results"

    status = bench_run.run_suite(TINY, results, tmp_path / "work", tmp_path / "data", False, "test")
    assert status == 0
    # 2 sites x (2 seeds + 3 ablations) + 2 seeds x 4 modes + throughput + 1 scale point.
    assert len(fake_cells) == 2 * 5 + 2 * 4 + 1 + 1
    first = json.loads((results / "full.json").read_text())

    fake_cells.clear()
    assert bench_run.run_suite(TINY, results, tmp_path / "work", tmp_path / "data", False, "test") == 0
    assert fake_cells == []
    second = json.loads((results / "full.json").read_text())
    assert second["cells"] == first["cells"]
    assert second["meta"]["wall_seconds"] >= first["meta"]["wall_seconds"]


def test_full_suite_tables(tmp_path, monkeypatch, tiny_sites, fake_cells, benefit_unbuilt):
    monkeypatch.setattr(bench_run, "prepare_real", lambda data_dir, work_dir: tiny_sites)
    results = tmp_path / "results"
    assert bench_run.run_suite(TINY, results, tmp_path / "work", tmp_path / "data", False, "test") == 0

    summary = json.loads((results / "full.json").read_text())["summary"]
    row = summary["deferral"]["site-1"]["softmax"]
    assert row["system_dice"]["mean"] == pytest.approx(0.755)
    assert row["vs_confidence"]["mean"] == pytest.approx(-0.01)
    assert row["vs_confidence"]["verdict"] == "not better"
    assert summary["deferral"]["site-1"]["benefit"] == NOT_BUILT
    assert summary["ablations"]["site-1"]["softmax"]["no-coherence"]["deferral_regions"] == 9.0
    assert summary["federation"]["site-1"]["fedavg_vs_local"]["mean"] == pytest.approx(0.1)
    assert summary["workload"]["system_dice"]["difference"]["mean"] == pytest.approx(0.02)
    assert summary["scale"]["3x32"]["peak_rss_mib"] == pytest.approx(3.0)

    text = (results / "full.md").read_text()
    assert "| site-1 | benefit | not built yet |" in text
    assert "-0.0100 [-0.0100, -0.0100]: not better" in text
    assert "| 3 | 32 | 4.00 | 3.00 | 1.00 | 1.000 | 3 |" in text
    assert "| throughput ratio DeferredSeg / plain (same run, same batch) | 0.500 |" in text


def test_full_suite_skips_without_data(tmp_path, capsys):
    results = tmp_path / "results"
    status = bench_run.main(
        ["--suite", "full", "--data", str(tmp_path / "absent"), "--work", str(tmp_path / "work"),
         "--results", str(results)]
    )
    assert status == 0
    assert "full suite skipped" in capsys.readouterr().out
    assert not (results / "full.json").exists()
    assert not (tmp_path / "work").exists()


def test_markdown_one_seed_marks_ci():
    config = replace(suites.QUICK, seeds=(0,))
    cells = {
        f"deferral/site-1/softmax/{name}/seed-0": _fake_deferral(None, "softmax", variant, 0, None, None)
        for name, variant in [("baseline", suites.BASELINE)] + [(v.name, v) for v in suites.ablation_variants(config)]
    }
    summary = summarize_cells(config, cells, ["site-1"])
    text = markdown_tables(config, summary, {"date": "2026-01-01", "machine": "test", "wall_seconds": 1.0})
    assert "0.7500 (1 seed, CI n/a)" in text
    assert "not better (1 seed)" in text
    assert "makes no quality claim" in text


def test_process_tree_rss_child():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Read the memory only once the interpreter has started, so it no longer changes.
        assert child.stdout.readline().strip() == "ready"
        with open(f"/proc/{child.pid}/status") as status:
            child_rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
        assert process_tree_rss(child.pid) == pytest.approx(child_rss, rel=0.2)
        assert process_tree_rss(os.getpid()) > process_tree_rss(child.pid)
    finally:
        child.kill()
        child.wait()


TINY_TRAIN = TrainSettings(epochs=1, steps_per_epoch=1, batch_size=2, patch_size=32, inference_window=32, device="cpu")
TINY_NETWORK = NetworkConfig(features=4, channels=(4, 8))


def test_throughput_cell_ratio(tiny_sites):
    result = throughput_cell(tiny_sites[0], TINY_TRAIN, TINY_NETWORK, steps=1, repeats=1)
    assert result["deferredseg_images_per_second"] > 0
    assert result["throughput_ratio"] == pytest.approx(
        result["deferredseg_images_per_second"] / result["plain_images_per_second"]
    )


def test_deferral_cell_one_expert(tiny_sites):
    variant = suites.Variant("one-expert", one_expert=True)
    result = deferral_cell(tiny_sites[0], "softmax", variant, 0, TINY_TRAIN, TINY_NETWORK)
    assert result["num_experts"] == 1
    assert result["capacity_violations"] == 0
    assert result["utilization_spread"] == 0.0
    assert result["oracle_system_dice"] >= result["model_dice"]
    assert result["confidence_gain_share"] == pytest.approx(
        oracle_gain_share(result["confidence_system_dice"], result["model_dice"], result["oracle_system_dice"])
    )
    assert all_finite(result) == []


def test_deferral_cell_load_balancing(tiny_sites):
    variant = suites.Variant("load-balancing", load_balancing=1.0)
    result = deferral_cell(tiny_sites[0], "softmax", variant, 0, TINY_TRAIN, TINY_NETWORK)
    assert result["capacity_violations"] == 0
    assert 0.0 <= result["system_dice"] <= 1.0


def test_deferral_cell_unbuilt_router(tiny_sites, benefit_unbuilt):
    with pytest.raises(ValueError, match="not built yet"):
        deferral_cell(tiny_sites[0], "benefit", suites.BASELINE, 0, TINY_TRAIN, TINY_NETWORK)


def test_router_setup_selects_router():
    from benchmarks.measure import ROUTERS
    from common.losses import LossWeights

    for name, setup in ROUTERS.items():
        for default in ("softmax", "benefit"):
            train, _ = setup(TrainSettings(router=default), LossWeights())
            assert train.router == name


def test_docs_hold_full_results():
    # Every table row of docs/benchmarks.md's full-suite record must be the one the committed JSON gives.
    from tests.conftest import REPO_ROOT

    results = REPO_ROOT / "benchmarks" / "results" / "full.json"
    if not results.exists():
        pytest.skip("benchmarks/results/full.json is not committed yet")
    data = json.loads(results.read_text())
    tables = markdown_tables(suites.FULL, data["summary"], data["meta"])
    rows = [line for line in tables.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    assert rows
    docs = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    start = docs.index("## Results of the full suite")
    end = docs.find("\n## ", start + 1)
    record = docs[start : end if end > 0 else None]
    missing = [row for row in rows if row not in record]
    assert not missing, missing[:3]
