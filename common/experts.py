"""Expert declarations and the simulated experts that generate masks from the reference mask."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

EXPERT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")

PIXEL_PROFILE = "pixel"
BLOCK_PROFILE = "block"


@dataclass(frozen=True)
class ParamRule:
    """Default and valid range of one simulated-expert parameter (bounds inclusive)."""

    default: float
    low: float
    high: float
    integer: bool = False


PROFILE_PARAMS: dict[str, dict[str, ParamRule]] = {
    # DeferredSeg's discrepancy expert: each pixel is labelled correctly with an accuracy that depends on
    # its region (foreground, background near the foreground, background elsewhere), independently.
    PIXEL_PROFILE: {
        "foreground-accuracy": ParamRule(0.95, 0.0, 1.0),
        "boundary-accuracy": ParamRule(0.97, 0.0, 1.0),
        "background-accuracy": ParamRule(0.99, 0.0, 1.0),
        "boundary-width": ParamRule(2, 0, 1024, integer=True),
    },
    # Spatially correlated errors, closer to a real annotator: whole blocks are drawn too wide or too thin.
    BLOCK_PROFILE: {
        "block-size": ParamRule(32, 1, 65536, integer=True),
        "block-error-rate": ParamRule(0.15, 0.0, 1.0),
        "boundary-shift": ParamRule(2, 1, 1024, integer=True),
    },
}

_KNOWN_KEYS = frozenset({"id", "capacity", "folder", "profile", "seed"})


@dataclass(frozen=True)
class ExpertSpec:
    """One expert of a site.

    Attributes:
        id: name of the expert, `[A-Za-z0-9_.-]+`; also the default folder name of a real expert.
        capacity: maximum load, a fraction of region-of-interest pixels with 0 < capacity <= 1.
        folder: for a real expert, the folder of their masks relative to the site folder; None if simulated.
        profile: for a simulated expert, `"pixel"` or `"block"` (see `simulate_expert_mask`); None if real.
        seed: seed of a simulated expert's errors, >= 0. Ignored for real experts.
        params: profile parameters keyed as in site.toml (`"foreground-accuracy"`, `"block-size"`, ...),
            with every parameter of the profile present after `parse_expert`.
    """

    id: str
    capacity: float
    folder: str | None = None
    profile: str | None = None
    seed: int = 0
    params: Mapping[str, float] = field(default_factory=dict, hash=False)

    @property
    def simulated(self) -> bool:
        """Whether the masks are generated from the reference mask instead of read from a folder."""
        return self.profile is not None


class ExpertSpecError(ValueError):
    """Invalid expert declaration. `problems` lists every `(message, fix)` pair found."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        details = "; ".join(f"{message}. Fix: {fix}" for message, fix in problems)
        super().__init__(f"{source}: {details}")


def parse_expert(mapping: Mapping[str, object], source: str) -> ExpertSpec:
    """Validate one expert table (a `[[experts]]` entry of site.toml) and return its `ExpertSpec`.

    A real expert has `id`, `capacity` and `folder`. A simulated expert has `id`, `capacity`, `profile`,
    an optional `seed` (default 0) and optional profile parameters, whose defaults are in
    `PROFILE_PARAMS`.

    Args:
        mapping: the table as parsed from TOML, keys with dashes.
        source: where the table comes from, used in messages (e.g. "site.toml expert 'observer-2'").

    Raises:
        ExpertSpecError: a `ValueError` that lists every problem of this table, each with its fix.
    """
    problems: list[tuple[str, str]] = []

    expert_id = mapping.get("id")
    if not isinstance(expert_id, str) or not EXPERT_ID_PATTERN.fullmatch(expert_id):
        problems.append(
            (f"id {expert_id!r} is missing or invalid", "set id to a name of letters, digits, '_', '.' or '-'")
        )

    capacity = mapping.get("capacity")
    if not _is_number(capacity) or not 0.0 < float(capacity) <= 1.0:
        problem = "capacity is missing" if capacity is None else f"capacity {capacity!r} is outside (0, 1]"
        problems.append(
            (
                problem,
                "set capacity to the maximum fraction of region-of-interest pixels the expert reviews, e.g. 0.05",
            )
        )

    folder = mapping.get("folder")
    profile = mapping.get("profile")
    if (folder is None) == (profile is None):
        problems.append(
            (
                "exactly one of 'folder' (real expert) and 'profile' (simulated expert) must be set",
                f"set folder = \"experts/<id>\" for a real expert or profile = one of {sorted(PROFILE_PARAMS)}",
            )
        )
    if folder is not None and (not isinstance(folder, str) or not folder.strip()):
        problems.append((f"folder {folder!r} is not a path", "set folder to a path relative to the site folder"))
    if profile is not None and profile not in PROFILE_PARAMS:
        problems.append((f"profile {profile!r} is unknown", f"use one of {sorted(PROFILE_PARAMS)}"))

    seed = mapping.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append((f"seed {seed!r} is invalid", "set seed to an integer >= 0"))

    rules = PROFILE_PARAMS.get(profile, {}) if isinstance(profile, str) else {}
    params, param_problems = _parse_params(mapping, rules)
    problems.extend(param_problems)

    unknown = sorted(set(mapping) - _KNOWN_KEYS - set(rules))
    if unknown:
        allowed = sorted(_KNOWN_KEYS | set(rules))
        problems.append((f"unknown keys {unknown}", f"remove them or correct the spelling; allowed keys are {allowed}"))

    if problems:
        raise ExpertSpecError(source, problems)
    return ExpertSpec(
        id=expert_id,
        capacity=float(capacity),
        folder=folder,
        profile=profile,
        seed=seed,
        params=params,
    )


