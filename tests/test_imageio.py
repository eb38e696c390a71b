"""Tests for the image and mask readers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from common.imageio import (
    SUPPORTED_SUFFIXES,
    ImageReadError,
    case_ids_in_file,
    file_case_id,
    read_array,
    read_image_slices,
    write_png,
)

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, size=(12, 10), dtype=np.uint8)
RGB = RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".ppm", ".tif"])
def test_read_rgb_lossless(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"case{suffix}"
    Image.fromarray(RGB).save(path)
    array = read_array(path)
    assert array.shape == (12, 10, 3)
    np.testing.assert_array_equal(array, RGB)


@pytest.mark.parametrize("suffix", [".png", ".pgm", ".bmp", ".tiff"])
def test_read_gray_lossless(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"case{suffix}"
    Image.fromarray(GRAY).save(path)
    array = read_array(path)
    assert array.shape == (12, 10)
    np.testing.assert_array_equal(array, GRAY)


def test_read_jpeg_close(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    rgb = np.stack([smooth, smooth.T, np.full_like(smooth, 128)], axis=-1)
    path = tmp_path / "case.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    array = read_array(path)
    assert array.shape == (32, 32, 3)
    assert np.abs(array.astype(int) - rgb).mean() < 3  # lossy, but close on a smooth image


def test_read_tifffile_rgb(tmp_path: Path) -> None:
    path = tmp_path / "case.tif"
    tifffile.imwrite(path, RGB, photometric="rgb")
    np.testing.assert_array_equal(read_array(path), RGB)


def test_read_tiff_planar_channels_last(tmp_path: Path) -> None:
    path = tmp_path / "case.tif"
    tifffile.imwrite(path, np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_array(path), RGB)


def test_read_tiff_lzw_via_pillow(tmp_path: Path) -> None:
    path = tmp_path / "case.tif"
    Image.fromarray(RGB).save(path, compression="tiff_lzw")
    np.testing.assert_array_equal(read_array(path), RGB)


def test_read_palette_gif_indices(tmp_path: Path) -> None:
    indices = (GRAY > 128).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    path = tmp_path / "01_manual2.gif"
    image.save(path)

    array = read_array(path)
    assert array.shape == (12, 10)
    assert set(np.unique(array)) == {0, 1}
    np.testing.assert_array_equal(array, indices)


def test_read_one_bit_png(tmp_path: Path) -> None:
    mask = GRAY > 100
    path = tmp_path / "mask.png"
    Image.fromarray(mask).convert("1").save(path)
    array = read_array(path)
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, mask.astype(np.uint8))


def test_read_npy(tmp_path: Path) -> None:
    data = RNG.normal(size=(8, 9, 2)).astype(np.float32)
    path = tmp_path / "case.npy"
    np.save(path, data)
    np.testing.assert_array_equal(read_array(path), data)


def test_read_npy_object_rejected(tmp_path: Path) -> None:
    path = tmp_path / "case.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageReadError, match="case.npy"):
        read_array(path)


def test_read_nifti_2d_squeezed(tmp_path: Path) -> None:
    data = GRAY.astype(np.int16)[:, :, None]
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    array = read_array(path)
    assert array.shape == (12, 10)
    np.testing.assert_array_equal(array, GRAY)

    slices = read_image_slices(path, slice_axis=2)
    assert len(slices) == 1
    assert slices[0][0] == "case"


def test_slices_nifti_volume(tmp_path: Path) -> None:
    volume = RNG.integers(0, 100, size=(6, 5, 4)).astype(np.int16)
    path = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)

    slices = read_image_slices(path, slice_axis=2)
    assert [case_id for case_id, _ in slices] == ["vol_000", "vol_001", "vol_002", "vol_003"]
    np.testing.assert_array_equal(slices[3][1], volume[:, :, 3])

    along_first = read_image_slices(path, slice_axis=0)
    assert len(along_first) == 6
    np.testing.assert_array_equal(along_first[2][1], volume[2])
    assert case_ids_in_file(path, slice_axis=1) == [f"vol_{index:03d}" for index in range(5)]


def test_slices_2d_file_one_case(tmp_path: Path) -> None:
    path = tmp_path / "21.png"
    Image.fromarray(GRAY).save(path)
    slices = read_image_slices(path, slice_axis=2)
    assert len(slices) == 1
    assert slices[0][0] == "21"
    assert case_ids_in_file(path, 2) == ["21"]


def test_slice_axis_invalid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slice_axis 3"):
        read_image_slices(tmp_path / "x.png", slice_axis=3)


def test_file_case_id_double_suffix() -> None:
    assert file_case_id(Path("a/b.c.nii.gz")) == "b.c"
    assert file_case_id(Path("01.TIF")) == "01"


def test_corrupt_png_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageReadError) as error:
        read_array(path)
    assert error.value.path == path
    assert "broken.png" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("x")
    with pytest.raises(ImageReadError, match="unsupported extension '.txt'"):
        read_array(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        read_array(tmp_path / "absent.png")


def test_write_png_roundtrip(tmp_path: Path) -> None:
    write_png(tmp_path / "sub" / "rgb.png", RGB)
    np.testing.assert_array_equal(read_array(tmp_path / "sub" / "rgb.png"), RGB)

    mask = GRAY > 128
    write_png(tmp_path / "mask.png", mask)
    np.testing.assert_array_equal(read_array(tmp_path / "mask.png"), mask.astype(np.uint8) * 255)


def test_write_png_rejects_float(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype float64"):
        write_png(tmp_path / "x.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="outside 0..255"):
        write_png(tmp_path / "x.png", np.full((4, 4), 300, dtype=np.int32))


def test_supported_suffixes_listed() -> None:
    for suffix in (".png", ".jpg", ".tif", ".gif", ".ppm", ".pgm", ".bmp", ".npy", ".nii", ".nii.gz"):
        assert suffix in SUPPORTED_SUFFIXES
