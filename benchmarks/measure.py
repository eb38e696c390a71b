"""Measurements behind the benchmark cells: one routing variant on one site, training throughput, one simulation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w
import torch
from monai.losses import DiceLoss

from benchmarks.stats import oracle_gain_share, utilization_spread
from client.engine import PatchSampler, expert_priority, select_device
from client.sitedata import SiteData, open_site
from common.config import TrainSettings
from common.losses import LossWeights, deferredseg_loss
from common.model import DeferredSegNet, NetworkConfig, _build_backbone

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Flower and Ray settings for every simulation subprocess: no telemetry, no network look-ups.
SIMULATION_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
RSS_POLL_SECONDS = 0.2
LOG_TAIL_CHARS = 3000

# A router turns the default training and loss settings into its own. ``None`` marks a router that is not
# built yet, and its table rows show "not built yet".
RouterSetup = Callable[[TrainSettings, LossWeights], tuple[TrainSettings, LossWeights]]
ROUTERS: dict[str, RouterSetup | None] = {
    "softmax": lambda train, loss: (replace(train, router="softmax"), loss),
    "benefit": lambda train, loss: (replace(train, router="benefit"), loss),
}


@dataclass(frozen=True)
class Variant:
    """A training variant of the deferral-quality ablations.

    Attributes:
        name: row label and part of the cell key.
        coherence: keep the spatial-coherence term (total variation of the deferral probability).
        load_balancing: weight of the soft load-balancing term, with bounds [0, capacity] (0 turns it off).
        one_expert: keep only the site's most accurate expert on the validation split.
    """

    name: str
    coherence: bool = True
    load_balancing: float = 0.0
    one_expert: bool = False


def _keep_best_expert(site: SiteData) -> SiteData:
    """Return ``site`` with only its most accurate expert on the validation split."""
    best = expert_priority(site.split("validation"), len(site.experts))[0]
    return SiteData(site.spec, [site.experts[best]])


def deferral_cell(
    site_dir: Path,
    router: str,
    variant: Variant,
    seed: int,
    train: TrainSettings,
    network: NetworkConfig,
) -> dict[str, Any]:
    """Train one site with ``router`` and ``variant`` and score its test split.

    Training, checkpoint choice on the validation split and the test scoring are those of
    ``cli.train.train_sites``. The confidence baseline uses the router's per-image, per-expert pixel counts.

    Returns:
        Test-split numbers: model (no deferral), system, confidence and oracle Dice, the oracle-gain shares of
        the router and of confidence deferral, deferral rate, deferral regions per image, utilization spread
        and idle experts.
    """
    from cli.train import train_sites

    setup = ROUTERS.get(router)
    if setup is None:
        raise ValueError(f"router {router!r} is not built yet or unknown; built routers: {built_routers()}")

    site = open_site(site_dir)
    if variant.one_expert:
        site = _keep_best_expert(site)
    coherence = LossWeights.coherence if variant.coherence else 0.0
    loss = LossWeights(coherence=coherence, load_balancing=variant.load_balancing)
    train, loss = setup(replace(train, seed=seed), loss)
    network = replace(network, in_channels=site.spec.in_channels)

    with tempfile.TemporaryDirectory(prefix="deferredseg-bench-") as scratch:
        summary = train_sites([site], Path(scratch), train, network, loss, progress=False)

    result = summary["sites"][site.site_id]
    spread, idle = utilization_spread({site.site_id: result})
    return {
        "model_dice": result["model_dice"],
        "system_dice": result["system_dice"],
        "confidence_system_dice": result["confidence_system_dice"],
        "oracle_system_dice": result["oracle_system_dice"],
        "oracle_gain_share": result["oracle_gain_share"],
        "confidence_gain_share": oracle_gain_share(
            result["confidence_system_dice"], result["model_dice"], result["oracle_system_dice"]
        ),
        "deferral_rate": result["deferral_rate"],
        "deferral_regions": result["deferral_regions"],
        "capacity_violations": result["capacity_violations"],
        "utilization_spread": spread,
        "idle_experts": idle,
        "num_experts": len(site.experts),
    }


def built_routers() -> list[str]:
    """Return the names of the routers that can be benchmarked now."""
    return [name for name, setup in ROUTERS.items() if setup is not None]


def _time_steps(step: Callable[[], None], steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - started


def throughput_cell(
    site_dir: Path, train: TrainSettings, network: NetworkConfig, steps: int, repeats: int, seed: int = 0
) -> dict[str, float]:
    """Measure training images per second of the DeferredSeg network and of the plain MONAI backbone.

    Both train on the same fixed batch of ``train.batch_size`` patches in this process, on the device that
    ``train.device`` selects. The plain network is the same backbone with one output channel and MONAI's
    ``DiceLoss`` (no deferral heads, no deferral losses). Timed blocks of ``steps`` steps alternate between
    the two networks ``repeats`` times after one warm-up block each, so a change in machine load hits both.

    Returns:
        ``deferredseg_images_per_second``, ``plain_images_per_second`` and their ratio ``throughput_ratio``.
    """
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps={steps} and repeats={repeats} must both be at least 1")

    torch.manual_seed(seed)
    device = select_device(train.device)
    site = open_site(site_dir)
    network = replace(network, in_channels=site.spec.in_channels)
    batch = PatchSampler(site.split("train"), train.patch_size, seed).sample(train.batch_size)
    batch = {key: value.to(device) for key, value in batch.items()}
    weights = LossWeights()

    deferred = DeferredSegNet(network, num_experts=len(site.experts)).to(device).train()
    deferred_optimizer = torch.optim.Adam(deferred.parameters(), lr=train.learning_rate)
    plain = _build_backbone(replace(network, features=1)).to(device).train()
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=train.learning_rate)
    plain_loss = DiceLoss(sigmoid=True)

    def deferred_step() -> None:
        deferred_optimizer.zero_grad(set_to_none=True)
        out = deferred(batch["image"])
        loss, _ = deferredseg_loss(
            out.seg_logit, out.routing_logits, out.deferral_logit, batch["reference"], batch["experts"],
            batch["available"], batch["roi"], weights,
        )
        loss.backward()
        deferred_optimizer.step()

    def plain_step() -> None:
        plain_optimizer.zero_grad(set_to_none=True)
        loss = plain_loss(plain(batch["image"]), batch["reference"])
        loss.backward()
        plain_optimizer.step()

    _time_steps(deferred_step, steps)
    _time_steps(plain_step, steps)
    deferred_seconds = plain_seconds = 0.0
    for _ in range(repeats):
        deferred_seconds += _time_steps(deferred_step, steps)
        plain_seconds += _time_steps(plain_step, steps)

    images = train.batch_size * steps * repeats
    deferred_rate = images / deferred_seconds
    plain_rate = images / plain_seconds
    return {
        "deferredseg_images_per_second": deferred_rate,
        "plain_images_per_second": plain_rate,
        "throughput_ratio": deferred_rate / plain_rate,
        "batch_size": train.batch_size,
        "patch_size": train.patch_size,
    }


def process_tree_rss(root_pid: int) -> int:
    """Sum the resident set size, in bytes, of ``root_pid`` and all its descendants, read from /proc.

    Pages shared between processes (for example the torch libraries) count once per process, so the sum
    is an upper bound of the memory in use.
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8") as stat:
                # The command name is in parentheses and may contain spaces, so split after its last ")".
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))

    total = 0
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status", encoding="utf-8") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def run_simulation(
    federation: dict[str, Any],
    run_dir: Path,
    mode: str = "federated",
    cpus_per_site: float = 1.0,
    timeout: float = 3600,
) -> tuple[dict[str, Any], int, float]:
    """Run ``deferredseg simulate`` in a subprocess, so Ray starts and stops with it.

    Args:
        federation: the federation file's keys, written to ``run_dir/federation-source.toml``.
        run_dir: the run folder; it must not hold a finished run.
        mode: ``federated``, ``local`` or ``pooled``.
        cpus_per_site: CPU cores Ray reserves per virtual node; fewer cores than sites run nodes in turn.
        timeout: seconds before the simulation is stopped and reported as failed.

    Returns:
        The run's ``summary.json``, the peak resident memory of its process tree in bytes (polled every
        ``RSS_POLL_SECONDS``) and its wall time in seconds.

    Raises:
        RuntimeError: when the simulation fails or times out, with the tail of its log.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = run_dir / "federation-source.toml"
    source.write_bytes(tomli_w.dumps(federation).encode("utf-8"))
    log_path = run_dir / "simulate.log"
    command = [
        sys.executable, "-m", "cli.main", "simulate", "--federation", str(source), "--out", str(run_dir / "run"),
        "--mode", mode, "--cpus-per-site", str(cpus_per_site),
    ]

    peak = 0
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SIMULATION_ENV}
        )
        try:
            while process.poll() is None:
                peak = max(peak, process_tree_rss(process.pid))
                if time.perf_counter() - started > timeout:
                    process.kill()
                    process.wait()
                    raise RuntimeError(f"simulation in {run_dir} timed out after {timeout:.0f} s; see {log_path}")
                time.sleep(RSS_POLL_SECONDS)
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            raise
    wall = time.perf_counter() - started

    summary_path = run_dir / "run" / "summary.json"
    if process.returncode != 0 or not summary_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"simulation in {run_dir} failed with exit status {process.returncode}:\n{tail}")
    return json.loads(summary_path.read_text(encoding="utf-8")), peak, wall


def round_costs(history_path: Path) -> dict[str, float]:
    """Average the per-round wall time, its local-training and other parts, and the bytes over ``history.jsonl``.

    Local training is the slowest site's training time, because the round waits for it. The rest of the
    round is Flower communication, aggregation, evaluation and checkpointing.
    """
    lines = [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{history_path} has no rounds; the simulation finished none")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    round_seconds = mean([line["timing"]["round_seconds"] for line in lines])
    train_seconds = mean([line["timing"]["max_train_seconds"] for line in lines])
    return {
        "rounds": len(lines),
        "round_seconds": round_seconds,
        "train_seconds": train_seconds,
        "other_seconds": round_seconds - train_seconds,
        "bytes_sent": mean([line["bytes"]["sent"] for line in lines]),
        "bytes_received": mean([line["bytes"]["received"] for line in lines]),
    }


def simulation_cell(
    federation: dict[str, Any], run_dir: Path, mode: str, cpus_per_site: float, timeout: float
) -> dict[str, Any]:
    """Run one simulation and return per-site test numbers, the utilization spread and, when federated, round costs."""
    summary, peak, wall = run_simulation(federation, run_dir, mode, cpus_per_site, timeout)
    sites = {
        site_id: {key: result[key] for key in ("model_dice", "system_dice", "deferral_rate", "capacity_violations")}
        for site_id, result in summary["sites"].items()
    }
    spread, idle = utilization_spread(summary["sites"])
    result: dict[str, Any] = {
        "sites": sites,
        "system_dice": sum(s["system_dice"] for s in sites.values()) / len(sites),
        "utilization_spread": spread,
        "idle_experts": idle,
        "peak_rss_bytes": peak,
        "wall_seconds": wall,
    }
    if mode == "federated":
        result["round"] = round_costs(run_dir / "run" / "history.jsonl")
    return result
