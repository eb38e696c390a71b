"""Shared fixtures: tiny synthetic sites and the environment every Flower process needs."""

from pathlib import Path

import pytest

from common.environment import apply_flower_environment

apply_flower_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def tiny_sites(tmp_path: Path) -> list[Path]:
    """Two synthetic sites of 8 cases at 32 x 32 pixels."""
    from common.synthetic import write_synthetic_sites

    return write_synthetic_sites(tmp_path / "sites", n_sites=2, seed=3, image_size=32, cases_per_site=8)
