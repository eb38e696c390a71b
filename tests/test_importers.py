"""Tests for the DRIVE, CHASE_DB1 and generic importers, on tiny fixtures and on the real datasets."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.site_cmd import add_site_parser
from common.imageio import read_array
from common.importers import import_chase_db1, import_drive, import_generic, split_by_fractions
from common.site import SiteError, check_site, load_site_spec, load_split

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE = 32


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def _vessels(seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).random((SIZE, SIZE)) < 0.2


def _field_of_view() -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    return (rows - SIZE / 2) ** 2 + (cols - SIZE / 2) ** 2 <= (SIZE / 2) ** 2


def _save_gray(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _save_palette_gif(path: Path, mask: np.ndarray) -> None:
    """Save a mask as DRIVE's second observer does: a palette GIF with indices 0/1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    image.save(path)


def _build_drive(src: Path) -> Path:
    for number in range(1, 41):
        case_id = f"{number:02d}"
        part, kind = ("test", "test") if number <= 20 else ("training", "training")
        (src / part / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(number)).save(src / part / "images" / f"{case_id}_{kind}.tif", compression="tiff_lzw")
        _save_gray(src / part / "1st_manual" / f"{case_id}_manual1.gif", _vessels(number))
        _save_gray(src / part / "mask" / f"{case_id}_{kind}_mask.gif", _field_of_view())
        if part == "test":
            _save_palette_gif(src / part / "2nd_manual" / f"{case_id}_manual2.gif", _vessels(number + 100))
    return src


def _build_chase(src: Path, *, with_fov: bool = True) -> Path:
    src.mkdir(parents=True)
    for child in range(1, 15):
        for eye in ("L", "R"):
            name = f"Image_{child:02d}{eye}"
            seed = child * 2 + (eye == "R")
            Image.fromarray(_rgb(seed)).save(src / f"{name}.jpg")
            Image.fromarray(_vessels(seed)).convert("1").save(src / f"{name}_1stHO.png")
            Image.fromarray(_vessels(seed + 50)).convert("1").save(src / f"{name}_2ndHO.png")
            if with_fov:
                _save_gray(src / "fov_masks_unofficial" / f"{name}.png", _field_of_view())
    return src


def test_drive_fixture(tmp_path: Path) -> None:
    site = import_drive(_build_drive(tmp_path / "DRIVE"), tmp_path / "site")
    spec = load_site_spec(site)

    assert spec.site_id == "drive"
    assert spec.in_channels == 3
    assert spec.splits["train"] == [f"{n:02d}" for n in [*range(21, 41), *range(1, 8)]]
    assert spec.splits["calibration"] == ["08", "09", "10", "11"]
    assert spec.splits["validation"] == ["12", "13"]
    assert spec.splits["test"] == ["14", "15", "16", "17", "18", "19", "20"]
    experts = [(expert.id, expert.capacity, expert.simulated) for expert in spec.experts]
    assert experts == [("observer-2", 0.05, False), ("sim-pixel", 0.05, True)]
    sim = spec.experts[1]
    assert sim.seed == 1
    assert sim.params["foreground-accuracy"] == 0.95
    assert sim.params["boundary-accuracy"] == 0.97
    assert sim.params["background-accuracy"] == 0.99

    # Byte-for-byte copies with case-id names and the original formats.
    src_gif = tmp_path / "DRIVE" / "test" / "2nd_manual" / "14_manual2.gif"
    assert (site / "experts" / "observer-2" / "14.gif").read_bytes() == src_gif.read_bytes()
    assert (site / "images" / "21.tif").is_file()
    observer_files = sorted(path.name for path in (site / "experts" / "observer-2").iterdir())
    assert observer_files == [f"{n:02d}.gif" for n in range(1, 21)]

    gif = read_array(site / "experts" / "observer-2" / "14.gif")
    assert set(np.unique(gif)) == {0, 1}

    case = load_split(spec, "test")[0]
    assert case.case_id == "14"
    np.testing.assert_array_equal(case.roi, _field_of_view())
    np.testing.assert_array_equal(case.reference, _vessels(14).astype(np.uint8))
    np.testing.assert_array_equal(case.expert_masks[0], _vessels(114).astype(np.uint8))
    np.testing.assert_array_equal(case.expert_available, [True, True])

    train_case = load_split(spec, "train")[0]
    np.testing.assert_array_equal(train_case.expert_available, [False, True])


