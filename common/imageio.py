"""Readers and a PNG writer for the image and mask files of a site folder."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".gif",
    ".ppm",
    ".pgm",
    ".bmp",
    ".npy",
    ".nii",
    ".nii.gz",
)

_PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".ppm", ".pgm", ".bmp"})
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})

_CONVERT_HINT = "convert it to PNG, TIFF, NPY or NIfTI with an image tool, or replace it with an intact copy"


class ImageReadError(ValueError):
    """Error for a file that cannot be read as an image or mask. The message names the file and a fix."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read {path}: {reason}")


def image_suffix(path: Path) -> str:
    """Return the lower-case image extension of `path`, counting `.nii.gz` as one extension."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def file_case_id(path: Path) -> str:
    """Return the case id of a file: its name without the image extension (`a.nii.gz` -> `a`)."""
    name = Path(path).name
    return name[: len(name) - len(image_suffix(path))]


def is_supported(path: Path) -> bool:
    """Return whether the file extension is one of `SUPPORTED_SUFFIXES`."""
    return image_suffix(path) in SUPPORTED_SUFFIXES


def read_array(path: Path) -> np.ndarray:
    """Read one image or mask file into a numpy array.

    2D raster formats return `HW` (grayscale, palette indices, 1-bit) or `HWC` (RGB, RGBA, multichannel
    TIFF). Palette images (for example DRIVE's second-observer GIFs) keep their palette indices and are
    never converted to RGB. 1-bit images return uint8 0/1. NPY files are loaded with
    `allow_pickle=False`. NIfTI files return the stored voxel array in its stored axis order and dtype,
    with singleton dimensions removed, so a 2D image stored as `(X, Y, 1)` comes back 2D.

    Raises:
        ImageReadError: the file is missing, has an unsupported extension, is corrupt or has an
            unsupported number of dimensions. The message names the file and the fix.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise ImageReadError(
            path, f"unsupported extension '{suffix}'; convert the file to one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise ImageReadError(path, "file not found; check the path and the file name")

    if suffix in _PILLOW_SUFFIXES:
        array = _read_pillow(path)
    elif suffix in _TIFF_SUFFIXES:
        array = _read_tiff(path)
    elif suffix == ".npy":
        array = _read_npy(path)
    else:
        array = _read_nifti(path)

    if array.size == 0:
        raise ImageReadError(path, f"the array is empty (shape {array.shape}); {_CONVERT_HINT}")
    return array


def read_image_slices(path: Path, slice_axis: int) -> list[tuple[str, np.ndarray]]:
    """Read a file as a list of `(case_id, array)` cases.

    A 2D file (any format, `HW` or `HWC`) is one case named after the file stem. A 3D NIfTI volume is
    one case per slice along `slice_axis` (counted after singleton dimensions are removed), named
    `<stem>_<index>` with the index zero-padded to 3 digits. NPY files are always 2D images (`HW` or
    `HWC`), because a 3D NPY array cannot be distinguished from a multichannel image.

    Raises:
        ValueError: `slice_axis` is not 0, 1 or 2.
        ImageReadError: the file cannot be read.
    """
    _validate_slice_axis(slice_axis)
    array = read_array(path)
    stem = file_case_id(path)
    if image_suffix(path) in NIFTI_SUFFIXES and array.ndim == 3:
        slices = np.moveaxis(array, slice_axis, 0)
        return [(slice_case_id(stem, index), np.ascontiguousarray(slices[index])) for index in range(len(slices))]
    return [(stem, array)]


def case_ids_in_file(path: Path, slice_axis: int) -> list[str]:
    """Return the case ids a file holds, as `read_image_slices` names them, without loading pixel data.

    NIfTI volumes are counted from their header, so indexing a folder of volumes stays cheap.

    Raises:
        ValueError: `slice_axis` is not 0, 1 or 2.
        ImageReadError: a NIfTI header cannot be read.
    """
    _validate_slice_axis(slice_axis)
    path = Path(path)
    stem = file_case_id(path)
    if image_suffix(path) not in NIFTI_SUFFIXES:
        return [stem]

    shape = _nifti_shape(path)
    if len(shape) != 3:
        return [stem]
    return [slice_case_id(stem, index) for index in range(shape[slice_axis])]


def slice_case_id(stem: str, index: int) -> str:
    """Return the case id of slice `index` of volume `stem` (`vol`, 7 -> `vol_007`)."""
    return f"{stem}_{index:03d}"


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 image or mask to a PNG file, creating the parent folder.

    Accepts `HW`, `HW1`, `HW3` (RGB) or `HW4` (RGBA) arrays of dtype bool or any integer dtype with
    values in 0..255. Bool masks are written as 0/255 so they are visible in an image viewer, and the
    readers of this project treat any nonzero value as foreground.

    Raises:
        ValueError: the shape, dtype or value range cannot be stored as an 8-bit PNG.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"write_png({path}): shape {array.shape} is not HW, HW1, HW3 or HW4; transpose CHW arrays to HWC"
        )

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"write_png({path}): values span {array.min()}..{array.max()}, outside 0..255; rescale to uint8 first"
            )
        array = array.astype(np.uint8)
    else:
        raise ValueError(f"write_png({path}): dtype {array.dtype} is not bool or integer; rescale to uint8 first")

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")


