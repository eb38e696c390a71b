"""PNG plots of a run's history: Dice per round per site, and expert workload against capacity."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def read_history(path: Path) -> list[dict]:
    """Read ``history.jsonl`` into a list of round records."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_plots(run_dir: Path) -> list[Path]:
    """Write ``plots/dice.png`` and ``plots/workload.png`` from ``run_dir/history.jsonl``; return their paths."""
    history = read_history(Path(run_dir) / "history.jsonl")
    if not history:
        return []
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    return [_dice_plot(history, out / "dice.png"), _workload_plot(history, out / "workload.png")]


def _series(history: list[dict], site_id: str, key: str) -> tuple[list[int], list[float]]:
    rounds, values = [], []
    for record in history:
        site = record["sites"].get(site_id)
        if site is not None and site.get(key) is not None:
            rounds.append(record["round"])
            values.append(site[key])
    return rounds, values


def _dice_plot(history: list[dict], path: Path) -> Path:
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    sites = sorted({site_id for record in history for site_id in record["sites"]})
    for index, site_id in enumerate(sites):
        colour = f"C{index % 10}"
        rounds, model = _series(history, site_id, "model_dice")
        axes.plot(rounds, model, "--o", color=colour, label=f"{site_id} model")
        rounds, system = _series(history, site_id, "system_dice")
        axes.plot(rounds, system, "-o", color=colour, label=f"{site_id} system")
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("validation Dice")
    axes.set_title("Dice per round (after local training)")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def _workload_plot(history: list[dict], path: Path) -> Path:
    figure = Figure(figsize=(10, 4), layout="constrained")
    utilization_axes = figure.add_subplot(1, 2, 1)
    pressure_axes = figure.add_subplot(1, 2, 2)
    experts = sorted({(s, e) for r in history for s, site in r["sites"].items() for e in site.get("experts", {})})
    for index, (site_id, expert_id) in enumerate(experts):
        rounds, utilization, pressure = [], [], []
        for record in history:
            values = record["sites"].get(site_id, {}).get("experts", {}).get(expert_id)
            if values is not None:
                rounds.append(record["round"])
                utilization.append(values["utilization"])
                pressure.append(values["pressure"])
        label = f"{site_id}/{expert_id}"
        utilization_axes.plot(rounds, utilization, "-o", color=f"C{index % 10}", label=label)
        pressure_axes.plot(rounds, pressure, "-o", color=f"C{index % 10}", label=label)
    for axes, name in ((utilization_axes, "utilization (load / capacity)"), (pressure_axes, "pressure (demand / capacity)")):
        axes.axhline(1.0, color="black", linewidth=1, linestyle=":", label="capacity")
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(name)
    pressure_axes.set_yscale("symlog")
    utilization_axes.legend(fontsize="x-small")
    figure.savefig(path, dpi=100)
    return path
