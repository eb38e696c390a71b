"""Capacity ledger: per (site, expert) capacity, demand, load and the capacity price, round by round."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LedgerConfig:
    """Settings of the ledger.

    Args:
        price_step: step size eta of the price update ``price <- max(0, price + eta * (demand - capacity))``.
            Demand and capacity are fractions of ROI pixels and prices are subtracted from routing scores, so
            with eta = 0.1 an expert asked for 20 points more than their capacity gets a 0.02 higher price.
            On DRIVE and CHASE_DB1 a step of 0.5 cut demand to almost nothing within one round, hence the
            smaller default.
        workload_beta: beta of the workload-aware aggregation weight ``n * (1 + beta * max(0, P - 1))``.
    """

    price_step: float = 0.1
    workload_beta: float = 1.0

    def __post_init__(self) -> None:
        if self.price_step < 0:
            raise ValueError(f"price-step must be >= 0, got {self.price_step}")
        if self.workload_beta < 0:
            raise ValueError(f"workload-beta must be >= 0, got {self.workload_beta}")


def next_price(price: float, demand: float, capacity: float, step: float) -> float:
    """Projected dual ascent on the capacity constraint ``demand <= capacity``.

    The price rises while the router requests more of the expert than they can give. It falls, never below
    0, when the router requests less.
    """
    return max(0.0, price + step * (demand - capacity))


def workload_weight(num_examples: int, max_pressure: float, beta: float) -> float:
    """Aggregation weight of a site whose most-pressed expert has pressure ``max_pressure``.

    Sites whose experts are asked for more than their capacity (pressure > 1) count more, so the shared
    model improves where humans are overstretched.
    """
    return float(num_examples) * (1.0 + beta * max(0.0, max_pressure - 1.0))


@dataclass
class CapacityLedger:
    """Prices and the workload history of every (site, expert) pair.

    ``prices[site][expert]`` is the price that the next round sends. ``rounds[r][site][expert]`` contains what
    the site measured in round r on its validation split, with the price that was in effect then.
    """

    config: LedgerConfig = field(default_factory=LedgerConfig)
    prices: dict[str, dict[str, float]] = field(default_factory=dict)
    capacities: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: dict[int, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)

    def register(self, site_id: str, experts: Mapping[str, float]) -> None:
        """Record a site's experts and capacities; a new expert starts at price 0."""
        site_prices = self.prices.setdefault(site_id, {})
        for expert_id in experts:
            site_prices.setdefault(expert_id, 0.0)
        self.capacities[site_id] = {k: float(v) for k, v in experts.items()}

    def prices_for(self, site_id: str) -> dict[str, float]:
        """Return the prices that the site's next round uses."""
        return dict(self.prices.get(site_id, {}))

    def bounds_for(self, site_id: str) -> dict[str, list[float]]:
        """Return the soft load-balancing bounds ``[lower, upper] = [0, capacity]`` of each expert.

        Capacity is a maximum, so the lower bound is always 0: no rule forces work on an expert.
        """
        return {expert_id: [0.0, capacity] for expert_id, capacity in self.capacities.get(site_id, {}).items()}

    def record(self, server_round: int, site_id: str, experts: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
        """Store a site's measured workload for ``server_round`` and update its prices for the next round.

        Args:
            experts: per expert, ``capacity``, ``demand`` and ``load`` measured with the prices of this round.

        Returns:
            Per expert: capacity, demand, load, utilization, pressure and the price in effect this round.
        """
        self.register(site_id, {k: float(v["capacity"]) for k, v in experts.items()})
        entries = {}
        for expert_id, values in experts.items():
            capacity = float(values["capacity"])
            demand = float(values["demand"])
            load = float(values["load"])
            price = self.prices[site_id][expert_id]
            entries[expert_id] = {
                "capacity": capacity,
                "demand": demand,
                "load": load,
                "utilization": load / capacity,
                "pressure": demand / capacity,
                "price": price,
            }
            self.prices[site_id][expert_id] = next_price(price, demand, capacity, self.config.price_step)
        self.rounds.setdefault(server_round, {})[site_id] = entries
        return entries

    def max_pressure(self, server_round: int, site_id: str) -> float:
        """Return the largest expert pressure the site reported in ``server_round`` (0 without experts)."""
        entries = self.rounds.get(server_round, {}).get(site_id, {})
        return max((e["pressure"] for e in entries.values()), default=0.0)

    def to_json(self) -> str:
        """Serialize the whole ledger, so a resumed run continues from the same prices."""
        return json.dumps(
            {
                "config": {"price_step": self.config.price_step, "workload_beta": self.config.workload_beta},
                "prices": self.prices,
                "capacities": self.capacities,
                "rounds": {str(r): v for r, v in self.rounds.items()},
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, config: LedgerConfig | None = None) -> CapacityLedger:
        """Restore a ledger written by :meth:`to_json`; ``config`` replaces the saved settings when given."""
        raw: dict[str, Any] = json.loads(text)
        return cls(
            config=config or LedgerConfig(**raw["config"]),
            prices={s: {e: float(p) for e, p in v.items()} for s, v in raw["prices"].items()},
            capacities={s: {e: float(c) for e, c in v.items()} for s, v in raw["capacities"].items()},
            rounds={int(r): v for r, v in raw["rounds"].items()},
        )
