"""Overlay PNGs: expert colours, the coloured deferral map and the four-panel figure."""

import numpy as np
import pytest
from PIL import Image

from client.overlays import OverlayStyle, colour_deferral_map, display_image, expert_colours, write_overlay

EXPERT_IDS = ["dr-a", "dr-b", "dr-c"]


def owner_map() -> np.ndarray:
    owner = np.full((6, 8), -1, dtype=np.int64)
    owner[0, :3] = 0
    owner[2:4, 5] = 2
    owner[5, 7] = 1
    return owner


def read_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_colours_distinct():
    colours = expert_colours(21)

    assert colours.shape == (21, 3)
    assert colours.dtype == np.uint8
    assert len({tuple(c) for c in colours[:20]}) == 20
    np.testing.assert_array_equal(colours[20], colours[0])
    # The colour of an expert index does not depend on how many experts follow it.
    np.testing.assert_array_equal(expert_colours(3), colours[:3])


def test_colour_map_exact():
    owner = owner_map()
    colours = expert_colours(3)

    rgb = colour_deferral_map(owner, 3)

    expected = np.zeros((6, 8, 3), dtype=np.uint8)
    expected[0, :3] = colours[0]
    expected[2:4, 5] = colours[2]
    expected[5, 7] = colours[1]
    np.testing.assert_array_equal(rgb, expected)


def test_colour_map_background():
    owner = owner_map()
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)

    rgb = colour_deferral_map(owner, 3, background=grey)

    model = owner == -1
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel][model], grey[model])
    np.testing.assert_array_equal(rgb[5, 7], expert_colours(3)[1])


def test_colour_map_invalid_owner():
    with pytest.raises(ValueError, match="expert indices 0..1"):
        colour_deferral_map(np.full((2, 2), 2), 2)


def test_display_image_range():
    image = np.stack([np.linspace(-3, 3, 100).reshape(10, 10)] * 2)

    grey = display_image(image, percentiles=(0.0, 100.0))

    assert grey.shape == (10, 10)
    assert grey[0, 0] == 0
    assert grey[-1, -1] == 255


def test_display_image_rgb():
    image = np.random.default_rng(0).normal(size=(3, 5, 7))

    assert display_image(image).shape == (5, 7, 3)


def test_overlay_panels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 6, 8)).astype(np.float32)
    path = tmp_path / "sub" / "case.png"

    write_overlay(path, image, rng.integers(0, 2, (6, 8)), rng.random((6, 8)) > 0.5, owner_map(), EXPERT_IDS)

    width, height = Image.open(path).size
    style = OverlayStyle()
    assert width == round(4 * style.panel_inches * style.dpi)
    assert height == round((style.panel_inches + style.legend_inches) * style.dpi)
    assert 3 < width / height < 4


def test_overlay_deferral_panel_only(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 6, 8)).astype(np.float32)
    reference = rng.integers(0, 2, (6, 8))
    model_pred = rng.random((6, 8)) > 0.5
    plain, deferred = tmp_path / "plain.png", tmp_path / "deferred.png"

    write_overlay(plain, image, reference, model_pred, np.full((6, 8), -1), EXPERT_IDS)
    write_overlay(deferred, image, reference, model_pred, owner_map(), EXPERT_IDS)

    changed = np.any(read_rgb(plain) != read_rgb(deferred), axis=2)
    columns = np.flatnonzero(changed.any(axis=0))
    width = changed.shape[1]
    assert columns.size > 0
    # Only the fourth panel (the right quarter) shows the deferral.
    assert columns.min() >= 3 * width // 4
    colours = {tuple(c) for c in read_rgb(deferred)[changed]}
    for colour in expert_colours(3):
        assert tuple(int(v) for v in colour) in colours


def test_overlay_without_reference(tmp_path):
    image = np.zeros((3, 6, 8), dtype=np.float32)
    path = tmp_path / "new.png"

    write_overlay(path, image, None, np.zeros((6, 8), bool), owner_map(), EXPERT_IDS)

    assert path.is_file()


def test_overlay_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="owner has shape"):
        write_overlay(
            tmp_path / "x.png", np.zeros((1, 6, 8)), None, np.zeros((6, 8), bool), np.full((5, 8), -1), EXPERT_IDS
        )
