"""Site folders: the site.toml schema, case loading and the site check that lists every problem."""

from __future__ import annotations

import logging
import re
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.experts import ExpertSpec, ExpertSpecError, parse_expert, simulate_expert_mask
from common.imageio import ImageReadError, case_ids_in_file, file_case_id, image_suffix, is_supported, read_array

logger = logging.getLogger(__name__)

SPLITS = ("train", "calibration", "validation", "test")
REQUIRED_SPLITS = ("train", "test")
MASK_FOREGROUND_VALUES = ("nonzero", "zero")

SITE_FILE = "site.toml"
IMAGES_DIR = "images"
REFERENCE_DIR = "reference"
ROI_DIR = "roi"

# With this many real experts a missing reference is their majority vote. Fewer make too noisy a vote.
MIN_VOTING_EXPERTS = 3

# Volumes kept in memory while loading slices: one image, reference and ROI volume plus a few experts.
VOLUME_CACHE_SIZE = 8

# Channels whose standard deviation inside the ROI is below this are only centred, not scaled.
MIN_NORMALIZATION_STD = 1e-6

DEFAULT_SLICE_AXIS = 2

SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")

_TOP_LEVEL_KEYS = frozenset(
    {"site-id", "in-channels", "mask-foreground", "slice-axis", "description", "splits", "experts"}
)
_SCHEMA_HINT = 'site-id = "name", in-channels = 3, a [splits] table and [[experts]] tables'


@dataclass(frozen=True)
class SiteProblem:
    """One problem of a site folder: the file it concerns, what is wrong, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}. Fix: {self.fix}"


class SiteError(ValueError):
    """Invalid site folder. `problems` lists every problem found, and the message shows them all."""

    def __init__(self, problems: Sequence[SiteProblem], context: str = "site") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{context}: {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class SiteSpec:
    """The contents of a site's site.toml.

    Attributes:
        root: the site folder.
        site_id: name of the site, `[A-Za-z0-9_.-]+`.
        in_channels: image channel count, one value for the whole federation.
        splits: case ids per split name; every name in `SPLITS` is present, possibly with an empty list.
        experts: the experts declared by the site, real and simulated.
        mask_foreground: `"nonzero"` (any nonzero value is foreground) or `"zero"` (value 0 is
            foreground). Applies to reference and expert masks. ROI masks are always nonzero = inside.
        slice_axis: axis along which 3D NIfTI volumes are cut into one case per slice.
        description: free text.
    """

    root: Path
    site_id: str
    in_channels: int
    splits: dict[str, list[str]]
    experts: list[ExpertSpec]
    mask_foreground: str = "nonzero"
    slice_axis: int = DEFAULT_SLICE_AXIS
    description: str = ""


@dataclass
class Case:
    """One loaded case.

    Attributes:
        case_id: the case id (file stem, or `<stem>_<index>` for a slice of a volume).
        image: float32 `CHW`, each channel normalized to zero mean and unit variance over the ROI pixels
            (pixels outside the ROI are shifted and scaled with the same statistics).
        reference: uint8 `HW` in {0, 1}: the reference mask, or the majority vote of the real experts.
        roi: bool `HW` region of interest, all True when the site has no ROI file for the case.
        expert_masks: uint8 `KHW` in {0, 1}, one mask per requested expert, zeros where unavailable.
        expert_available: bool `K`, whether expert k has a mask for this case.
    """

    case_id: str
    image: np.ndarray
    reference: np.ndarray
    roi: np.ndarray
    expert_masks: np.ndarray
    expert_available: np.ndarray


def load_site_spec(root: Path) -> SiteSpec:
    """Read and validate `root/site.toml`.

    Raises:
        SiteError: lists every problem of site.toml (missing or invalid keys, invalid experts, split
            overlap), each with its fix.
    """
    root = Path(root)
    spec, problems = _parse_site_toml(root)
    if problems or spec is None:
        raise SiteError(problems, f"site {root}")
    return spec


def list_case_ids(spec: SiteSpec) -> list[str]:
    """Return the sorted case ids found in the site's images folder (slices of volumes counted each)."""
    index = _index_folder(spec.root / IMAGES_DIR, spec.slice_axis)
    return sorted([*index.files, *index.ambiguous])


