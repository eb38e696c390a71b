"""Tests for expert declarations and simulated expert masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from common.experts import ExpertSpec, ExpertSpecError, disk, parse_expert, simulate_expert_mask

SIZE = 400


def _disk_reference() -> np.ndarray:
    """A 400x400 reference with a large disc and thin lines, so every region has many pixels."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    reference = ((rows - 200) ** 2 + (cols - 200) ** 2 <= 100**2).astype(np.uint8)
    reference[20:380:40, :] = 1
    return reference


def _pixel_expert(seed: int = 3, **params: float) -> ExpertSpec:
    table = {"id": "sim", "capacity": 0.05, "profile": "pixel", "seed": seed, **params}
    return parse_expert(table, "test")


def test_parse_real_expert() -> None:
    expert = parse_expert({"id": "observer-2", "capacity": 0.05, "folder": "experts/observer-2"}, "site.toml")
    assert expert == ExpertSpec(id="observer-2", capacity=0.05, folder="experts/observer-2")
    assert not expert.simulated


def test_parse_pixel_defaults() -> None:
    expert = parse_expert({"id": "sim", "capacity": 0.1, "profile": "pixel"}, "site.toml")
    assert expert.simulated
    assert expert.seed == 0
    assert dict(expert.params) == {
        "foreground-accuracy": 0.95,
        "boundary-accuracy": 0.97,
        "background-accuracy": 0.99,
        "boundary-width": 2,
    }


def test_parse_block_defaults() -> None:
    expert = parse_expert({"id": "b", "capacity": 0.03, "profile": "block", "seed": 12, "block-size": 16}, "x")
    assert dict(expert.params) == {"block-size": 16, "block-error-rate": 0.15, "boundary-shift": 2}
    assert expert.seed == 12


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"id": "a", "capacity": 1.5, "folder": "f"}, "capacity 1.5"),
        ({"id": "a", "capacity": 0, "folder": "f"}, "capacity 0"),
        ({"id": "a", "folder": "f"}, "capacity is missing"),
        ({"id": "a", "capacity": 0.1}, "exactly one of 'folder'"),
        ({"id": "a", "capacity": 0.1, "folder": "f", "profile": "pixel"}, "exactly one of 'folder'"),
        ({"id": "a", "capacity": 0.1, "profile": "gaussian"}, "profile 'gaussian' is unknown"),
        ({"id": "a b", "capacity": 0.1, "folder": "f"}, "id 'a b'"),
        ({"id": "a", "capacity": 0.1, "profile": "pixel", "foreground-accuracy": 1.2}, "foreground-accuracy 1.2"),
        ({"id": "a", "capacity": 0.1, "profile": "block", "block-size": 2.5}, "block-size 2.5"),
        ({"id": "a", "capacity": 0.1, "profile": "pixel", "seed": -1}, "seed -1"),
        ({"id": "a", "capacity": 0.1, "profile": "pixel", "block-size": 8}, "unknown keys ['block-size']"),
        ({"id": "a", "capacity": True, "folder": "f"}, "capacity True"),
    ],
)
def test_parse_expert_invalid(table: dict[str, object], expected: str) -> None:
    with pytest.raises(ExpertSpecError) as error:
        parse_expert(table, "site.toml expert 'a'")
    message = str(error.value)
    assert message.startswith("site.toml expert 'a': ")
    assert expected in message
    assert "Fix: " in message


def test_parse_expert_lists_all_problems() -> None:
    with pytest.raises(ExpertSpecError) as error:
        parse_expert({"id": "a", "capacity": 2.0, "profile": "nope", "seed": "x"}, "s")
    assert len(error.value.problems) == 3


def test_pixel_deterministic() -> None:
    reference = _disk_reference()
    roi = np.ones_like(reference, dtype=bool)
    first = simulate_expert_mask(reference, roi, _pixel_expert(seed=3), "case-1")
    second = simulate_expert_mask(reference, roi, _pixel_expert(seed=3), "case-1")
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.uint8
    assert set(np.unique(first)) <= {0, 1}


