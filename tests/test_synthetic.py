"""Tests for the built-in synthetic federation writer."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.synthetic import AppearanceRanges, SiteAppearance, draw_appearance, generate_case, write_synthetic_sites


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def site_files(site_dir: Path) -> dict[str, bytes]:
    files = sorted(path for path in site_dir.rglob("*") if path.is_file())
    return {str(path.relative_to(site_dir)): path.read_bytes() for path in files}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_synthetic_sites(tmp_path_factory.mktemp("federation"), n_sites=3, seed=7)


def test_sites_same_seed_identical(tmp_path: Path, federation: list[Path]) -> None:
    again = write_synthetic_sites(tmp_path, n_sites=3, seed=7)
    assert [site.name for site in again] == ["site-1", "site-2", "site-3"]
    for first, second in zip(federation, again):
        first_files = site_files(first)
        assert len(first_files) == 1 + 2 * 24
        assert site_files(second) == first_files


def test_sites_other_seed_differs(tmp_path: Path, federation: list[Path]) -> None:
    other = write_synthetic_sites(tmp_path, n_sites=3, seed=8)
    for first, second in zip(federation, other):
        for case in ("case-000", "case-023"):
            assert (first / "images" / f"{case}.png").read_bytes() != (second / "images" / f"{case}.png").read_bytes()


def test_sites_independent_of_count(tmp_path: Path, federation: list[Path]) -> None:
    # Site i depends only on the seed and i, so a smaller federation repeats the first sites.
    (single,) = write_synthetic_sites(tmp_path, n_sites=1, seed=7)
    assert site_files(single) == site_files(federation[0])


def test_sites_appearance_differs(federation: list[Path]) -> None:
    stats = []
    for site in federation:
        images = [read_png(path).astype(np.float64) for path in sorted((site / "images").glob("*.png"))]
        stats.append((np.mean([image.mean() for image in images]), np.mean([image.std() for image in images])))

    for first in range(3):
        for second in range(first + 1, 3):
            mean_gap = abs(stats[first][0] - stats[second][0])
            std_gap = abs(stats[first][1] - stats[second][1])
            assert max(mean_gap, std_gap) > 5.0, f"site-{first + 1} and site-{second + 1} look alike: {stats}"


def test_appearance_shift_levels() -> None:
    # Range (0.1, 0.4) in 3 levels of width 0.1, drawn within the central half: consecutive sites differ
    # by at least 0.05 in background level, whatever the seed.
    ranges = AppearanceRanges()
    for seed in range(20):
        shifts = [
            draw_appearance(np.random.default_rng([seed, index]), index, ranges).intensity_shift for index in range(4)
        ]
        for index in range(3):
            assert abs(shifts[index + 1] - shifts[index]) >= 0.05 - 1e-12, f"seed {seed}: {shifts}"
        assert 0.125 <= shifts[0] <= 0.175
        assert 0.325 <= shifts[2] <= 0.375
        assert 0.125 <= shifts[3] <= 0.175


def test_images_and_masks_format(federation: list[Path]) -> None:
    site = federation[0]
    with Image.open(site / "images" / "case-000.png") as image:
        assert image.mode == "L"
        assert image.size == (64, 64)
    reference_values = np.unique(np.concatenate([read_png(p).ravel() for p in (site / "reference").glob("*.png")]))
    assert reference_values.tolist() == [0, 255]


def test_structures_thin_and_blob(federation: list[Path]) -> None:
    n_thin = 0
    n_blob = 0
    for site in federation:
        for path in sorted((site / "reference").glob("*.png")):
            foreground = read_png(path) > 0
            assert 0.01 <= foreground.mean() <= 0.35, f"{path}: foreground fraction {foreground.mean():.3f}"

            # A component that a 3x3 erosion removes entirely is at most 2 pixels wide.
            labels, n_components = ndimage.label(foreground, structure=np.ones((3, 3)))
            for component in range(1, n_components + 1):
                eroded = ndimage.binary_erosion(labels == component, structure=np.ones((3, 3)))
                if eroded.any():
                    n_blob += 1
                else:
                    n_thin += 1
    assert n_thin >= 24
    assert n_blob >= 24


def test_blob_border_ambiguous() -> None:
    # Without noise the borders are still soft, so some reference pixels are darker than the brightest
    # background pixels within 2 pixels of the structures.
    appearance = SiteAppearance(contrast=0.5, noise_std=0.0, blur_sigma=1.0, intensity_shift=0.2)
    image, reference = generate_case(np.random.default_rng(0), appearance, 64)
    assert image.dtype == np.float32
    assert reference.dtype == np.uint8
    border_background = ndimage.binary_dilation(reference > 0, iterations=2) & (reference == 0)
    assert image[reference > 0].min() < image[border_background].max()


def test_site_toml_schema(federation: list[Path]) -> None:
    for site in federation:
        config = tomllib.loads((site / "site.toml").read_text())
        assert config["site-id"] == site.name
        assert config["in-channels"] == 1
        assert config["description"] == "built-in synthetic site (seed 7)"

        experts = config["experts"]
        assert 2 <= len(experts) <= 3
        assert len({expert["id"] for expert in experts}) == len(experts)
        for expert in experts:
            assert 0.02 <= expert["capacity"] <= 0.1
            assert expert["profile"] in ("pixel", "block")
            assert isinstance(expert["seed"], int)


def test_site_toml_splits(federation: list[Path]) -> None:
    for site in federation:
        splits = tomllib.loads((site / "site.toml").read_text())["splits"]
        assert set(splits) == {"train", "calibration", "validation", "test"}
        assert {name: len(ids) for name, ids in splits.items()} == {
            "train": 12, "calibration": 4, "validation": 2, "test": 6,
        }

        all_ids = [case for ids in splits.values() for case in ids]
        assert len(all_ids) == len(set(all_ids))
        assert set(all_ids) == {path.stem for path in (site / "images").glob("*.png")}
        assert set(all_ids) == {path.stem for path in (site / "reference").glob("*.png")}


def test_write_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_synthetic_sites(tmp_path, n_sites=3, seed=0)
    assert time.perf_counter() - start < 5.0


def test_write_rejects_existing(tmp_path: Path) -> None:
    write_synthetic_sites(tmp_path, n_sites=1, seed=0, cases_per_site=4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_synthetic_sites(tmp_path, n_sites=1, seed=0, cases_per_site=4)

    (tmp_path / "site-1" / "stale.txt").write_text("left from an earlier run")
    write_synthetic_sites(tmp_path, n_sites=1, seed=0, cases_per_site=4, overwrite=True)
    assert not (tmp_path / "site-1" / "stale.txt").exists()
    assert len(list((tmp_path / "site-1" / "images").glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_sites": 0}, "n_sites=0"),
        ({"seed": -1}, "seed=-1"),
        ({"image_size": 16}, "image_size=16"),
        ({"cases_per_site": 3}, "cases_per_site=3"),
    ],
)
def test_write_rejects_arguments(tmp_path: Path, arguments: dict[str, int], message: str) -> None:
    options = {"n_sites": 1, "seed": 0} | arguments
    with pytest.raises(ValueError, match=message):
        write_synthetic_sites(tmp_path, **options)
    assert not any(tmp_path.iterdir())


def test_sites_pass_site_check(federation: list[Path]) -> None:
    # The site loader must accept every declared expert, for example boundary-shift >= 1 for block experts.
    from common.site import check_site

    for site in federation:
        assert check_site(site) == []
