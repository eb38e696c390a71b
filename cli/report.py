"""Plain-text tables for the end of a run."""

from __future__ import annotations

from collections.abc import Mapping


def format_site_table(sites: Mapping[str, Mapping], federation: Mapping | None = None) -> str:
    """Format one row per site (and one for the federation): Dice values, deferral rate, utilization, violations."""
    header = (
        f"{'site':<16} {'model Dice':>10} {'system Dice':>11} {'oracle Dice':>11} {'conf. Dice':>10} "
        f"{'deferral':>8} {'max util.':>9} {'max press.':>10} {'violations':>10}"
    )
    lines = [header, "-" * len(header)]
    for site_id, result in sites.items():
        experts = result.get("experts", {})
        max_util = max((e["utilization"] for e in experts.values()), default=0.0)
        max_pressure = max((e.get("pressure", 0.0) for e in experts.values()), default=0.0)
        lines.append(
            f"{site_id:<16} {result['model_dice']:>10.4f} {result['system_dice']:>11.4f} "
            f"{result['oracle_system_dice']:>11.4f} {result['confidence_system_dice']:>10.4f} "
            f"{result['deferral_rate']:>8.4f} {max_util:>9.3f} {max_pressure:>10.3f} {result['capacity_violations']:>10d}"
        )
    if federation is not None:
        lines.append("-" * len(header))
        lines.append(
            f"{'federation':<16} {federation['model_dice']:>10.4f} {federation['system_dice']:>11.4f} "
            f"{federation['oracle_system_dice']:>11.4f} {federation['confidence_system_dice']:>10.4f} "
            f"{federation['deferral_rate']:>8.4f} {'':>9} {'':>10} {federation['capacity_violations']:>10d}"
        )

    lines.append("")
    lines.append(f"{'site':<16} {'expert':<16} {'capacity':>8} {'demand':>8} {'load':>8} {'utilization':>11}")
    for site_id, result in sites.items():
        for expert_id, e in result.get("experts", {}).items():
            lines.append(
                f"{site_id:<16} {expert_id:<16} {e['capacity']:>8.3f} {e['demand']:>8.4f} {e['load']:>8.4f} "
                f"{e['utilization']:>11.3f}"
            )
    return "\n".join(lines)