def test_pixel_seed_and_case_change_mask() -> None:
    reference = _disk_reference()
    roi = np.ones_like(reference, dtype=bool)
    base = simulate_expert_mask(reference, roi, _pixel_expert(seed=3), "case-1")
    other_seed = simulate_expert_mask(reference, roi, _pixel_expert(seed=4), "case-1")
    other_case = simulate_expert_mask(reference, roi, _pixel_expert(seed=3), "case-2")
    assert (base != other_seed).sum() > 100
    assert (base != other_case).sum() > 100


def test_pixel_error_rates() -> None:
    reference = _disk_reference()
    roi = np.ones_like(reference, dtype=bool)
    accuracies = {
        "foreground-accuracy": 0.9,
        "boundary-accuracy": 0.8,
        "background-accuracy": 0.97,
        "boundary-width": 3,
    }
    mask = simulate_expert_mask(reference, roi, _pixel_expert(seed=5, **accuracies), "c")

    # An independent band: background pixels within Euclidean distance 3 of the foreground.
    foreground = reference.astype(bool)
    distance = ndimage.distance_transform_edt(~foreground)
    band = (distance > 0) & (distance <= 3)
    regions = {
        "foreground-accuracy": foreground,
        "boundary-accuracy": band,
        "background-accuracy": ~foreground & ~band,
    }
    for name, region in regions.items():
        correct = (mask[region] == reference[region]).mean()
        expected = accuracies[name]
        binomial_std = np.sqrt(expected * (1 - expected) / region.sum())
        assert abs(correct - expected) < 5 * binomial_std, name


def test_pixel_copies_reference_outside_roi() -> None:
    reference = _disk_reference()
    roi = np.zeros_like(reference, dtype=bool)
    roi[100:300, 100:300] = True
    mask = simulate_expert_mask(reference, roi, _pixel_expert(), "c")
    np.testing.assert_array_equal(mask[~roi], reference[~roi])
    assert (mask[roi] != reference[roi]).sum() > 0


def test_block_errors_confined_to_blocks() -> None:
    reference = _disk_reference()
    roi = np.ones_like(reference, dtype=bool)
    expert = parse_expert(
        {
            "id": "blk",
            "capacity": 0.03,
            "profile": "block",
            "seed": 12,
            "block-size": 40,
            "block-error-rate": 0.3,
            "boundary-shift": 3,
        },
        "test",
    )
    mask = simulate_expert_mask(reference, roi, expert, "c").astype(bool)
    foreground = reference.astype(bool)
    dilated = ndimage.binary_dilation(foreground, structure=disk(3))
    eroded = ndimage.binary_erosion(foreground, structure=disk(3), border_value=1)

    wrong_blocks = 0
    for top in range(0, SIZE, 40):
        for left in range(0, SIZE, 40):
            block = np.s_[top : top + 40, left : left + 40]
            if np.array_equal(mask[block], foreground[block]):
                continue
            # A changed block must equal the whole-image dilation or erosion inside that block.
            assert np.array_equal(mask[block], dilated[block]) or np.array_equal(mask[block], eroded[block])
            wrong_blocks += 1

    # Every block holds foreground (a line crosses each row of blocks), so about 100 * 0.3 blocks change;
    # the binomial standard deviation is 4.6.
    assert 16 <= wrong_blocks <= 44


def test_block_deterministic() -> None:
    reference = _disk_reference()
    roi = np.ones_like(reference, dtype=bool)
    expert = parse_expert({"id": "blk", "capacity": 0.03, "profile": "block", "seed": 1, "block-size": 32}, "t")
    np.testing.assert_array_equal(
        simulate_expert_mask(reference, roi, expert, "c"), simulate_expert_mask(reference, roi, expert, "c")
    )


def test_simulate_rejects_real_expert() -> None:
    reference = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="expert 'obs'"):
        simulate_expert_mask(reference, reference.astype(bool), ExpertSpec("obs", 0.1, folder="f"), "c")


def test_simulate_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        simulate_expert_mask(np.zeros((4, 4)), np.ones((4, 5), dtype=bool), _pixel_expert(), "c")
