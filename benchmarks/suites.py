"""The quick and full benchmark suites: their sizes, their data and their list of cells."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.cells import Cell
from benchmarks.measure import ROUTERS, Variant, deferral_cell, simulation_cell, throughput_cell
from common.config import TrainSettings
from common.model import NetworkConfig

FEDERATION_MODES = ("fedavg", "workload-aware", "local", "pooled")
BASELINE = Variant("baseline")


@dataclass(frozen=True)
class SuiteConfig:
    """Size of one suite. Every comparison inside a suite uses the same data, splits and seeds.

    Attributes:
        name: ``quick`` or ``full``.
        seeds: seeds of the deferral-quality and federation cells; ablations and scaling use the first.
        train: training settings of every cell (``epochs`` applies to single-site cells).
        network: architecture of every cell (``in_channels`` comes from the sites).
        rounds: federated rounds; local and pooled training run ``rounds * local_epochs`` epochs.
        local_epochs: local epochs per round.
        load_balancing_weight: weight of the soft load-balancing term in its ablation.
        synthetic_image_size: image side of the built-in synthetic sites, in pixels.
        synthetic_cases: cases per synthetic site.
        scale_sites: site counts of the scaling curve (and of the peak-memory row), at the first image size.
        scale_image_sizes: image sides of the image-size curve, in pixels.
        scale_image_sites: site count of the image-size curve.
        throughput_steps: training steps per timed block of the throughput cell.
        throughput_repeats: timed blocks per network.
        cpus_per_site: CPU cores Ray reserves per virtual node.
        simulation_timeout: seconds before one simulation is stopped and the suite fails.
        reductions: what this suite runs smaller than the project defaults, for the tables.
    """

    name: str
    seeds: tuple[int, ...]
    train: TrainSettings
    network: NetworkConfig
    rounds: int
    local_epochs: int
    load_balancing_weight: float
    synthetic_image_size: int
    synthetic_cases: int
    scale_sites: tuple[int, ...]
    scale_image_sizes: tuple[int, ...]
    scale_image_sites: int
    throughput_steps: int
    throughput_repeats: int
    cpus_per_site: float = 1.0
    simulation_timeout: float = 1800.0
    reductions: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError(f"suite {self.name}: seeds is empty; give at least one seed")
        if not self.scale_sites or not self.scale_image_sizes:
            raise ValueError(f"suite {self.name}: scale_sites and scale_image_sizes need at least one point each")


QUICK = SuiteConfig(
    name="quick",
    seeds=(0,),
    train=TrainSettings(epochs=2, steps_per_epoch=4, batch_size=4, patch_size=32, inference_window=32, device="cpu"),
    network=NetworkConfig(features=8, channels=(8, 16)),
    rounds=1,
    local_epochs=1,
    load_balancing_weight=1.0,
    synthetic_image_size=32,
    synthetic_cases=8,
    scale_sites=(3, 8),
    scale_image_sizes=(32, 64),
    scale_image_sites=3,
    throughput_steps=3,
    throughput_repeats=2,
    cpus_per_site=1.0,
    simulation_timeout=600.0,
    reductions=(
        "built-in synthetic sites of 8 cases at 32 x 32 pixels",
        "1 seed, so no confidence interval",
        "2 epochs of 4 steps, batch 4, 32-pixel patches, a 2-level UNet of widths 8 and 16",
        "1 federated round of 1 local epoch",
    ),
)

FULL = SuiteConfig(
    name="full",
    seeds=(0, 1, 2),
    train=TrainSettings(epochs=10, steps_per_epoch=40, batch_size=8, patch_size=64, inference_window=128),
    network=NetworkConfig(),
    rounds=5,
    local_epochs=2,
    load_balancing_weight=1.0,
    synthetic_image_size=64,
    synthetic_cases=24,
    scale_sites=(3, 8),
    scale_image_sizes=(64, 128),
    scale_image_sites=3,
    throughput_steps=10,
    throughput_repeats=3,
    cpus_per_site=1.0,
    simulation_timeout=3600.0,
    reductions=(
        "10 epochs of 40 steps for single-site training, against 20 by default",
        "5 federated rounds of 2 local epochs, against 3 rounds by default but the same 10 epochs in all",
        "ablations and scaling on seed 0 only",
        "scaling curves on built-in synthetic sites (64 and 128 pixels), because only 2 real sites exist",
    ),
)

SUITES = {"quick": QUICK, "full": FULL}


def ablation_variants(config: SuiteConfig) -> list[Variant]:
    """Return the ablation variants: no spatial coherence, soft load balancing on, and one expert only."""
    return [
        Variant("no-coherence", coherence=False),
        Variant("load-balancing", load_balancing=config.load_balancing_weight),
        Variant("one-expert", one_expert=True),
    ]


def federation_file(config: SuiteConfig, site_dirs: list[Path], aggregation: str = "fedavg") -> dict[str, Any]:
    """Build the federation file's keys for ``site_dirs`` with the suite's settings."""
    train = config.train
    return {
        "rounds": config.rounds,
        "local-epochs": config.local_epochs,
        "steps-per-epoch": train.steps_per_epoch,
        "batch-size": train.batch_size,
        "patch-size": train.patch_size,
        "inference-window": train.inference_window,
        "learning-rate": train.learning_rate,
        "device": train.device,
        "backbone": config.network.backbone,
        "features": config.network.features,
        "channels": list(config.network.channels),
        "aggregation": aggregation,
        "seed": train.seed,
        "sites": [{"dir": str(Path(d).resolve())} for d in site_dirs],
    }


def scale_points(config: SuiteConfig) -> list[tuple[int, int]]:
    """Return the (sites, image size) points of both scaling curves, each once, in a fixed order."""
    points = [(sites, config.scale_image_sizes[0]) for sites in config.scale_sites]
    points += [(config.scale_image_sites, size) for size in config.scale_image_sizes]
    return list(dict.fromkeys(points))


def plan_cells(
    config: SuiteConfig,
    deferral_sites: list[Path],
    federation_sites: list[Path],
    scale_sites: dict[tuple[int, int], list[Path]],
    work_dir: Path,
) -> list[Cell]:
    """List the suite's cells in the order they run.

    Args:
        deferral_sites: sites of the deferral-quality cells, each trained alone.
        federation_sites: sites of the federation-cost cells; the first one also serves the throughput cell.
        scale_sites: site folders of each (sites, image size) point of :func:`scale_points`.
        work_dir: scratch folder for simulation run folders.
    """
    cells: list[Cell] = []
    first_seed = config.seeds[0]

    for site_dir in deferral_sites:
        site = site_dir.name
        for router, setup in ROUTERS.items():
            if setup is None:
                continue
            for seed in config.seeds:
                key = f"deferral/{site}/{router}/baseline/seed-{seed}"
                cells.append(_deferral(key, site_dir, router, BASELINE, seed, config))
            for variant in ablation_variants(config):
                key = f"deferral/{site}/{router}/{variant.name}/seed-{first_seed}"
                cells.append(_deferral(key, site_dir, router, variant, first_seed, config))

    for seed in config.seeds:
        for mode in FEDERATION_MODES:
            aggregation = "workload-aware" if mode == "workload-aware" else "fedavg"
            simulate_mode = mode if mode in ("local", "pooled") else "federated"
            seeded = replace(config, train=replace(config.train, seed=seed))
            raw = federation_file(seeded, federation_sites, aggregation)
            run_dir = work_dir / "federation" / f"{mode}-seed-{seed}"
            cells.append(_simulation(f"federation/{mode}/seed-{seed}", raw, run_dir, simulate_mode, config))

    cells.append(
        Cell(
            "speed/throughput",
            lambda: throughput_cell(
                federation_sites[0], config.train, config.network, config.throughput_steps, config.throughput_repeats
            ),
        )
    )
    for sites, size in scale_points(config):
        raw = federation_file(replace(config, rounds=1), scale_sites[(sites, size)])
        run_dir = work_dir / "scale" / f"sites-{sites}-image-{size}"
        cells.append(_simulation(f"scale/sites-{sites}/image-{size}", raw, run_dir, "federated", config))
    return cells


def _deferral(key: str, site_dir: Path, router: str, variant: Variant, seed: int, config: SuiteConfig) -> Cell:
    return Cell(key, lambda: deferral_cell(site_dir, router, variant, seed, config.train, config.network))


def _simulation(key: str, raw: dict[str, Any], run_dir: Path, mode: str, config: SuiteConfig) -> Cell:
    def run() -> dict[str, Any]:
        # A run folder left by an interrupted attempt would make `deferredseg simulate` reject the run.
        shutil.rmtree(run_dir, ignore_errors=True)
        return simulation_cell(raw, run_dir, mode, config.cpus_per_site, config.simulation_timeout)

    return Cell(key, run)
