"""Statistics of benchmark numbers: means with t-distribution confidence intervals and paired differences."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
# Utilization below this counts as an idle expert: the expert received no pixel on any test image.
IDLE_UTILIZATION = 1e-12


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` per-seed values with the two-sided confidence interval of the mean.

    ``low`` and ``high`` are ``None`` when ``n < 2``, because one value gives no interval.
    """

    mean: float
    n: int
    low: float | None = None
    high: float | None = None

    def format(self, digits: int = 4) -> str:
        """Format as ``mean [low, high]``, or ``mean (1 seed, CI n/a)``."""
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}f} ({self.n} seed, CI n/a)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Compute the mean of ``values`` and its Student-t confidence interval (scipy.stats.t).

    Raises:
        ValueError: when ``values`` is empty, contains a non-finite value, or ``confidence`` is outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} is invalid, use a value in (0, 1) such as 0.95")
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to average; run at least one seed")
    if not np.isfinite(array).all():
        raise ValueError(f"values {array.tolist()} contain NaN or infinity; the cell that produced them failed")

    mean = float(array.mean())
    if array.size < 2:
        return Estimate(mean, 1)

    # The interval of a constant sample is the point itself; scipy returns NaN bounds for a zero scale.
    sem = float(stats.sem(array))
    if sem == 0.0:
        return Estimate(mean, int(array.size), mean, mean)
    low, high = stats.t.interval(confidence, df=array.size - 1, loc=mean, scale=sem)
    return Estimate(mean, int(array.size), float(low), float(high))


def paired_difference(first: Sequence[float], second: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Compute the mean and confidence interval of ``first[i] - second[i]`` over seeds i.

    Raises:
        ValueError: when the two sequences have different lengths, so the seeds do not pair up.
    """
    if len(first) != len(second):
        raise ValueError(
            f"paired values need one value per seed on both sides, got {len(first)} and {len(second)}"
        )
    return mean_ci([a - b for a, b in zip(first, second)], confidence)


def oracle_gain_share(value: float, model: float, oracle: float, tolerance: float = 1e-9) -> float:
    """Share of the oracle's Dice gain over the model that ``value`` captures: (value - model) / (oracle - model).

    Returns 0.0 when the oracle gains nothing (gain <= ``tolerance``), as the project's summaries do.
    """
    gain = oracle - model
    return (value - model) / gain if gain > tolerance else 0.0


def utilization_spread(sites: Mapping[str, Mapping[str, Any]]) -> tuple[float, int]:
    """Return the max minus min utilization over all experts of all sites, and the number of idle experts.

    Args:
        sites: per-site summaries, each with ``experts: {id: {"utilization": float, ...}}``.

    Raises:
        ValueError: when no site has an expert.
    """
    values = [float(e["utilization"]) for site in sites.values() for e in site.get("experts", {}).values()]
    if not values:
        raise ValueError(f"sites {sorted(sites)} declare no experts, so the utilization spread is undefined")
    idle = sum(1 for value in values if value <= IDLE_UTILIZATION)
    return max(values) - min(values), idle


def all_finite(value: Any, path: str = "", allow_none: bool = False) -> list[str]:
    """Return the paths of the numbers inside nested dicts and lists that are NaN, infinite or missing.

    ``None`` counts as missing unless ``allow_none`` is set (interval bounds of a single seed are ``None``).
    """
    if isinstance(value, Mapping):
        return [bad for key, item in value.items() for bad in all_finite(item, f"{path}/{key}", allow_none)]
    if isinstance(value, (list, tuple)):
        return [bad for index, item in enumerate(value) for bad in all_finite(item, f"{path}[{index}]", allow_none)]
    if value is None:
        return [] if allow_none else [path or "/"]
    if isinstance(value, bool) or isinstance(value, str):
        return []
    if isinstance(value, (int, float)) and math.isfinite(value):
        return []
    return [path or "/"]