def simulate_expert_mask(reference: np.ndarray, roi: np.ndarray, expert: ExpertSpec, case_id: str) -> np.ndarray:
    """Generate the mask a simulated expert draws for one case.

    Profiles:
        pixel: DeferredSeg's discrepancy expert. Each pixel keeps its reference label with probability
            `foreground-accuracy` on foreground, `boundary-accuracy` on background pixels within
            `boundary-width` pixels (Euclidean disk) of the foreground, and `background-accuracy` on the
            remaining background. Otherwise it is flipped, independently of its neighbours.
        block: spatially correlated errors. The image is tiled into `block-size` squares. Each square is
            wrong with probability `block-error-rate`. In a wrong square the mask is the reference dilated
            (50%) or eroded (50%) by a disk of radius `boundary-shift`, so boundaries move outward or
            inward and structures thinner than the shift vanish. Other squares copy the reference.

    The random generator is seeded from `(expert.seed, crc32(expert.id, case_id))`, so a case always gets
    the same mask in every process, as a real annotator's mask stays fixed.

    Args:
        reference: `HW` reference mask, bool or integer with nonzero = foreground.
        roi: `HW` bool region of interest; outside it the reference is copied unchanged.
        expert: a simulated expert (`expert.profile` set), usually from `parse_expert`.
        case_id: the case id, part of the seed.

    Returns:
        uint8 `HW` mask with values in {0, 1}.

    Raises:
        ValueError: the shapes differ or are not 2D, or the expert is not simulated.
    """
    reference = np.asarray(reference)
    roi = np.asarray(roi)
    if reference.ndim != 2 or roi.shape != reference.shape:
        raise ValueError(
            f"expert '{expert.id}', case '{case_id}': reference shape {reference.shape} and roi shape {roi.shape} "
            "must be the same HW shape"
        )
    if expert.profile not in PROFILE_PARAMS:
        raise ValueError(
            f"expert '{expert.id}' has profile {expert.profile!r}; only simulated experts with a profile in "
            f"{sorted(PROFILE_PARAMS)} can generate masks"
        )

    foreground = reference != 0
    params = {name: rule.default for name, rule in PROFILE_PARAMS[expert.profile].items()} | dict(expert.params)
    rng = np.random.default_rng([expert.seed, zlib.crc32(f"{expert.id}\0{case_id}".encode())])

    if expert.profile == PIXEL_PROFILE:
        simulated = _simulate_pixel(foreground, params, rng)
    else:
        simulated = _simulate_block(foreground, params, rng)

    return np.where(roi.astype(bool), simulated, foreground).astype(np.uint8)


def disk(radius: int) -> np.ndarray:
    """Return a bool Euclidean disk of the given radius, shape `(2r+1, 2r+1)`, for morphology."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _simulate_pixel(foreground: np.ndarray, params: Mapping[str, float], rng: np.random.Generator) -> np.ndarray:
    width = int(params["boundary-width"])
    if width > 0:
        band = ndimage.binary_dilation(foreground, structure=disk(width)) & ~foreground
    else:
        band = np.zeros_like(foreground)

    accuracy = np.where(
        foreground,
        params["foreground-accuracy"],
        np.where(band, params["boundary-accuracy"], params["background-accuracy"]),
    )
    flipped = rng.random(foreground.shape) >= accuracy
    return foreground ^ flipped


def _simulate_block(foreground: np.ndarray, params: Mapping[str, float], rng: np.random.Generator) -> np.ndarray:
    block = int(params["block-size"])
    shift = disk(int(params["boundary-shift"]))
    height, width = foreground.shape
    grid_shape = (-(-height // block), -(-width // block))

    wrong_blocks = rng.random(grid_shape) < params["block-error-rate"]
    dilate_blocks = rng.random(grid_shape) < 0.5

    # Morphology runs on the whole image so that a shifted boundary continues smoothly across the edge
    # of two wrong blocks. border_value=1 keeps foreground that touches the image edge from eroding.
    dilated = ndimage.binary_dilation(foreground, structure=shift)
    eroded = ndimage.binary_erosion(foreground, structure=shift, border_value=1)

    wrong = _expand_blocks(wrong_blocks, block, foreground.shape)
    dilate = _expand_blocks(dilate_blocks, block, foreground.shape)
    return np.where(wrong, np.where(dilate, dilated, eroded), foreground)


def _expand_blocks(grid: np.ndarray, block: int, shape: tuple[int, int]) -> np.ndarray:
    """Repeat each grid cell into a `block` x `block` square and crop to `shape`."""
    return np.repeat(np.repeat(grid, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def _parse_params(
    mapping: Mapping[str, object], rules: Mapping[str, ParamRule]
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    params: dict[str, float] = {}
    problems: list[tuple[str, str]] = []
    for name, rule in rules.items():
        value = mapping.get(name, rule.default)
        valid_type = isinstance(value, int) and not isinstance(value, bool) if rule.integer else _is_number(value)
        if not valid_type or not rule.low <= value <= rule.high:
            kind = "an integer" if rule.integer else "a number"
            problems.append(
                (
                    f"{name} {value!r} is invalid",
                    f"set {name} to {kind} in [{rule.low:g}, {rule.high:g}] (default {rule.default:g})",
                )
            )
            continue
        params[name] = int(value) if rule.integer else float(value)
    return params, problems


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
