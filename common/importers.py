"""Importers that copy public datasets and generic file collections into the site folder layout."""

from __future__ import annotations

import glob
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomli_w

from common.experts import EXPERT_ID_PATTERN
from common.imageio import (
    NIFTI_SUFFIXES,
    case_ids_in_file,
    file_case_id,
    image_suffix,
    is_supported,
    read_array,
    slice_case_id,
)
from common.site import DEFAULT_SLICE_AXIS, IMAGES_DIR, REFERENCE_DIR, ROI_DIR, SITE_FILE, SPLITS, SiteError, check_site

logger = logging.getLogger(__name__)

EXPERTS_DIR = "experts"

# Entries of a site folder that an import writes, and the only ones `overwrite=True` removes.
_SITE_ENTRIES = (SITE_FILE, IMAGES_DIR, REFERENCE_DIR, ROI_DIR, EXPERTS_DIR)

# How many missing source files an error lists before it only counts the rest.
_MAX_LISTED_MISSING = 5


@dataclass(frozen=True)
class RetinaExpertSetup:
    """Experts of the DRIVE and CHASE_DB1 sites: the second observer plus one simulated pixel expert."""

    observer_id: str = "observer-2"
    observer_capacity: float = 0.05
    simulated_id: str = "sim-pixel"
    simulated_capacity: float = 0.05
    simulated_seed: int = 1
    foreground_accuracy: float = 0.95
    boundary_accuracy: float = 0.97
    background_accuracy: float = 0.99

    def tables(self) -> list[dict[str, object]]:
        """Return the `[[experts]]` tables for site.toml."""
        return [
            {"id": self.observer_id, "capacity": self.observer_capacity, "folder": f"{EXPERTS_DIR}/{self.observer_id}"},
            {
                "id": self.simulated_id,
                "capacity": self.simulated_capacity,
                "profile": "pixel",
                "seed": self.simulated_seed,
                "foreground-accuracy": self.foreground_accuracy,
                "boundary-accuracy": self.boundary_accuracy,
                "background-accuracy": self.background_accuracy,
            },
        ]


RETINA_EXPERTS = RetinaExpertSetup()

# DRIVE: training images 21-40 have one observer; test images 01-20 have two. The split keeps the
# second observer in calibration, validation and test, where routing needs expert masks.
DRIVE_SPLITS: dict[str, list[str]] = {
    "train": [f"{number:02d}" for number in [*range(21, 41), *range(1, 8)]],
    "calibration": [f"{number:02d}" for number in range(8, 12)],
    "validation": [f"{number:02d}" for number in range(12, 14)],
    "test": [f"{number:02d}" for number in range(14, 21)],
}

# CHASE_DB1 contains both eyes of 14 children, and a child's two images stay in one split.
CHASE_DB1_CHILD_SPLITS: dict[str, range] = {
    "train": range(1, 9),
    "calibration": range(9, 10),
    "validation": range(10, 11),
    "test": range(11, 15),
}


def import_drive(src: Path, dst: Path, *, site_id: str = "drive", overwrite: bool = False) -> Path:
    """Import the DRIVE retinal vessel dataset, in its official release layout, as a site folder.

    Expected files under `src`: `training/images/21_training.tif`, `training/1st_manual/21_manual1.gif`,
    `training/mask/21_training_mask.gif` for cases 21-40, and `test/images/01_test.tif`,
    `test/1st_manual/01_manual1.gif`, `test/2nd_manual/01_manual2.gif`, `test/mask/01_test_mask.gif` for
    cases 01-20. Observer 1 becomes the reference, observer 2 the real expert `observer-2` (test cases
    only), the field-of-view masks the ROI. A simulated pixel expert `sim-pixel` is added. Files are copied
    byte for byte; the split is `DRIVE_SPLITS`.

    Returns:
        `dst`, a checked site folder.

    Raises:
        FileNotFoundError: a source file is missing; the message names the expected paths.
        FileExistsError: `dst` is not empty and `overwrite` is False.
        SiteError: the imported site fails `check_site`.
    """
    src = Path(src)
    copies: list[tuple[Path, str]] = []
    for number in range(1, 41):
        case_id = f"{number:02d}"
        part, kind = ("test", "test") if number <= 20 else ("training", "training")
        copies += [
            (src / part / "images" / f"{case_id}_{kind}.tif", IMAGES_DIR),
            (src / part / "1st_manual" / f"{case_id}_manual1.gif", REFERENCE_DIR),
            (src / part / "mask" / f"{case_id}_{kind}_mask.gif", ROI_DIR),
        ]
        if part == "test":
            copies.append(
                (src / part / "2nd_manual" / f"{case_id}_manual2.gif", f"{EXPERTS_DIR}/{RETINA_EXPERTS.observer_id}")
            )

    _require_files([source for source, _ in copies], "DRIVE")
    dst = _prepare_destination(dst, overwrite)
    for source, folder in copies:
        _copy_case_file(source, dst / folder, _drive_case_id(source.name))

    toml = _site_table(site_id, in_channels=3, splits=DRIVE_SPLITS, experts=RETINA_EXPERTS.tables())
    toml["description"] = "DRIVE retinal vessels; reference observer 1, expert observer 2, ROI field of view"
    return _finish(dst, toml)