def _validate_slice_axis(slice_axis: int) -> None:
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, int) or slice_axis not in (0, 1, 2):
        raise ValueError(
            f"slice_axis {slice_axis!r} is invalid; use 0, 1 or 2 (the axis of a 3D volume to slice along)"
        )


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            # np.asarray of a palette ("P") image returns its indices, which is what masks need.
            array = np.array(image)
            mode = image.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"Pillow failed to decode it ({error}); {_CONVERT_HINT}") from error

    if mode == "1":
        array = array.astype(np.uint8)
    return _check_raster_dims(path, array)


def _read_tiff(path: Path) -> np.ndarray:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array = series.asarray()
            axes = series.axes
    except Exception as tiff_error:  # noqa: BLE001 - tifffile raises many types; Pillow gets a second try
        # tifffile needs the optional imagecodecs package for LZW and JPEG compression, which Pillow
        # decodes on its own (DRIVE's TIFFs are LZW-compressed).
        logger.debug("tifffile failed on %s (%s); trying Pillow", path, tiff_error)
        try:
            return _read_pillow(path)
        except ImageReadError as pillow_error:
            raise ImageReadError(
                path, f"tifffile ({tiff_error}) and Pillow ({pillow_error.reason}) both failed"
            ) from pillow_error

    return _check_raster_dims(path, _tiff_to_hwc(path, array, axes))


def _tiff_to_hwc(path: Path, array: np.ndarray, axes: str) -> np.ndarray:
    """Reorder a TIFF series to `HW` or `HWC`, with samples (`S`) or a planar channel axis last."""
    keep = [index for index, size in enumerate(array.shape) if size > 1 or axes[index] in "YX"]
    array = array.reshape([array.shape[index] for index in keep])
    axes = "".join(axes[index] for index in keep)

    if axes in ("YX", "YXS"):
        return array
    if len(axes) == 3 and axes.endswith("YX"):
        # Planar configuration, or one page per channel: move that axis last.
        return np.moveaxis(array, 0, -1)
    raise ImageReadError(
        path,
        f"TIFF series with axes '{axes}' and shape {array.shape} is not one 2D image; "
        "save one image per file, or store volumes as NIfTI",
    )


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ImageReadError(
            path, f"numpy failed to load it ({error}); save a plain numeric array with numpy.save"
        ) from error

    if not isinstance(array, np.ndarray) or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == bool
    ):
        raise ImageReadError(path, "the file does not hold a numeric array; save a plain numeric array with numpy.save")
    return _check_raster_dims(path, np.squeeze(array) if array.ndim > 3 else array)


def _read_nifti(path: Path) -> np.ndarray:
    try:
        image = nib.load(path)
        array = np.squeeze(np.asanyarray(image.dataobj))
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise ImageReadError(path, f"nibabel failed to load it ({error}); {_CONVERT_HINT}") from error

    if array.ndim not in (2, 3):
        raise ImageReadError(
            path, f"NIfTI array has shape {array.shape} after removing singleton axes; store a 2D image or a 3D volume"
        )
    return np.asarray(array)


def _nifti_shape(path: Path) -> tuple[int, ...]:
    try:
        shape = nib.load(path).shape
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise ImageReadError(path, f"nibabel failed to read the header ({error}); {_CONVERT_HINT}") from error
    return tuple(size for size in shape if size > 1)


def _check_raster_dims(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim in (2, 3):
        return array
    raise ImageReadError(path, f"array shape {array.shape} is not HW or HWC; store one 2D image per file")