def load_split(spec: SiteSpec, split: str, experts: Sequence[ExpertSpec] | None = None) -> list[Case]:
    """Load every case of one split, in the order site.toml lists them.

    Args:
        spec: the site, from `load_site_spec`.
        split: one of `SPLITS`.
        experts: the experts whose masks fill `Case.expert_masks`, in that order. Defaults to
            `spec.experts`. A federation may pass a longer list (extra simulated experts) or the same
            experts with other capacities. A real expert's folder is read from the spec's expert of the
            same id when the spec has one, else from the passed `folder`.

    Raises:
        SiteError: lists every problem found for the split's cases (missing or unreadable files, size or
            channel mismatch, case without a reference).
    """
    if split not in SPLITS:
        raise SiteError(
            [SiteProblem(str(spec.root / SITE_FILE), f"split '{split}' is unknown", f"use one of {', '.join(SPLITS)}")],
            f"site {spec.root}",
        )
    experts = list(spec.experts if experts is None else experts)
    files = _index_site(spec, experts)
    problems = _folder_problems(spec, files, experts)
    reader = _ArrayReader()

    cases: list[Case] = []
    for case_id in spec.splits[split]:
        if not files.images.has_case(case_id):
            problems.append(_missing_image_problem(spec, case_id, split))
            continue
        case, case_problems = _load_case(spec, files, case_id, experts, reader, require_reference=True)
        problems.extend(case_problems)
        if case is not None:
            cases.append(case)

    if problems:
        raise SiteError(_unique(problems), f"site {spec.root}, split '{split}'")
    logger.debug("site %s: loaded %d %s cases", spec.site_id, len(cases), split)
    return cases


def check_site(root: Path) -> list[SiteProblem]:
    """Check a site folder and return every problem found, without stopping at the first.

    The check covers site.toml (missing or invalid keys, capacity outside (0, 1], unknown profile, split
    overlap) and the folders (images, the reference folder when needed, real expert folders), which must
    exist and not be empty. It reports unsupported files, two files with one case id, split cases without
    an image, masks without an image, and expert folders whose cases are in no split. Every case is read:
    corrupt files, channel count, mask sizes and an empty ROI are reported, and so is a missing reference
    for a case in a split. Simulated experts are not generated.

    Returns:
        The problems in a stable order; an empty list means the site is ready.
    """
    root = Path(root)
    if not root.is_dir():
        return [SiteProblem(str(root), "site folder not found", "pass the folder that contains site.toml")]

    spec, problems = _parse_site_toml(root)
    if spec is None:
        return problems

    real_experts = [expert for expert in spec.experts if not expert.simulated]
    files = _index_site(spec, real_experts)
    problems.extend(_folder_problems(spec, files, real_experts))
    problems.extend(files.images.problems + files.reference.problems + files.roi.problems)
    for index in files.experts.values():
        problems.extend(index.problems)

    split_cases = {case_id for ids in spec.splits.values() for case_id in ids}
    for split, case_ids in spec.splits.items():
        problems.extend(
            _missing_image_problem(spec, case_id, split) for case_id in case_ids if not files.images.has_case(case_id)
        )
    problems.extend(_orphan_problems(files))
    problems.extend(_unused_expert_problems(spec, files, split_cases))

    reader = _ArrayReader()
    for case_id in sorted(files.images.files):
        _, case_problems = _load_case(
            spec, files, case_id, real_experts, reader, require_reference=case_id in split_cases
        )
        problems.extend(case_problems)

    return _unique(problems)


# ---------------------------------------------------------------------------------------------------------
# site.toml


