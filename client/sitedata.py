"""A site's data as training and evaluation see it: its spec, its resolved experts and its cached splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.config import SiteEntry, resolve_experts
from common.experts import ExpertSpec
from common.site import Case, SiteSpec, load_site_spec, load_split


@dataclass
class SiteData:
    """One site with the experts of this run (site.toml plus any federation overrides).

    Splits are read on first use and cached, because a training run evaluates the validation split often.
    """

    spec: SiteSpec
    experts: list[ExpertSpec]
    _cache: dict[str, list[Case]] = field(default_factory=dict, repr=False)

    @property
    def site_id(self) -> str:
        """The site id from site.toml."""
        return self.spec.site_id

    @property
    def expert_ids(self) -> list[str]:
        """Expert ids in routing-channel order."""
        return [e.id for e in self.experts]

    @property
    def capacity(self) -> list[float]:
        """Capacities in routing-channel order."""
        return [e.capacity for e in self.experts]

    def split(self, name: str) -> list[Case]:
        """Return the cases of split ``name`` (read once, then cached)."""
        if name not in self._cache:
            self._cache[name] = load_split(self.spec, name, self.experts)
        return self._cache[name]

    def split_sizes(self) -> dict[str, int]:
        """Return the number of cases of every split, without reading any image."""
        return {name: len(ids) for name, ids in self.spec.splits.items()}


def open_site(site_dir: Path, entry: SiteEntry | None = None) -> SiteData:
    """Read ``site.toml`` and apply a federation file's capacity overrides and extra experts."""
    spec = load_site_spec(Path(site_dir))
    return SiteData(spec, resolve_experts(list(spec.experts), entry, source=str(site_dir)))


def pool_cases(cases_per_site: Sequence[Sequence[Case]], experts_per_site: Sequence[int]) -> list[Case]:
    """Put several sites' cases on one expert axis for pooled training.

    Site s's experts take channels ``offset_s .. offset_s + K_s - 1`` of the pooled network, and on another
    site's cases they are unavailable, so they contribute nothing to the losses there.
    """
    total = sum(experts_per_site)
    pooled = []
    offset = 0
    for cases, count in zip(cases_per_site, experts_per_site):
        for case in cases:
            height, width = case.reference.shape
            masks = np.zeros((total, height, width), dtype=np.uint8)
            available = np.zeros(total, dtype=bool)
            masks[offset : offset + count] = case.expert_masks
            available[offset : offset + count] = case.expert_available
            pooled.append(replace(case, expert_masks=masks, expert_available=available))
        offset += count
    return pooled