def import_chase_db1(src: Path, dst: Path, *, site_id: str = "chase_db1", overwrite: bool = False) -> Path:
    """Import the CHASE_DB1 retinal vessel dataset, in its flat official layout, as a site folder.

    Expected files under `src`: `Image_01L.jpg`, `Image_01L_1stHO.png`, `Image_01L_2ndHO.png`, ... for
    children 01-14 and eyes L and R; optionally `fov_masks_unofficial/Image_01L.png` field-of-view masks,
    used as ROI when present. Case ids are the image stems (`Image_01L`). Observer 1 becomes the reference,
    observer 2 the real expert `observer-2`, and a simulated pixel expert `sim-pixel` is added. The split
    is by child (`CHASE_DB1_CHILD_SPLITS`), so both eyes of a child stay together.

    Returns:
        `dst`, a checked site folder.

    Raises:
        FileNotFoundError: a source file is missing; the message names the expected paths.
        FileExistsError: `dst` is not empty and `overwrite` is False.
        SiteError: the imported site fails `check_site`.
    """
    src = Path(src)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    copies: list[tuple[Path, str, str]] = []
    for split, children in CHASE_DB1_CHILD_SPLITS.items():
        for child in children:
            for eye in ("L", "R"):
                case_id = f"Image_{child:02d}{eye}"
                splits[split].append(case_id)
                copies += [
                    (src / f"{case_id}.jpg", IMAGES_DIR, case_id),
                    (src / f"{case_id}_1stHO.png", REFERENCE_DIR, case_id),
                    (src / f"{case_id}_2ndHO.png", f"{EXPERTS_DIR}/{RETINA_EXPERTS.observer_id}", case_id),
                ]
                roi = src / "fov_masks_unofficial" / f"{case_id}.png"
                if roi.is_file():
                    copies.append((roi, ROI_DIR, case_id))

    _require_files([source for source, _, _ in copies], "CHASE_DB1")
    dst = _prepare_destination(dst, overwrite)
    for source, folder, case_id in copies:
        _copy_case_file(source, dst / folder, case_id)

    toml = _site_table(site_id, in_channels=3, splits=splits, experts=RETINA_EXPERTS.tables())
    toml["description"] = "CHASE_DB1 retinal vessels; reference observer 1, expert observer 2, split by child"
    return _finish(dst, toml)