def test_drive_missing_file(tmp_path: Path) -> None:
    src = _build_drive(tmp_path / "DRIVE")
    (src / "test" / "2nd_manual" / "05_manual2.gif").unlink()
    with pytest.raises(FileNotFoundError, match="05_manual2.gif"):
        import_drive(src, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_drive_refuses_nonempty(tmp_path: Path) -> None:
    src = _build_drive(tmp_path / "DRIVE")
    dst = tmp_path / "site"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        import_drive(src, dst)

    import_drive(src, dst, overwrite=True, site_id="drive-2")
    assert (dst / "keep.txt").read_text() == "x"
    assert load_site_spec(dst).site_id == "drive-2"


def test_chase_fixture(tmp_path: Path) -> None:
    site = import_chase_db1(_build_chase(tmp_path / "CHASE"), tmp_path / "site")
    spec = load_site_spec(site)

    assert spec.site_id == "chase_db1"
    assert spec.splits["train"] == [f"Image_{c:02d}{e}" for c in range(1, 9) for e in "LR"]
    assert spec.splits["calibration"] == ["Image_09L", "Image_09R"]
    assert spec.splits["validation"] == ["Image_10L", "Image_10R"]
    assert spec.splits["test"] == [f"Image_{c:02d}{e}" for c in range(11, 15) for e in "LR"]
    assert [expert.id for expert in spec.experts] == ["observer-2", "sim-pixel"]

    case = load_split(spec, "validation")[1]
    assert case.case_id == "Image_10R"
    np.testing.assert_array_equal(case.reference, _vessels(21).astype(np.uint8))
    np.testing.assert_array_equal(case.expert_masks[0], _vessels(71).astype(np.uint8))
    np.testing.assert_array_equal(case.roi, _field_of_view())


def test_chase_without_fov(tmp_path: Path) -> None:
    site = import_chase_db1(_build_chase(tmp_path / "CHASE", with_fov=False), tmp_path / "site")
    assert not (site / "roi").exists()
    assert load_split(load_site_spec(site), "validation")[0].roi.all()


def _build_generic(src: Path) -> None:
    """Images `scan_<id>.png`, inverted masks `scan_<id>_seg.png` (foreground 0), one expert."""
    src.mkdir(parents=True)
    for number in range(10):
        gray = np.random.default_rng(number).integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8)
        Image.fromarray(gray).save(src / f"scan_{number:02d}.png")
        _save_gray(src / f"scan_{number:02d}_seg.png", ~_vessels(number))
        if number % 2 == 0:
            _save_gray(src / "rater" / f"scan_{number:02d}_r.png", ~_vessels(number + 7))