def _parse_site_toml(root: Path) -> tuple[SiteSpec | None, list[SiteProblem]]:
    """Parse site.toml into a best-effort spec (None only when the file is unusable) and its problems."""
    path = root / SITE_FILE
    if not path.is_file():
        return None, [SiteProblem(str(path), "site.toml not found", f"create it with {_SCHEMA_HINT}")]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        return None, [SiteProblem(str(path), f"invalid TOML ({error})", "correct the syntax at the reported line")]

    problems: list[SiteProblem] = []

    def report(message: str, fix: str) -> None:
        problems.append(SiteProblem(str(path), message, fix))

    site_id = data.get("site-id")
    if not isinstance(site_id, str) or not SITE_ID_PATTERN.fullmatch(site_id):
        report(
            f"site-id {site_id!r} is missing or invalid",
            "set site-id to a name of letters, digits, '_', '.' or '-'",
        )
        site_id = root.name

    in_channels = data.get("in-channels")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        report(
            f"in-channels {in_channels!r} is missing or invalid",
            "set in-channels to the image channel count used by the whole federation (1 grayscale, 3 RGB)",
        )
        in_channels = 0  # unknown: the channel check is skipped

    mask_foreground = data.get("mask-foreground", "nonzero")
    if mask_foreground not in MASK_FOREGROUND_VALUES:
        report(
            f"mask-foreground {mask_foreground!r} is invalid",
            'use "nonzero" (default) or "zero" (foreground stored as 0)',
        )
        mask_foreground = "nonzero"

    slice_axis = data.get("slice-axis", DEFAULT_SLICE_AXIS)
    if isinstance(slice_axis, bool) or slice_axis not in (0, 1, 2):
        report(
            f"slice-axis {slice_axis!r} is invalid",
            "set slice-axis to 0, 1 or 2, the volume axis cut into 2D cases",
        )
        slice_axis = DEFAULT_SLICE_AXIS

    description = data.get("description", "")
    if not isinstance(description, str):
        report(f"description {description!r} is not a string", "quote the description")
        description = ""

    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        report(
            f"unknown keys {unknown}",
            f"remove them or correct the spelling; allowed keys are {sorted(_TOP_LEVEL_KEYS)}",
        )

    splits = _parse_splits(data.get("splits"), report)
    experts = _parse_experts(data.get("experts", []), report)

    spec = SiteSpec(
        root=root,
        site_id=site_id,
        in_channels=in_channels,
        splits=splits,
        experts=experts,
        mask_foreground=mask_foreground,
        slice_axis=slice_axis,
        description=description,
    )
    return spec, problems