def import_generic(
    dst: Path,
    *,
    images: str,
    reference: str | None,
    roi: str | None = None,
    experts: Mapping[str, str] = {},  # read only, so the shared default is safe
    case_pattern: str = r"(?P<case>.+)",
    invert_masks: bool = False,
    site_id: str,
    in_channels: int | None = None,
    splits: Mapping[str, Sequence[str]] | None = None,
    split_fractions: tuple[float, float, float, float] = (0.6, 0.1, 0.1, 0.2),
    seed: int = 0,
    capacity: float = 0.05,
    overwrite: bool = False,
) -> Path:
    """Import files matched by glob patterns as a site folder.

    Args:
        dst: the site folder to write.
        images: glob pattern of the image files (`**` matches nested folders).
        reference: glob pattern of the reference masks; None when 3 or more experts vote the reference.
        roi: glob pattern of region-of-interest masks, optional.
        experts: real expert id -> glob pattern of that expert's masks.
        case_pattern: regular expression with a named group `case`, matched with `re.fullmatch` against
            each file name without its extension (`21_training` for `21_training.tif`). Every pattern
            uses it, so it must also fit the mask names (e.g. `(?P<case>\\d+)_.*`).
        invert_masks: masks store foreground as 0; sets `mask-foreground = "zero"`.
        site_id: the site id.
        in_channels: image channel count; None reads it from the first image.
        splits: split name -> case ids; None splits the cases at random (seeded) by `split_fractions`.
            A 3D NIfTI volume's slices always go to the same split.
        split_fractions: fractions for train, calibration, validation and test, summing to 1.
        seed: seed of the random split.
        capacity: capacity of every expert.
        overwrite: replace the site files in a non-empty `dst`.

    Returns:
        `dst`, a checked site folder.

    Raises:
        ValueError: invalid pattern, fractions or ids, a file name that does not fit `case_pattern`, two
            files with one case id, or a mask without an image.
        FileNotFoundError: a glob pattern matches no file.
        FileExistsError: `dst` is not empty and `overwrite` is False.
        SiteError: the imported site fails `check_site`.
    """
    pattern = _compile_case_pattern(case_pattern)
    for expert_id in experts:
        if not EXPERT_ID_PATTERN.fullmatch(expert_id):
            raise ValueError(f"expert id {expert_id!r} is invalid; use letters, digits, '_', '.' or '-'")

    image_files = _match_cases(images, pattern, "images")
    sources: dict[str, dict[str, Path]] = {IMAGES_DIR: image_files}
    if reference is not None:
        sources[REFERENCE_DIR] = _match_cases(reference, pattern, "reference")
    if roi is not None:
        sources[ROI_DIR] = _match_cases(roi, pattern, "roi")
    for expert_id, expert_glob in experts.items():
        sources[f"{EXPERTS_DIR}/{expert_id}"] = _match_cases(expert_glob, pattern, f"expert '{expert_id}'")

    for folder, files in sources.items():
        orphans = sorted(set(files) - set(image_files))
        if orphans:
            raise ValueError(
                f"{folder}: cases {orphans} have a mask but no image (first file {files[orphans[0]]}); "
                "fix the glob patterns or the case pattern so masks and images share case ids"
            )

    if in_channels is None:
        in_channels = _channel_count(next(iter(image_files.values())))
    if splits is None:
        case_groups = [_case_group(case_id, path) for case_id, path in image_files.items()]
        split_lists = split_by_fractions(case_groups, split_fractions, seed)
    else:
        split_lists = {name: list(splits.get(name, [])) for name in SPLITS}
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"split names {unknown} are unknown; use {', '.join(SPLITS)}")

    dst = _prepare_destination(dst, overwrite)
    for folder, files in sources.items():
        for case_id, source in files.items():
            _copy_case_file(source, dst / folder, case_id)

    expert_tables = [
        {"id": expert_id, "capacity": capacity, "folder": f"{EXPERTS_DIR}/{expert_id}"} for expert_id in experts
    ]
    toml = _site_table(site_id, in_channels=in_channels, splits=split_lists, experts=expert_tables)
    if invert_masks:
        toml["mask-foreground"] = "zero"
    return _finish(dst, toml)


def split_by_fractions(
    case_groups: Sequence[Sequence[str]], fractions: tuple[float, float, float, float], seed: int
) -> dict[str, list[str]]:
    """Assign groups of case ids (one group per patient or volume) to the four splits at random.

    Calibration, validation and test get `round(fraction * groups)` groups each and train the rest. Train
    and test get at least one group each. The same groups, fractions and seed always give the same split.

    Raises:
        ValueError: the fractions are negative, do not sum to 1, give train or test no share, or there
            are fewer than 2 groups.
    """
    valid = len(fractions) == len(SPLITS) and all(fraction >= 0 for fraction in fractions)
    if not valid or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"split fractions {fractions} are invalid; give 4 non-negative fractions "
            "(train, calibration, validation, test) summing to 1"
        )
    if fractions[0] == 0 or fractions[3] == 0:
        raise ValueError(f"split fractions {fractions} give train or test nothing; both need a positive fraction")
    if len(case_groups) < 2:
        raise ValueError(f"{len(case_groups)} case group(s) cannot fill both train and test; import at least 2 images")

    order = np.random.default_rng(seed).permutation(len(case_groups))
    counts = [round(fraction * len(case_groups)) for fraction in fractions[1:]]
    counts[2] = max(counts[2], 1)

    # Shrink the largest held-out split until train keeps at least one group; test keeps one too.
    while sum(counts) > len(case_groups) - 1:
        shrinkable = [position for position in range(3) if counts[position] > (1 if position == 2 else 0)]
        counts[max(shrinkable, key=lambda position: counts[position])] -= 1

    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    start = 0
    for name, count in zip(SPLITS[1:], counts):
        for position in order[start : start + count]:
            splits[name].extend(case_groups[position])
        start += count
    for position in order[start:]:
        splits["train"].extend(case_groups[position])
    return {name: sorted(case_ids) for name, case_ids in splits.items()}