def test_generic_pattern_inverted(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _build_generic(src)
    site = import_generic(
        tmp_path / "site",
        images=str(src / "scan_??.png"),
        reference=str(src / "*_seg.png"),
        experts={"rater": str(src / "rater" / "*.png")},
        case_pattern=r"scan_(?P<case>\d+)(_seg|_r)?",
        invert_masks=True,
        site_id="generic",
        seed=3,
    )
    spec = load_site_spec(site)
    assert spec.mask_foreground == "zero"
    assert spec.in_channels == 1
    assert sorted(path.name for path in (site / "images").iterdir()) == [f"{n:02d}.png" for n in range(10)]

    counts = {name: len(ids) for name, ids in spec.splits.items()}
    assert counts == {"train": 6, "calibration": 1, "validation": 1, "test": 2}
    assert sorted(sum(spec.splits.values(), [])) == [f"{n:02d}" for n in range(10)]

    case_id = spec.splits["test"][0]
    case = next(case for case in load_split(spec, "test") if case.case_id == case_id)
    np.testing.assert_array_equal(case.reference, _vessels(int(case_id)).astype(np.uint8))
    assert case.expert_available[0] == (int(case_id) % 2 == 0)


def test_generic_given_splits(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _build_generic(src)
    splits = {"train": ["00", "01", "02"], "test": ["03"]}
    site = import_generic(
        tmp_path / "site",
        images=str(src / "scan_??.png"),
        reference=str(src / "*_seg.png"),
        case_pattern=r"scan_(?P<case>\d+)(_seg)?",
        site_id="given",
        splits=splits,
        capacity=0.2,
    )
    spec = load_site_spec(site)
    assert spec.splits == {"train": ["00", "01", "02"], "calibration": [], "validation": [], "test": ["03"]}
    assert spec.mask_foreground == "nonzero"


def test_generic_pattern_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _build_generic(src)
    with pytest.raises(ValueError, match="'scan_00_seg.png' does not fit the case pattern"):
        import_generic(
            tmp_path / "site",
            images=str(src / "scan_??.png"),
            reference=str(src / "*_seg.png"),
            case_pattern=r"scan_(?P<case>\d+)",
            site_id="x",
        )


def test_generic_no_match(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matches no supported image file"):
        import_generic(tmp_path / "site", images=str(tmp_path / "*.png"), reference=None, site_id="x")


def test_generic_check_failure(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _build_generic(src)
    with pytest.raises(SiteError, match="has no reference mask"):
        import_generic(tmp_path / "site", images=str(src / "scan_??.png"), reference=None, site_id="x")


def test_split_fractions_rounding() -> None:
    groups = [[f"{n}"] for n in range(3)]
    splits = split_by_fractions(groups, (0.25, 0.25, 0.25, 0.25), seed=0)
    assert len(splits["train"]) >= 1
    assert len(splits["test"]) == 1
    assert sorted(sum(splits.values(), [])) == ["0", "1", "2"]
    assert splits == split_by_fractions(groups, (0.25, 0.25, 0.25, 0.25), seed=0)
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_fractions(groups, (0.5, 0.5, 0.5, 0.0), seed=0)


def test_split_keeps_volume_slices(tmp_path: Path) -> None:
    groups = [["v_000", "v_001"], ["w_000", "w_001"], ["x_000"], ["y_000"]]
    splits = split_by_fractions(groups, (0.5, 0.0, 0.0, 0.5), seed=1)
    for ids in splits.values():
        assert ("v_000" in ids) == ("v_001" in ids)
        assert ("w_000" in ids) == ("w_001" in ids)
    assert sum(len(ids) for ids in splits.values()) == 6


def test_cli_import_generic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "raw"
    _build_generic(src)
    parser = argparse.ArgumentParser()
    add_site_parser(parser.add_subparsers(dest="command"))
    argv = [
        "site", "import", "generic", str(tmp_path / "site"),
        "--images", str(src / "scan_??.png"), "--reference", str(src / "*_seg.png"),
        "--expert", f"rater={src / 'rater' / '*.png'}", "--case-pattern", r"scan_(?P<case>\d+)(_seg|_r)?",
        "--invert-masks", "--capacity", "0.1",
    ]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    toml = tomllib.loads((tmp_path / "site" / "site.toml").read_text())
    assert toml["site-id"] == "site"
    assert toml["experts"] == [{"id": "rater", "capacity": 0.1, "folder": "experts/rater"}]

    args = parser.parse_args(argv)
    assert args.func(args) == 1
    assert "not empty" in capsys.readouterr().err


def test_cli_import_bad_expert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_site_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["site", "import", "generic", str(tmp_path), "--images", "*.png", "--expert", "rater"])
    assert args.func(args) == 2
    assert "--expert 'rater' is invalid" in capsys.readouterr().err


@pytest.mark.realdata
def test_real_drive(tmp_path: Path) -> None:
    src = DATA_DIR / "DRIVE"
    if not src.is_dir():
        pytest.skip(f"DRIVE not found at {src}")
    site = import_drive(src, tmp_path / "drive")
    assert check_site(site) == []

    spec = load_site_spec(site)
    assert [len(spec.splits[name]) for name in ("train", "calibration", "validation", "test")] == [27, 4, 2, 7]
    case = load_split(spec, "validation")[0]
    assert case.image.shape == (3, 584, 565)
    assert case.reference.shape == (584, 565)
    assert case.expert_masks.shape == (2, 584, 565)
    np.testing.assert_array_equal(case.expert_available, [True, True])
    assert set(np.unique(case.expert_masks[0])) == {0, 1}
    assert 0.5 < case.roi.mean() < 0.8  # the circular field of view


@pytest.mark.realdata
def test_real_chase(tmp_path: Path) -> None:
    src = DATA_DIR / "CHASE_DB1"
    if not src.is_dir():
        pytest.skip(f"CHASE_DB1 not found at {src}")
    site = import_chase_db1(src, tmp_path / "chase")
    assert check_site(site) == []

    spec = load_site_spec(site)
    assert [len(spec.splits[name]) for name in ("train", "calibration", "validation", "test")] == [16, 2, 2, 8]
    case = load_split(spec, "calibration")[0]
    assert case.image.shape == (3, 960, 999)
    assert case.reference.shape == (960, 999)
    assert case.expert_masks.shape == (2, 960, 999)
    assert 0 < case.reference.mean() < 0.2