def _parse_splits(table: object, report: Callable[[str, str], None]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    if not isinstance(table, dict):
        report("[splits] table is missing or not a table", f"add a [splits] table with lists {', '.join(SPLITS)}")
        return splits

    for name, value in table.items():
        if name not in SPLITS:
            report(f"split '{name}' is unknown", f"use the split names {', '.join(SPLITS)}")
            continue
        if not isinstance(value, list) or not all(isinstance(case_id, str) for case_id in value):
            report(f"splits.{name} is not a list of strings", f'quote every case id, e.g. {name} = ["01", "02"]')
            continue
        duplicates = sorted({case_id for case_id in value if value.count(case_id) > 1})
        if duplicates:
            report(f"splits.{name} lists {duplicates} more than once", "list each case once")
        splits[name] = list(dict.fromkeys(value))

    for name in REQUIRED_SPLITS:
        if not splits[name]:
            report(f"splits.{name} is missing or empty", f"list at least one case id in splits.{name}")

    owner: dict[str, str] = {}
    for name in SPLITS:
        for case_id in splits[name]:
            if case_id in owner:
                report(
                    f"case '{case_id}' is in both splits.{owner[case_id]} and splits.{name}",
                    "keep each case in one split, so evaluation never sees training cases",
                )
            else:
                owner[case_id] = name
    return splits


def _parse_experts(tables: object, report: Callable[[str, str], None]) -> list[ExpertSpec]:
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        report("experts is not a list of [[experts]] tables", "declare each expert in its own [[experts]] table")
        return []

    experts: list[ExpertSpec] = []
    for position, table in enumerate(tables, start=1):
        label = table.get("id") if isinstance(table.get("id"), str) else f"#{position}"
        try:
            expert = parse_expert(table, f"expert '{label}'")
        except ExpertSpecError as error:
            for message, fix in error.problems:
                report(f"expert '{label}': {message}", fix)
            continue
        if any(other.id == expert.id for other in experts):
            report(f"expert id '{expert.id}' is declared twice", "give each expert a distinct id")
            continue
        experts.append(expert)
    return experts


# ---------------------------------------------------------------------------------------------------------
# folder indexing


@dataclass(frozen=True)
class _CaseFile:
    path: Path
    slice_index: int | None  # None for a 2D file, else the slice of a 3D volume


@dataclass
class _FolderIndex:
    folder: Path
    exists: bool
    files: dict[str, _CaseFile] = field(default_factory=dict)
    ambiguous: dict[str, list[Path]] = field(default_factory=dict)
    problems: list[SiteProblem] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.files and not self.ambiguous

    def has_case(self, case_id: str) -> bool:
        return case_id in self.files or case_id in self.ambiguous

    def add(self, case_id: str, case_file: _CaseFile) -> None:
        """Register a file. A case id claimed by two files moves to `ambiguous`."""
        if case_id in self.ambiguous:
            self.ambiguous[case_id].append(case_file.path)
        elif case_id in self.files:
            self.ambiguous[case_id] = [self.files.pop(case_id).path, case_file.path]
        else:
            self.files[case_id] = case_file


@dataclass
class _SiteFiles:
    images: _FolderIndex
    reference: _FolderIndex
    roi: _FolderIndex
    experts: dict[str, _FolderIndex]  # real experts only, by id


def _index_folder(folder: Path, slice_axis: int) -> _FolderIndex:
    """Map case ids to files in one folder. Hidden files are skipped, and other unsupported files reported."""
    index = _FolderIndex(folder=folder, exists=folder.is_dir())
    if not index.exists:
        return index

    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not is_supported(path):
            index.problems.append(
                SiteProblem(
                    str(path),
                    f"unsupported file type '{image_suffix(path) or path.name}'",
                    "convert it to PNG, JPEG, TIFF, GIF, PPM/PGM, BMP, NPY or NIfTI, or move it out of the folder",
                )
            )
            continue
        try:
            case_ids = case_ids_in_file(path, slice_axis)
        except ImageReadError as error:
            index.problems.append(
                SiteProblem(str(path), f"unreadable file ({error.reason})", "replace it with an intact copy")
            )
            continue

        is_volume = case_ids != [file_case_id(path)]
        for slice_index, case_id in enumerate(case_ids):
            index.add(case_id, _CaseFile(path, slice_index if is_volume else None))

    index.problems.extend(_ambiguity_problem(index, case_id) for case_id in index.ambiguous)
    return index


def _ambiguity_problem(index: _FolderIndex, case_id: str) -> SiteProblem:
    names = ", ".join(path.name for path in index.ambiguous[case_id])
    return SiteProblem(
        str(index.folder / case_id),
        f"case '{case_id}' has several files ({names})",
        "keep one file per case",
    )


def _index_site(spec: SiteSpec, experts: Iterable[ExpertSpec]) -> _SiteFiles:
    folders = _real_expert_folders(spec, experts)
    return _SiteFiles(
        images=_index_folder(spec.root / IMAGES_DIR, spec.slice_axis),
        reference=_index_folder(spec.root / REFERENCE_DIR, spec.slice_axis),
        roi=_index_folder(spec.root / ROI_DIR, spec.slice_axis),
        experts={
            expert_id: _index_folder(spec.root / folder, spec.slice_axis) for expert_id, folder in folders.items()
        },
    )


def _real_expert_folders(spec: SiteSpec, experts: Iterable[ExpertSpec]) -> dict[str, str]:
    """Folders of the site's real experts and of any other real expert passed, by expert id."""
    folders = {expert.id: expert.folder for expert in spec.experts if expert.folder is not None}
    for expert in experts:
        if expert.folder is not None:
            folders.setdefault(expert.id, expert.folder)
    return folders


def _voting_experts(spec: SiteSpec) -> list[str]:
    return [expert.id for expert in spec.experts if not expert.simulated]


def _folder_problems(spec: SiteSpec, files: _SiteFiles, experts: Sequence[ExpertSpec]) -> list[SiteProblem]:
    """Missing or empty folders that make every case of the site unusable."""
    problems: list[SiteProblem] = []

    if not files.images.exists:
        problems.append(
            SiteProblem(str(files.images.folder), "images folder not found", "put one image per case in images/")
        )
    elif files.images.empty:
        problems.append(
            SiteProblem(str(files.images.folder), "images folder is empty", "put one image per case in images/")
        )

    needs_reference = len(_voting_experts(spec)) < MIN_VOTING_EXPERTS
    if not files.reference.exists and needs_reference:
        problems.append(
            SiteProblem(
                str(files.reference.folder),
                "reference folder not found",
                f"put one reference mask per case in reference/, or declare {MIN_VOTING_EXPERTS} or more real experts "
                "so the reference is their majority vote",
            )
        )
    elif files.reference.exists and files.reference.empty:
        problems.append(
            SiteProblem(str(files.reference.folder), "reference folder is empty", "put the reference masks in it")
        )

    if files.roi.exists and files.roi.empty:
        problems.append(
            SiteProblem(str(files.roi.folder), "roi folder is empty", "put ROI masks in it or remove the folder")
        )

    requested = {expert.id for expert in experts if not expert.simulated}
    for expert_id, index in files.experts.items():
        if expert_id not in requested:
            continue
        if not index.exists:
            problems.append(
                SiteProblem(
                    str(index.folder),
                    f"folder of real expert '{expert_id}' not found",
                    "create it with the expert's masks, or correct the folder in site.toml",
                )
            )
        elif index.empty:
            problems.append(
                SiteProblem(
                    str(index.folder),
                    f"folder of real expert '{expert_id}' is empty",
                    "put the expert's masks in it",
                )
            )
    return problems


def _missing_image_problem(spec: SiteSpec, case_id: str, split: str) -> SiteProblem:
    return SiteProblem(
        str(spec.root / IMAGES_DIR / f"{case_id}.*"),
        f"case '{case_id}' in splits.{split} has no image",
        f"add images/{case_id}.<ext> or remove '{case_id}' from splits.{split}",
    )


def _orphan_problems(files: _SiteFiles) -> list[SiteProblem]:
    """Mask files whose case has no image, usually a naming mistake."""
    problems: list[SiteProblem] = []
    for index in [files.reference, files.roi, *files.experts.values()]:
        for case_id, case_file in index.files.items():
            if not files.images.has_case(case_id):
                problems.append(
                    SiteProblem(
                        str(case_file.path),
                        f"mask of case '{case_id}' has no image in images/",
                        f"rename it to match an image's case id, or add images/{case_id}.<ext>",
                    )
                )
    return problems


def _unused_expert_problems(spec: SiteSpec, files: _SiteFiles, split_cases: set[str]) -> list[SiteProblem]:
    problems: list[SiteProblem] = []
    for expert_id, index in files.experts.items():
        if index.files and not split_cases.intersection(index.files):
            problems.append(
                SiteProblem(
                    str(index.folder),
                    f"warning: none of the {len(index.files)} cases of expert '{expert_id}' is in any split",
                    "add the annotated cases to a split (calibration and test need expert masks), "
                    "or check the file names",
                )
            )
    return problems


# ---------------------------------------------------------------------------------------------------------
# case loading


class _ArrayReader:
    """Reads case arrays, keeping recent volumes so that consecutive slices load each volume once."""

    def __init__(self) -> None:
        self._volumes: OrderedDict[Path, np.ndarray] = OrderedDict()

    def read(self, case_file: _CaseFile, slice_axis: int) -> np.ndarray:
        if case_file.slice_index is None:
            return read_array(case_file.path)

        volume = self._volumes.get(case_file.path)
        if volume is None:
            volume = read_array(case_file.path)
            self._volumes[case_file.path] = volume
            if len(self._volumes) > VOLUME_CACHE_SIZE:
                self._volumes.popitem(last=False)
        self._volumes.move_to_end(case_file.path)
        return np.take(volume, case_file.slice_index, axis=slice_axis)


def _load_case(
    spec: SiteSpec,
    files: _SiteFiles,
    case_id: str,
    experts: Sequence[ExpertSpec],
    reader: _ArrayReader,
    *,
    require_reference: bool,
) -> tuple[Case | None, list[SiteProblem]]:
    """Load one case and collect its problems. The case is None when any problem prevents loading it."""
    problems: list[SiteProblem] = []

    image = _read_image(spec, files, case_id, reader, problems)
    shape = None if image is None else image.shape[1:]

    roi = _read_mask(spec, files.roi, case_id, reader, shape, problems, foreground="nonzero")
    if roi is not None and not roi.any():
        problems.append(
            SiteProblem(
                str(files.roi.files[case_id].path),
                "ROI mask has no pixel inside",
                "provide an ROI mask that covers the image",
            )
        )

    expert_ids = dict.fromkeys([*_voting_experts(spec), *(e.id for e in experts if not e.simulated)])
    real_masks = {
        expert_id: _read_mask(spec, files.experts[expert_id], case_id, reader, shape, problems)
        for expert_id in expert_ids
        if expert_id in files.experts
    }

    reference = _read_mask(spec, files.reference, case_id, reader, shape, problems)
    if reference is None and not files.reference.has_case(case_id):
        reference = _vote_reference(spec, real_masks, case_id, problems if require_reference else [])

    if problems or image is None or reference is None:
        return None, problems

    if roi is None:
        roi = np.ones(shape, dtype=bool)

    masks = np.zeros((len(experts), *shape), dtype=np.uint8)
    available = np.zeros(len(experts), dtype=bool)
    for k, expert in enumerate(experts):
        if expert.simulated:
            masks[k] = simulate_expert_mask(reference, roi, expert, case_id)
            available[k] = True
        elif real_masks.get(expert.id) is not None:
            masks[k] = real_masks[expert.id]
            available[k] = True

    case = Case(
        case_id=case_id,
        image=normalize_image(image, roi),
        reference=reference,
        roi=roi,
        expert_masks=masks,
        expert_available=available,
    )
    return case, problems


def _read_image(
    spec: SiteSpec, files: _SiteFiles, case_id: str, reader: _ArrayReader, problems: list[SiteProblem]
) -> np.ndarray | None:
    """Read the image as float32 `CHW`, or report why it cannot be used."""
    if case_id in files.images.ambiguous:
        problems.append(_ambiguity_problem(files.images, case_id))
        return None
    case_file = files.images.files[case_id]
    try:
        array = reader.read(case_file, spec.slice_axis)
    except ImageReadError as error:
        problems.append(
            SiteProblem(str(case_file.path), f"unreadable image ({error.reason})", "replace it with an intact copy")
        )
        return None

    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        problems.append(
            SiteProblem(
                str(case_file.path),
                f"image dtype {array.dtype} is not numeric",
                "store pixel values as numbers",
            )
        )
        return None
    chw = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)

    channels = chw.shape[0]
    if spec.in_channels and channels != spec.in_channels:
        problems.append(
            SiteProblem(
                str(case_file.path),
                f"image has {channels} channel(s) but site.toml sets in-channels = {spec.in_channels}",
                f"convert the image to {spec.in_channels} channel(s) (e.g. grayscale to RGB, or drop an alpha "
                "channel), because in-channels is one value for the whole federation",
            )
        )
        return None
    return chw.astype(np.float32)


