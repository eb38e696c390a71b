"""Shared fixtures: tiny synthetic sites and the environment every Flower process needs."""

import os
from pathlib import Path

import pytest

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_name, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def tiny_sites(tmp_path: Path) -> list[Path]:
    """Two synthetic sites of 8 cases at 32 x 32 pixels."""
    from common.synthetic import write_synthetic_sites

    return write_synthetic_sites(tmp_path / "sites", n_sites=2, seed=3, image_size=32, cases_per_site=8)
