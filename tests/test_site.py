"""Tests for site.toml parsing, case loading and the site check."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cli.site_cmd import add_site_parser, run_check
from common.experts import ExpertSpec, parse_expert, simulate_expert_mask
from common.imageio import write_png
from common.site import (
    SPLITS,
    Case,
    SiteError,
    SiteProblem,
    check_site,
    list_case_ids,
    load_site_spec,
    load_split,
)

HEIGHT, WIDTH = 16, 20
CASES = ("a1", "a2", "b1", "b2")

BASE_TOML = """
site-id = "test-site"
in-channels = 3
description = "unit test site"

[splits]
train = ["a1", "a2"]
calibration = ["b1"]
test = ["b2"]

[[experts]]
id = "obs"
capacity = 0.05
folder = "experts/obs"

[[experts]]
id = "sim"
capacity = 0.1
profile = "pixel"
seed = 4
"""


def _image(seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (HEIGHT, WIDTH) if channels == 1 else (HEIGHT, WIDTH, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _mask(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).random((HEIGHT, WIDTH)) < 0.3


def _build_site(root: Path, toml: str = BASE_TOML, *, with_roi: bool = True) -> Path:
    """Write a 4-case RGB site with reference, ROI and one real expert 'obs' covering a1 and b2."""
    for seed, case_id in enumerate(CASES):
        write_png(root / "images" / f"{case_id}.png", _image(seed))
        write_png(root / "reference" / f"{case_id}.png", _mask(seed))
        if with_roi:
            roi = np.zeros((HEIGHT, WIDTH), dtype=bool)
            roi[2:14, 3:17] = True
            write_png(root / "roi" / f"{case_id}.png", roi)
    write_png(root / "experts" / "obs" / "a1.png", _mask(10))
    write_png(root / "experts" / "obs" / "b2.png", _mask(11))
    (root / "site.toml").write_text(toml)
    return root


def test_load_spec(tmp_path: Path) -> None:
    spec = load_site_spec(_build_site(tmp_path))
    assert spec.site_id == "test-site"
    assert spec.in_channels == 3
    assert spec.mask_foreground == "nonzero"
    assert spec.slice_axis == 2
    assert spec.description == "unit test site"
    assert spec.splits == {"train": ["a1", "a2"], "calibration": ["b1"], "validation": [], "test": ["b2"]}
    assert [expert.id for expert in spec.experts] == ["obs", "sim"]
    assert spec.experts[1].params["foreground-accuracy"] == 0.95
    assert list_case_ids(spec) == sorted(CASES)


def test_load_split_case(tmp_path: Path) -> None:
    spec = load_site_spec(_build_site(tmp_path))
    cases = load_split(spec, "train")
    assert [case.case_id for case in cases] == ["a1", "a2"]

    case = cases[0]
    assert isinstance(case, Case)
    assert case.image.shape == (3, HEIGHT, WIDTH)
    assert case.image.dtype == np.float32
    assert case.reference.dtype == np.uint8
    np.testing.assert_array_equal(case.reference, _mask(0).astype(np.uint8))
    assert case.roi.dtype == bool
    assert case.roi.sum() == 12 * 14

    # Zero mean and unit variance per channel over the ROI, computed by hand from the raw pixels.
    raw = _image(0).astype(np.float64)
    expected = (raw[..., 1] - raw[2:14, 3:17, 1].mean()) / raw[2:14, 3:17, 1].std()
    np.testing.assert_allclose(case.image[1], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(case.image[:, case.roi].mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(case.image[:, case.roi].std(axis=1), 1.0, atol=1e-5)


def test_load_split_experts(tmp_path: Path) -> None:
    spec = load_site_spec(_build_site(tmp_path))
    first, second = load_split(spec, "train")

    assert first.expert_masks.shape == (2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(first.expert_available, [True, True])
    np.testing.assert_array_equal(first.expert_masks[0], _mask(10).astype(np.uint8))
    expected_sim = simulate_expert_mask(first.reference, first.roi, spec.experts[1], "a1")
    np.testing.assert_array_equal(first.expert_masks[1], expected_sim)

    # 'obs' has no mask for a2: zeros and unavailable.
    np.testing.assert_array_equal(second.expert_available, [False, True])
    assert second.expert_masks[0].sum() == 0


def test_load_split_extra_experts(tmp_path: Path) -> None:
    spec = load_site_spec(_build_site(tmp_path))
    extra = parse_expert({"id": "blk", "capacity": 0.2, "profile": "block", "seed": 2, "block-size": 4}, "federation")
    cases = load_split(spec, "test", [*spec.experts, extra])
    assert cases[0].expert_masks.shape == (3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(cases[0].expert_available, [True, True, True])


def test_load_split_empty_and_unknown(tmp_path: Path) -> None:
    spec = load_site_spec(_build_site(tmp_path))
    assert load_split(spec, "validation") == []
    with pytest.raises(SiteError, match="split 'holdout' is unknown"):
        load_split(spec, "holdout")


def test_roi_absent_all_true(tmp_path: Path) -> None:
    spec = load_site_spec(_build_site(tmp_path, with_roi=False))
    case = load_split(spec, "test")[0]
    assert case.roi.all()
    np.testing.assert_allclose(case.image.reshape(3, -1).mean(axis=1), 0.0, atol=1e-5)


def test_check_clean_site(tmp_path: Path) -> None:
    assert check_site(_build_site(tmp_path)) == []


def test_check_lists_four_problems(tmp_path: Path) -> None:
    root = _build_site(tmp_path, BASE_TOML.replace("capacity = 0.05", "capacity = 1.5"))
    (root / "images" / "a2.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    write_png(root / "reference" / "b1.png", np.zeros((HEIGHT + 2, WIDTH), dtype=bool))
    (root / "reference" / "b2.png").unlink()

    problems = check_site(root)
    assert all(isinstance(problem, SiteProblem) for problem in problems)
    by_path = {problem.path: problem for problem in problems}

    assert "capacity 1.5" in by_path[str(root / "site.toml")].message
    assert "unreadable image" in by_path[str(root / "images" / "a2.png")].message
    assert "mask size 18x20 differs from the image size 16x20" in by_path[str(root / "reference" / "b1.png")].message
    assert "case 'b2' has no reference mask" in by_path[str(root / "reference" / "b2.*")].message
    assert len(problems) == 4
    assert all(problem.fix for problem in problems)


def test_check_more_problems(tmp_path: Path) -> None:
    toml = BASE_TOML.replace('test = ["b2"]', 'test = ["b2", "a1", "zz"]')
    root = _build_site(tmp_path, toml + '\n[[experts]]\nid = "gone"\ncapacity = 0.1\nfolder = "experts/gone"\n')
    (root / "images" / "notes.txt").write_text("x")
    write_png(root / "reference" / "orphan.png", _mask(0))
    write_png(root / "images" / "a1.tif", _image(0))

    messages = [str(problem) for problem in check_site(root)]
    expected = [
        "case 'a1' is in both splits.train and splits.test",
        "case 'zz' in splits.test has no image",
        "folder of real expert 'gone' not found",
        "unsupported file type '.txt'",
        "mask of case 'orphan' has no image",
        "case 'a1' has several files (a1.png, a1.tif)",
    ]
    for text in expected:
        assert any(text in message for message in messages), text


def test_check_site_toml_keys(tmp_path: Path) -> None:
    root = _build_site(
        tmp_path,
        'site-id = "bad id"\nin-channels = 0\nslice-axis = 5\ncolour = 1\n[splits]\ntrain = [1]\n',
    )
    messages = [problem.message for problem in check_site(root)]
    for text in (
        "site-id 'bad id'",
        "in-channels 0",
        "slice-axis 5",
        "unknown keys ['colour']",
        "splits.train is not a list of strings",
        "splits.test is missing or empty",
    ):
        assert any(text in message for message in messages), text


def test_check_missing_toml(tmp_path: Path) -> None:
    problems = check_site(tmp_path)
    assert len(problems) == 1
    assert problems[0].path == str(tmp_path / "site.toml")
    assert str(problems[0]) == f"{tmp_path / 'site.toml'}: site.toml not found. Fix: {problems[0].fix}"


def test_check_unused_expert_warning(tmp_path: Path) -> None:
    root = _build_site(tmp_path)
    for name in ("a1.png", "b2.png"):
        (root / "experts" / "obs" / name).rename(root / "experts" / "obs" / f"x{name}")
    write_png(root / "images" / "xa1.png", _image(0))
    write_png(root / "reference" / "xa1.png", _mask(0))
    write_png(root / "images" / "xb2.png", _image(1))
    write_png(root / "reference" / "xb2.png", _mask(1))
    messages = [problem.message for problem in check_site(root)]
    assert any("none of the 2 cases of expert 'obs' is in any split" in message for message in messages)


def test_majority_vote_reference(tmp_path: Path) -> None:
    votes = [
        np.array([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=bool),
        np.array([[1, 0, 1, 0], [1, 0, 0, 1]], dtype=bool),
        np.array([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool),
    ]
    image = np.zeros((2, 4), dtype=np.uint8)
    image[0, 0] = 9
    for case_id in ("c1", "c2"):
        write_png(tmp_path / "images" / f"{case_id}.png", image)
        for number, vote in enumerate(votes):
            write_png(tmp_path / "experts" / f"e{number}" / f"{case_id}.png", vote)
    experts = "".join(f'[[experts]]\nid = "e{n}"\ncapacity = 0.1\nfolder = "experts/e{n}"\n' for n in range(3))
    toml = f'site-id = "vote"\nin-channels = 1\n[splits]\ntrain = ["c1"]\ntest = ["c2"]\n{experts}'
    (tmp_path / "site.toml").write_text(toml)

    assert check_site(tmp_path) == []
    case = load_split(load_site_spec(tmp_path), "train")[0]
    np.testing.assert_array_equal(case.reference, [[1, 1, 1, 0], [1, 0, 0, 1]])
    assert case.image.shape == (1, 2, 4)
    np.testing.assert_array_equal(case.expert_available, [True, True, True])


def test_majority_vote_tie_background(tmp_path: Path) -> None:
    image = np.zeros((1, 4), dtype=np.uint8)
    write_png(tmp_path / "images" / "c.png", image)
    write_png(tmp_path / "images" / "d.png", image)
    masks = [[1, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    for number, mask in enumerate(masks):
        for case_id in ("c", "d"):
            write_png(tmp_path / "experts" / f"e{number}" / f"{case_id}.png", np.array([mask], dtype=bool))
    experts = "".join(f'[[experts]]\nid = "e{n}"\ncapacity = 0.1\nfolder = "experts/e{n}"\n' for n in range(4))
    toml = f'site-id = "tie"\nin-channels = 1\n[splits]\ntrain = ["c"]\ntest = ["d"]\n{experts}'
    (tmp_path / "site.toml").write_text(toml)

    case = load_split(load_site_spec(tmp_path), "train")[0]
    # Votes per pixel: 2, 2, 2, 2 of 4, all ties, so all background.
    np.testing.assert_array_equal(case.reference, [[0, 0, 0, 0]])


def test_inverted_masks(tmp_path: Path) -> None:
    root = _build_site(tmp_path, BASE_TOML.replace('description = "unit test site"', 'mask-foreground = "zero"'))
    spec = load_site_spec(root)
    case = load_split(spec, "train")[0]
    np.testing.assert_array_equal(case.reference, (~_mask(0)).astype(np.uint8))
    np.testing.assert_array_equal(case.expert_masks[0], (~_mask(10)).astype(np.uint8))
    assert case.roi.sum() == 12 * 14  # the ROI keeps nonzero = inside


def test_channel_mismatch_message(tmp_path: Path) -> None:
    root = _build_site(tmp_path)
    write_png(root / "images" / "a2.png", _image(1, channels=1))
    with pytest.raises(SiteError) as error:
        load_split(load_site_spec(root), "train")
    message = str(error.value)
    assert str(root / "images" / "a2.png") in message
    assert "image has 1 channel(s) but site.toml sets in-channels = 3" in message
    assert "Fix: convert the image to 3 channel(s)" in message
    assert len(error.value.problems) == 1


def test_load_split_reports_all(tmp_path: Path) -> None:
    root = _build_site(tmp_path)
    (root / "reference" / "a1.png").unlink()
    (root / "images" / "a2.png").write_bytes(b"broken")
    with pytest.raises(SiteError) as error:
        load_split(load_site_spec(root), "train")
    assert len(error.value.problems) == 2


def test_load_spec_raises_all(tmp_path: Path) -> None:
    root = _build_site(tmp_path, BASE_TOML.replace("capacity = 0.05", "capacity = 1.5").replace("in-channels = 3", ""))
    with pytest.raises(SiteError) as error:
        load_site_spec(root)
    assert len(error.value.problems) == 2
    assert "capacity 1.5" in str(error.value)


def test_nifti_volume_site(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 200, size=(8, 9, 3)).astype(np.int16)
    labels = (rng.random((8, 9, 3)) < 0.4).astype(np.uint8)
    for folder, data in (("images", volume), ("reference", labels)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "vol.nii.gz")
    (tmp_path / "site.toml").write_text(
        'site-id = "ct"\nin-channels = 1\n[splits]\ntrain = ["vol_000", "vol_001"]\ntest = ["vol_002"]\n'
    )

    assert check_site(tmp_path) == []
    spec = load_site_spec(tmp_path)
    assert list_case_ids(spec) == ["vol_000", "vol_001", "vol_002"]
    case = load_split(spec, "test")[0]
    assert case.image.shape == (1, 8, 9)
    np.testing.assert_array_equal(case.reference, labels[:, :, 2])


def test_cli_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _build_site(tmp_path)
    parser = argparse.ArgumentParser()
    add_site_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["site", "check", str(root)])
    assert args.func is run_check
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == f"site {root}: 4 cases, no problems"


def test_cli_check_empty_calibration_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _build_site(tmp_path, BASE_TOML.replace('calibration = ["b1"]', 'calibration = []\nvalidation = ["b1"]'))
    assert run_check(argparse.Namespace(dir=root)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"site {root}: 4 cases, no problems"
    assert lines[1].startswith("note: the calibration split is empty")


def test_cli_check_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _build_site(tmp_path, BASE_TOML.replace("capacity = 0.05", "capacity = 1.5"))
    (root / "reference" / "b2.png").unlink()
    assert run_check(argparse.Namespace(dir=root)) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{root / 'site.toml'}: expert 'obs': capacity 1.5")
    assert lines[1].startswith(f"{root / 'reference' / 'b2.*'}: case 'b2' has no reference mask")


def test_splits_constant() -> None:
    assert SPLITS == ("train", "calibration", "validation", "test")
    assert ExpertSpec("x", 0.1, folder="f").simulated is False


def test_cli_synth_sites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_site_parser(parser.add_subparsers(dest="command"))
    argv = ["site", "synth", str(tmp_path), "--sites", "2", "--seed", "0", "--image-size", "32", "--cases", "8"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0

    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(printed) == 2
    for site in printed:
        assert check_site(site) == []
        assert len(list_case_ids(load_site_spec(site))) == 8