def _read_mask(
    spec: SiteSpec,
    index: _FolderIndex,
    case_id: str,
    reader: _ArrayReader,
    shape: tuple[int, ...] | None,
    problems: list[SiteProblem],
    *,
    foreground: str | None = None,
) -> np.ndarray | None:
    """Read a mask as `HW` uint8 {0,1} (bool for the ROI), or None when absent or invalid (then reported)."""
    if case_id in index.ambiguous:
        problems.append(_ambiguity_problem(index, case_id))
        return None
    case_file = index.files.get(case_id)
    if case_file is None:
        return None
    try:
        array = reader.read(case_file, spec.slice_axis)
    except ImageReadError as error:
        problems.append(
            SiteProblem(str(case_file.path), f"unreadable mask ({error.reason})", "replace it with an intact copy")
        )
        return None

    plane = _mask_plane(array)
    if shape is not None and plane.shape != tuple(shape):
        problems.append(
            SiteProblem(
                str(case_file.path),
                f"mask size {plane.shape[0]}x{plane.shape[1]} differs from the image size {shape[0]}x{shape[1]} (HxW)",
                "export the mask at the image's size, from the same image",
            )
        )
        return None

    rule = foreground or spec.mask_foreground
    inside = plane == 0 if rule == "zero" else plane != 0
    return inside if foreground == "nonzero" else inside.astype(np.uint8)


