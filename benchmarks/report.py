"""Benchmark tables: statistics over the saved cells, and the markdown that shows them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.measure import ROUTERS
from benchmarks.stats import Estimate, mean_ci, paired_difference
from benchmarks.suites import BASELINE, FEDERATION_MODES, SuiteConfig, ablation_variants, scale_points

NOT_BUILT = "not built yet"
MIB = 2**20
DEFERRAL_METRICS = (
    "system_dice", "confidence_system_dice", "model_dice", "oracle_system_dice", "oracle_gain_share",
    "confidence_gain_share",
)
ABLATION_METRICS = ("system_dice", "deferral_regions", "utilization_spread", "idle_experts", "deferral_rate")


def estimate_dict(estimate: Estimate) -> dict[str, Any]:
    """Convert an estimate to JSON: mean, n, and the interval bounds (``None`` with one seed)."""
    return {"mean": estimate.mean, "n": estimate.n, "low": estimate.low, "high": estimate.high}


def _estimate(raw: Mapping[str, Any]) -> Estimate:
    return Estimate(raw["mean"], raw["n"], raw["low"], raw["high"])


def verdict(difference: Estimate) -> str:
    """Say whether a paired difference (method minus baseline) shows the method ahead.

    ``better`` needs the whole interval above 0; ``not better`` is written whenever the mean is <= 0; a
    positive mean whose interval includes 0 is ``not significant``. With one seed the sign of the single
    value decides, marked as such.
    """
    if difference.low is None or difference.high is None:
        return "better (1 seed)" if difference.mean > 0 else "not better (1 seed)"
    if difference.mean <= 0:
        return "not better"
    return "better" if difference.low > 0 else "not significant"


def _values(cells: Mapping[str, Any], keys: Sequence[str], metric: str) -> list[float] | None:
    if not all(key in cells for key in keys):
        return None
    return [float(cells[key][metric]) for key in keys]


def summarize_cells(config: SuiteConfig, cells: Mapping[str, Any], deferral_sites: Sequence[str]) -> dict[str, Any]:
    """Compute every table's numbers from the saved cells; a table whose cells are missing is left out.

    Returns:
        ``{"deferral": ..., "ablations": ..., "federation": ..., "workload": ..., "speed": ..., "scale": ...}``,
        each holding means with confidence intervals (``estimate_dict``) and paired differences.
    """
    seeds = config.seeds
    first = config.seeds[0]
    summary: dict[str, Any] = {"deferral": {}, "ablations": {}, "federation": {}, "workload": {}}

    for site in deferral_sites:
        for router, setup in ROUTERS.items():
            if setup is None:
                summary["deferral"].setdefault(site, {})[router] = NOT_BUILT
                continue
            keys = [f"deferral/{site}/{router}/baseline/seed-{seed}" for seed in seeds]
            values = {metric: _values(cells, keys, metric) for metric in DEFERRAL_METRICS}
            if any(v is None for v in values.values()):
                continue
            row: dict[str, Any] = {metric: estimate_dict(mean_ci(v)) for metric, v in values.items()}
            for baseline, name in (("confidence_system_dice", "vs_confidence"), ("model_dice", "vs_no_deferral")):
                difference = paired_difference(values["system_dice"], values[baseline])
                row[name] = {**estimate_dict(difference), "verdict": verdict(difference)}
            summary["deferral"].setdefault(site, {})[router] = row

            reference_key = f"deferral/{site}/{router}/baseline/seed-{first}"
            ablations = {}
            for variant in [BASELINE, *ablation_variants(config)]:
                key = f"deferral/{site}/{router}/{variant.name}/seed-{first}"
                if key in cells and reference_key in cells:
                    ablations[variant.name] = {metric: float(cells[key][metric]) for metric in ABLATION_METRICS}
            summary["ablations"].setdefault(site, {})[router] = ablations

    mode_keys = {mode: [f"federation/{mode}/seed-{seed}" for seed in seeds] for mode in FEDERATION_MODES}
    if all(key in cells for keys in mode_keys.values() for key in keys):
        site_ids = sorted(cells[mode_keys["fedavg"][0]]["sites"])
        per_site: dict[str, Any] = {}
        for site_id in site_ids:
            dice = {
                mode: [float(cells[key]["sites"][site_id]["system_dice"]) for key in keys]
                for mode, keys in mode_keys.items()
            }
            per_site[site_id] = {mode: estimate_dict(mean_ci(v)) for mode, v in dice.items()}
            for other in ("local", "pooled"):
                difference = paired_difference(dice["fedavg"], dice[other])
                per_site[site_id][f"fedavg_vs_{other}"] = {**estimate_dict(difference), "verdict": verdict(difference)}
        summary["federation"] = per_site

        workload: dict[str, Any] = {}
        for metric in ("system_dice", "utilization_spread", "idle_experts"):
            fedavg = [float(cells[key][metric]) for key in mode_keys["fedavg"]]
            aware = [float(cells[key][metric]) for key in mode_keys["workload-aware"]]
            workload[metric] = {
                "fedavg": estimate_dict(mean_ci(fedavg)),
                "workload-aware": estimate_dict(mean_ci(aware)),
                "difference": estimate_dict(paired_difference(aware, fedavg)),
            }
        summary["workload"] = workload

    speed: dict[str, Any] = {}
    if "speed/throughput" in cells:
        speed["throughput"] = {k: v for k, v in cells["speed/throughput"].items() if k != "cell_seconds"}
    round_key = f"federation/fedavg/seed-{first}"
    if round_key in cells:
        speed["round"] = cells[round_key]["round"]
    summary["speed"] = speed

    scale = {}
    for sites, size in scale_points(config):
        key = f"scale/sites-{sites}/image-{size}"
        if key in cells:
            scale[f"{sites}x{size}"] = {
                "sites": sites,
                "image_size": size,
                **cells[key]["round"],
                "peak_rss_mib": cells[key]["peak_rss_bytes"] / MIB,
                "wall_seconds": cells[key]["wall_seconds"],
            }
    summary["scale"] = scale
    return summary


def _fmt(raw: Mapping[str, Any] | None, digits: int = 4) -> str:
    if raw is None:
        return "missing"
    return _estimate(raw).format(digits)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def markdown_tables(config: SuiteConfig, summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Render the suite's tables as markdown, with the command, machine, date and reductions on top."""
    lines = [
        f"# Benchmark results: `{config.name}` suite",
        "",
        f"- command: `{meta.get('command', 'python -m benchmarks.run --suite ' + config.name)}`",
        f"- date: {meta.get('date', 'unknown')}",
        f"- machine: {meta.get('machine', 'unknown')}",
        f"- wall time: {meta.get('wall_seconds', float('nan')):.0f} s; 1-minute load average at the end: "
        f"{meta.get('load_average_at_end', float('nan')):.1f} (other jobs on the machine slow every timing)",
        f"- seeds: {', '.join(str(s) for s in config.seeds)}; values are means with a 95% t-interval over seeds, "
        "and differences are paired per seed",
        "- reduced against the project defaults: " + "; ".join(config.reductions),
        "",
    ]
    if config.name == "quick":
        lines += ["The quick suite checks that every number is produced and finite. It makes no quality claim.", ""]

    lines += ["## Deferral quality (test split, each site trained alone)", ""]
    rows = []
    for site, routers in summary["deferral"].items():
        for router, row in routers.items():
            if row == NOT_BUILT:
                rows.append([site, router] + [NOT_BUILT] * 8)
                continue
            rows.append(
                [
                    site, router, _fmt(row["system_dice"]), _fmt(row["confidence_system_dice"]),
                    _fmt(row["model_dice"]),
                    _fmt(row["oracle_system_dice"]), _fmt(row["oracle_gain_share"], 3),
                    _fmt(row["confidence_gain_share"], 3),
                    f"{_fmt(row['vs_confidence'])}: {row['vs_confidence']['verdict']}",
                    f"{_fmt(row['vs_no_deferral'])}: {row['vs_no_deferral']['verdict']}",
                ]
            )
    lines += _table(
        [
            "site", "router", "system Dice", "confidence Dice (same counts)", "no deferral", "oracle",
            "share of oracle gain", "confidence share", "router - confidence", "router - no deferral",
        ],
        rows,
    )

    lines += [f"## Ablations (seed {config.seeds[0]}, 1 seed: no interval)", ""]
    rows = []
    for site, routers in summary["ablations"].items():
        for router, variants in routers.items():
            for name, values in variants.items():
                rows.append(
                    [
                        site, router, name, f"{values['system_dice']:.4f}", f"{values['deferral_regions']:.1f}",
                        f"{values['utilization_spread']:.3f}", f"{values['idle_experts']:.0f}",
                        f"{values['deferral_rate']:.4f}",
                    ]
                )
    lines += _table(
        ["site", "router", "variant", "system Dice", "deferral regions per image", "utilization spread",
         "idle experts", "deferral rate"],
        rows,
    )

    lines += ["## Cost of federation: system Dice per site (test split)", ""]
    rows = []
    for site_id, row in summary["federation"].items():
        rows.append(
            [
                site_id, _fmt(row["fedavg"]), _fmt(row["workload-aware"]), _fmt(row["pooled"]), _fmt(row["local"]),
                f"{_fmt(row['fedavg_vs_pooled'])}: {row['fedavg_vs_pooled']['verdict']}",
                f"{_fmt(row['fedavg_vs_local'])}: {row['fedavg_vs_local']['verdict']}",
            ]
        )
    lines += _table(
        ["site", "federated (FedAvg)", "federated (workload-aware)", "pooled", "site-local",
         "FedAvg - pooled", "FedAvg - local"],
        rows,
    )

    lines += ["## FedAvg against workload-aware aggregation (mean over sites)", ""]
    rows = []
    for metric, row in summary["workload"].items():
        label = metric.replace("_", " ")
        rows.append([label, _fmt(row["fedavg"]), _fmt(row["workload-aware"]), _fmt(row["difference"])])
    lines += _table(["metric", "FedAvg", "workload-aware", "workload-aware - FedAvg"], rows)
    lines += [
        "Utilization spread is max minus min utilization over all experts of all sites; idle experts received no "
        "pixel.",
        "",
    ]

    lines += ["## Speed", ""]
    speed = summary["speed"]
    rows = []
    if "throughput" in speed:
        throughput = speed["throughput"]
        deferred_rate = throughput["deferredseg_images_per_second"]
        plain_rate = throughput["plain_images_per_second"]
        rows.append(["training throughput, DeferredSeg network", f"{deferred_rate:.1f} images/s"])
        rows.append(["training throughput, same MONAI backbone with Dice loss only", f"{plain_rate:.1f} images/s"])
        rows.append(
            ["throughput ratio DeferredSeg / plain (same run, same batch)", f"{throughput['throughput_ratio']:.3f}"]
        )
    if "round" in speed:
        timing = speed["round"]
        rows.append(["federated round wall time", f"{timing['round_seconds']:.2f} s"])
        rows.append(["of which local training (slowest site)", f"{timing['train_seconds']:.2f} s"])
        rows.append(["of which Flower communication, aggregation and evaluation", f"{timing['other_seconds']:.2f} s"])
        rows.append(["bytes sent per round (coordinator to sites)", f"{timing['bytes_sent'] / MIB:.3f} MiB"])
        rows.append(["bytes received per round", f"{timing['bytes_received'] / MIB:.3f} MiB"])
    lines += _table(["measure", "value"], rows)

    lines += [
        "## Scale (1 round, seed 0; peak memory sums the resident memory of the simulation's process tree)",
        "",
        f"Ray reserves {config.cpus_per_site:g} CPU core per virtual node, so on a machine with fewer cores than "
        "sites the nodes train in turn, and memory and round time grow less than the site count.",
        "",
    ]
    rows = [
        [
            str(point["sites"]), str(point["image_size"]), f"{point['round_seconds']:.2f}",
            f"{point['train_seconds']:.2f}",
            f"{point['other_seconds']:.2f}", f"{point['bytes_sent'] / MIB:.3f}", f"{point['peak_rss_mib']:.0f}",
        ]
        for point in summary["scale"].values()
    ]
    lines += _table(
        [
            "sites", "image side (px)", "round (s)", "local training (s)", "rest of round (s)", "sent (MiB)",
            "peak memory (MiB)",
        ],
        rows,
    )
    return "\n".join(lines)