def _drive_case_id(file_name: str) -> str:
    return file_name[:2]


def _require_files(paths: Sequence[Path], dataset: str) -> None:
    missing = [path for path in paths if not path.is_file()]
    if not missing:
        return
    listed = "\n  ".join(str(path) for path in missing[:_MAX_LISTED_MISSING])
    more = f"\n  ... and {len(missing) - _MAX_LISTED_MISSING} more" if len(missing) > _MAX_LISTED_MISSING else ""
    raise FileNotFoundError(
        f"{dataset}: {len(missing)} expected file(s) not found:\n  {listed}{more}\n"
        f"pass the folder of the unpacked official {dataset} release"
    )


def _prepare_destination(dst: Path, overwrite: bool) -> Path:
    """Create `dst`, or clear the site entries of a non-empty `dst` when `overwrite` is set."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; pass a folder for the site")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{dst} is not empty; pass an empty or new folder, or set overwrite to replace the site files"
            )
        # Only the entries an import writes are removed, so a wrong path cannot wipe unrelated files.
        for name in _SITE_ENTRIES:
            entry = dst / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def _copy_case_file(source: Path, folder: Path, case_id: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / f"{case_id}{image_suffix(source)}")


def _site_table(
    site_id: str, *, in_channels: int, splits: Mapping[str, Sequence[str]], experts: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    return {
        "site-id": site_id,
        "in-channels": in_channels,
        "splits": {name: list(splits.get(name, [])) for name in SPLITS},
        "experts": [dict(table) for table in experts],
    }


def _finish(dst: Path, toml: dict[str, object]) -> Path:
    """Write site.toml, then raise SiteError unless `check_site` finds no problem."""
    (dst / SITE_FILE).write_text(tomli_w.dumps(toml), encoding="utf-8")
    problems = check_site(dst)
    if problems:
        raise SiteError(problems, f"imported site {dst}")
    logger.info("imported site '%s' into %s", toml["site-id"], dst)
    return dst


def _compile_case_pattern(case_pattern: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(case_pattern)
    except re.error as error:
        raise ValueError(f"case pattern {case_pattern!r} is not a valid regular expression ({error})") from error
    if "case" not in pattern.groupindex:
        raise ValueError(f"case pattern {case_pattern!r} has no named group 'case'; write e.g. (?P<case>\\d+)_training")
    return pattern


def _match_cases(glob_pattern: str, pattern: re.Pattern[str], label: str) -> dict[str, Path]:
    """Map case ids to the supported files a glob pattern matches, sorted by case id."""
    paths = sorted(Path(match) for match in glob.glob(glob_pattern, recursive=True))
    paths = [path for path in paths if path.is_file() and is_supported(path)]
    if not paths:
        raise FileNotFoundError(f"{label}: glob pattern {glob_pattern!r} matches no supported image file")

    cases: dict[str, Path] = {}
    for path in paths:
        match = pattern.fullmatch(file_case_id(path))
        if match is None or not match.group("case"):
            raise ValueError(
                f"{label}: file name {path.name!r} does not fit the case pattern {pattern.pattern!r} "
                f"(matched against {file_case_id(path)!r}); adjust the case pattern"
            )
        case_id = match.group("case")
        if case_id in cases:
            raise ValueError(
                f"{label}: {cases[case_id]} and {path} both have case id '{case_id}'; adjust the case pattern"
            )
        cases[case_id] = path
    return dict(sorted(cases.items()))


def _channel_count(path: Path) -> int:
    """Return the channel count of an image file. NIfTI images and volumes count as single-channel."""
    if image_suffix(path) in NIFTI_SUFFIXES:
        return 1
    array = read_array(path)
    return 1 if array.ndim == 2 else array.shape[-1]


def _case_group(case_id: str, path: Path) -> list[str]:
    """Case ids of one imported file: the case itself, or one id per slice of a 3D NIfTI volume."""
    file_ids = case_ids_in_file(path, DEFAULT_SLICE_AXIS)
    if file_ids == [file_case_id(path)]:
        return [case_id]
    return [slice_case_id(case_id, index) for index in range(len(file_ids))]