def _mask_plane(array: np.ndarray) -> np.ndarray:
    """Reduce a mask to `HW`: an alpha channel is dropped, and colour channels are combined by maximum."""
    if array.ndim == 2:
        return array
    if array.shape[-1] in (2, 4):
        array = array[..., :-1]
    return array.max(axis=-1)


def _vote_reference(
    spec: SiteSpec, real_masks: Mapping[str, np.ndarray | None], case_id: str, problems: list[SiteProblem]
) -> np.ndarray | None:
    """Majority vote of the real experts' masks (ties count as background), or None when not possible."""
    voters = _voting_experts(spec)
    masks = [real_masks[expert_id] for expert_id in voters if real_masks.get(expert_id) is not None]
    expected = spec.root / REFERENCE_DIR / f"{case_id}.*"

    if len(voters) < MIN_VOTING_EXPERTS:
        problems.append(
            SiteProblem(
                str(expected),
                f"case '{case_id}' has no reference mask",
                f"add reference/{case_id}.<ext>, or declare {MIN_VOTING_EXPERTS} or more real experts "
                "so the reference is their majority vote",
            )
        )
        return None
    if len(masks) < MIN_VOTING_EXPERTS:
        problems.append(
            SiteProblem(
                str(expected),
                f"case '{case_id}' has no reference mask and only {len(masks)} real expert mask(s) to vote with",
                f"add reference/{case_id}.<ext>, or masks of at least {MIN_VOTING_EXPERTS} real experts for this case",
            )
        )
        return None

    votes = np.sum(masks, axis=0)
    return (2 * votes > len(masks)).astype(np.uint8)


def normalize_image(image: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Shift and scale each channel of a `CHW` image by its mean and standard deviation over the ROI."""
    # float64 statistics: a float32 sum over a few hundred thousand pixels drifts by about 1e-3.
    inside = image[:, roi].astype(np.float64)
    mean = inside.mean(axis=1)
    std = inside.std(axis=1)
    std = np.where(std < MIN_NORMALIZATION_STD, 1.0, std)
    return ((image - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def _unique(problems: Iterable[SiteProblem]) -> list[SiteProblem]:
    """Drop repeated problems (a broken volume is reported once, not once per slice), keeping the order."""
    return list(dict.fromkeys(problems))
