"""Built-in synthetic federation: site folders with vessel-like and blob-like structures and simulated experts."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32
# One case per split at least, with train keeping the remainder.
MIN_CASES_PER_SITE = 4
SPLIT_FRACTIONS = {"calibration": 0.15, "validation": 0.10, "test": 0.25}
MASK_FOREGROUND_VALUE = 255


@dataclass(frozen=True)
class AppearanceRanges:
    """Uniform ranges from which each site draws its scanner appearance (intensities on a 0..1 scale).

    contrast: intensity difference between a fully visible structure and the background.
    noise_std: standard deviation of additive Gaussian noise.
    blur_sigma: Gaussian blur in pixels, which widens every border.
    intensity_shift: background intensity level. The range is cut into `shift_levels` equal parts, and
        consecutive sites draw from consecutive parts (cycling), within the central `shift_spread` of the part.
        With 2 or more levels, consecutive sites differ in background level by at least (1 - shift_spread)
        part widths.
    """

    contrast: tuple[float, float] = (0.25, 0.6)
    noise_std: tuple[float, float] = (0.02, 0.08)
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    intensity_shift: tuple[float, float] = (0.1, 0.4)
    shift_levels: int = 3
    shift_spread: float = 0.5


@dataclass(frozen=True)
class StructureRanges:
    """Ranges for the structures of one case.

    Vessels are random walks of `vessel_step` pixels whose heading drifts by `vessel_turn_std` radians per
    step, drawn 1 or 2 pixels wide. Blobs are ellipse-like regions whose radius varies with the angle by up to
    `blob_wobble` per harmonic and whose intensity fades over `blob_edge_width` pixels, so their border is
    ambiguous. Vessel lengths, blob radii, blob centers and `texture_sigma` are fractions of the image size.
    Weights scale the site contrast per structure, so some structures are faint. `texture_amplitude` is the
    standard deviation of the slowly varying background on the 0..1 intensity scale.
    """

    vessel_count: tuple[int, int] = (2, 4)
    vessel_length: tuple[float, float] = (0.6, 1.2)
    vessel_turn_std: float = 0.08
    vessel_step: float = 0.5
    vessel_weight: tuple[float, float] = (0.6, 1.0)
    blob_count: tuple[int, int] = (1, 2)
    blob_radius: tuple[float, float] = (0.06, 0.14)
    blob_min_radius_px: float = 3.0
    blob_center: tuple[float, float] = (0.2, 0.8)
    blob_wobble: float = 0.15
    blob_edge_width: tuple[float, float] = (0.8, 2.0)
    blob_weight: tuple[float, float] = (0.5, 0.9)
    texture_sigma: float = 0.125
    texture_amplitude: float = 0.03


@dataclass(frozen=True)
class ExpertRanges:
    """Ranges for the simulated experts declared in site.toml, with capacities as fractions of ROI pixels."""

    count: tuple[int, int] = (2, 3)
    capacity: tuple[float, float] = (0.02, 0.1)
    senior_accuracy: tuple[float, float] = (0.93, 0.98)
    junior_accuracy: tuple[float, float] = (0.85, 0.93)
    background_accuracy: tuple[float, float] = (0.98, 0.995)
    boundary_width: tuple[int, int] = (1, 3)
    block_sizes: tuple[int, ...] = (8, 16)
    block_error_rate: tuple[float, float] = (0.05, 0.25)
    boundary_shift: tuple[int, int] = (1, 2)


@dataclass(frozen=True)
class SiteAppearance:
    """Appearance of one site's images, drawn once per site (see `AppearanceRanges` for the meaning)."""

    contrast: float
    noise_std: float
    blur_sigma: float
    intensity_shift: float


def draw_appearance(
    rng: np.random.Generator, site_index: int, ranges: AppearanceRanges = AppearanceRanges()
) -> SiteAppearance:
    """Draw the appearance of the site with 0-based `site_index` uniformly from `ranges`."""
    shift_low, shift_high = ranges.intensity_shift
    level_width = (shift_high - shift_low) / ranges.shift_levels
    level_center = shift_low + (site_index % ranges.shift_levels + 0.5) * level_width
    half_spread = 0.5 * ranges.shift_spread * level_width

    return SiteAppearance(
        contrast=float(rng.uniform(*ranges.contrast)),
        noise_std=float(rng.uniform(*ranges.noise_std)),
        blur_sigma=float(rng.uniform(*ranges.blur_sigma)),
        intensity_shift=float(rng.uniform(level_center - half_spread, level_center + half_spread)),
    )


def _draw_vessels(
    rng: np.random.Generator, image_size: int, ranges: StructureRanges
) -> tuple[np.ndarray, np.ndarray]:
    """Draw vessels and return their mask (bool HW) and intensity weights (float HW, 0 off the vessels)."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    weights = np.zeros((image_size, image_size), dtype=np.float64)
    n_vessels = int(rng.integers(ranges.vessel_count[0], ranges.vessel_count[1] + 1))

    for _ in range(n_vessels):
        length = rng.uniform(*ranges.vessel_length) * image_size
        n_steps = int(length / ranges.vessel_step)
        start = rng.uniform(0, image_size - 1, size=2)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, ranges.vessel_turn_std, n_steps))
        rows = start[0] + np.cumsum(ranges.vessel_step * np.sin(heading))
        cols = start[1] + np.cumsum(ranges.vessel_step * np.cos(heading))

        # Half-pixel steps keep the rounded path 8-connected.
        rows_px = np.rint(rows).astype(int)
        cols_px = np.rint(cols).astype(int)
        inside = (rows_px >= 0) & (rows_px < image_size) & (cols_px >= 0) & (cols_px < image_size)
        line = np.zeros_like(mask)
        line[rows_px[inside], cols_px[inside]] = True
        if rng.integers(1, 3) == 2:
            line = ndimage.binary_dilation(line, structure=np.ones((2, 2), dtype=bool))

        mask |= line
        weights = np.maximum(weights, line * rng.uniform(*ranges.vessel_weight))

    return mask, weights


def _draw_blobs(rng: np.random.Generator, image_size: int, ranges: StructureRanges) -> tuple[np.ndarray, np.ndarray]:
    """Draw blobs and return their mask (bool HW) and intensity weights (float HW with soft borders)."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    weights = np.zeros((image_size, image_size), dtype=np.float64)
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    n_blobs = int(rng.integers(ranges.blob_count[0], ranges.blob_count[1] + 1))

    for _ in range(n_blobs):
        center = rng.uniform(*ranges.blob_center, size=2) * image_size
        radius = max(rng.uniform(*ranges.blob_radius) * image_size, ranges.blob_min_radius_px)
        offset_rows = rows - center[0]
        offset_cols = cols - center[1]
        distance = np.hypot(offset_rows, offset_cols)
        angle = np.arctan2(offset_rows, offset_cols)

        # Low angular harmonics make the outline irregular but keep it one connected region.
        outline = np.ones_like(angle)
        for harmonic in (2, 3):
            amplitude = rng.uniform(0.0, ranges.blob_wobble)
            outline += amplitude * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
        signed_distance = distance - radius * outline

        # Before blurring, the reference border is where the blob's intensity ramp reaches half height.
        edge_width = rng.uniform(*ranges.blob_edge_width)
        soft = 1.0 / (1.0 + np.exp(signed_distance / edge_width))
        mask |= signed_distance <= 0
        weights = np.maximum(weights, soft * rng.uniform(*ranges.blob_weight))

    return mask, weights


def generate_case(
    rng: np.random.Generator,
    appearance: SiteAppearance,
    image_size: int,
    ranges: StructureRanges = StructureRanges(),
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one case as (image float32 HW in [0, 1], reference uint8 HW in {0, 1}).

    The reference is the union of thin vessel-like paths and blob-like regions. The image shows them
    brighter than a slowly varying background, blurred and with noise as set by `appearance`.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is too small, use at least {MIN_IMAGE_SIZE} pixels")

    vessel_mask, vessel_weights = _draw_vessels(rng, image_size, ranges)
    blob_mask, blob_weights = _draw_blobs(rng, image_size, ranges)
    structure = np.maximum(vessel_weights, blob_weights)

    texture = ndimage.gaussian_filter(rng.normal(size=(image_size, image_size)), ranges.texture_sigma * image_size)
    texture *= ranges.texture_amplitude / max(float(texture.std()), np.finfo(np.float64).eps)

    image = appearance.intensity_shift + texture + appearance.contrast * structure
    image = ndimage.gaussian_filter(image, appearance.blur_sigma)
    image += rng.normal(0.0, appearance.noise_std, size=image.shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    reference = (vessel_mask | blob_mask).astype(np.uint8)
    return image, reference


def split_cases(case_ids: list[str]) -> dict[str, list[str]]:
    """Split case ids in order into about 50% train, 15% calibration, 10% validation and 25% test.

    Every split gets at least one case, so at least `MIN_CASES_PER_SITE` cases are needed.
    """
    if len(case_ids) < MIN_CASES_PER_SITE:
        raise ValueError(f"{len(case_ids)} cases cannot fill 4 splits, use at least {MIN_CASES_PER_SITE} cases")

    sizes = {name: max(1, round(fraction * len(case_ids))) for name, fraction in SPLIT_FRACTIONS.items()}
    n_train = len(case_ids) - sum(sizes.values())
    splits = {"train": case_ids[:n_train]}
    start = n_train
    for name, size in sizes.items():
        splits[name] = case_ids[start : start + size]
        start += size
    return splits


def draw_experts(
    rng: np.random.Generator, image_size: int, ranges: ExpertRanges = ExpertRanges()
) -> list[dict[str, object]]:
    """Draw 2-3 simulated expert declarations in the site.toml schema.

    The first expert makes independent pixel errors with high accuracy, the second makes block-wise and
    boundary-shift errors, and the optional third makes independent pixel errors with lower accuracy.
    """
    n_experts = int(rng.integers(ranges.count[0], ranges.count[1] + 1))
    block_sizes = [size for size in ranges.block_sizes if size <= image_size // 4] or [min(ranges.block_sizes)]

    def capacity() -> float:
        return round(float(rng.uniform(*ranges.capacity)), 3)

    def expert_seed() -> int:
        return int(rng.integers(1, 2**31 - 1))

    def accuracy(bounds: tuple[float, float]) -> float:
        return round(float(rng.uniform(*bounds)), 3)

    experts: list[dict[str, object]] = [
        {
            "id": "sim-pixel",
            "capacity": capacity(),
            "profile": "pixel",
            "seed": expert_seed(),
            "foreground-accuracy": accuracy(ranges.senior_accuracy),
            "boundary-accuracy": accuracy(ranges.senior_accuracy),
            "background-accuracy": accuracy(ranges.background_accuracy),
            "boundary-width": int(rng.integers(ranges.boundary_width[0], ranges.boundary_width[1] + 1)),
        },
        {
            "id": "sim-block",
            "capacity": capacity(),
            "profile": "block",
            "seed": expert_seed(),
            "block-size": int(rng.choice(block_sizes)),
            "block-error-rate": accuracy(ranges.block_error_rate),
            "boundary-shift": int(rng.integers(ranges.boundary_shift[0], ranges.boundary_shift[1] + 1)),
        },
    ]
    if n_experts == 3:
        experts.append(
            {
                "id": "sim-junior",
                "capacity": capacity(),
                "profile": "pixel",
                "seed": expert_seed(),
                "foreground-accuracy": accuracy(ranges.junior_accuracy),
                "boundary-accuracy": accuracy(ranges.junior_accuracy),
                "background-accuracy": accuracy(ranges.background_accuracy),
                "boundary-width": int(rng.integers(ranges.boundary_width[0], ranges.boundary_width[1] + 1)),
            }
        )
    return experts


def _write_site(
    site_dir: Path, site_index: int, seed: int, rng: np.random.Generator, image_size: int, cases_per_site: int
) -> None:
    """Write the folder of the site with 0-based `site_index`: site.toml, images/ and reference/."""
    site_id = site_dir.name
    appearance = draw_appearance(rng, site_index)
    experts = draw_experts(rng, image_size)
    width = max(3, len(str(cases_per_site - 1)))
    case_ids = [f"case-{index:0{width}d}" for index in range(cases_per_site)]

    (site_dir / "images").mkdir(parents=True)
    (site_dir / "reference").mkdir()
    for case_id in case_ids:
        image, reference = generate_case(rng, appearance, image_size)
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(site_dir / "images" / f"{case_id}.png")
        Image.fromarray(reference * np.uint8(MASK_FOREGROUND_VALUE)).save(site_dir / "reference" / f"{case_id}.png")

    site_config = {
        "site-id": site_id,
        "in-channels": 1,
        "description": f"built-in synthetic site (seed {seed})",
        "splits": split_cases(case_ids),
        "experts": experts,
    }
    (site_dir / "site.toml").write_bytes(tomli_w.dumps(site_config).encode("utf-8"))
    logger.debug("wrote %s: %d cases, %d experts, %s", site_id, cases_per_site, len(experts), appearance)


def write_synthetic_sites(
    dst: Path,
    n_sites: int,
    seed: int,
    *,
    image_size: int = 64,
    cases_per_site: int = 24,
    overwrite: bool = False,
) -> list[Path]:
    """Write the site folders `dst/site-1` ... `dst/site-N` of a synthetic federation and return their paths.

    Each site draws its own appearance (contrast, noise, blur, intensity shift) and 2-3 simulated experts
    from `seed`, so the same arguments write byte-identical files. Site i's content depends only on `seed`
    and i, not on `n_sites`. Images are 8-bit PNG and reference masks are PNG with values 0 and 255. The
    whole image is the region of interest.

    Raises:
        ValueError: an argument is out of range.
        FileExistsError: a site folder exists and `overwrite` is False.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites={n_sites} is invalid because a federation needs at least 1 site")
    if seed < 0:
        raise ValueError(f"seed={seed} is invalid, use a non-negative integer")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is too small, use at least {MIN_IMAGE_SIZE} pixels")
    if cases_per_site < MIN_CASES_PER_SITE:
        raise ValueError(
            f"cases_per_site={cases_per_site} cannot fill the train, calibration, validation and test splits, "
            f"use at least {MIN_CASES_PER_SITE}"
        )

    dst = Path(dst)
    site_dirs = [dst / f"site-{index}" for index in range(1, n_sites + 1)]
    existing = [site_dir for site_dir in site_dirs if site_dir.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"site folder {existing[0]} already exists. Choose an empty destination or pass overwrite=True"
        )
    for site_dir in existing:
        shutil.rmtree(site_dir)

    # One child seed per site, so adding sites leaves the earlier ones unchanged.
    site_seeds = np.random.SeedSequence(seed).spawn(n_sites)
    for site_index, (site_dir, site_seed) in enumerate(zip(site_dirs, site_seeds)):
        _write_site(site_dir, site_index, seed, np.random.default_rng(site_seed), image_size, cases_per_site)

    logger.info(
        "wrote %d synthetic sites to %s (seed %d, %d cases of %dx%d each)",
        n_sites, dst, seed, cases_per_site, image_size, image_size,
    )
    return site_dirs


def builtin_sites(n_sites: int, seed: int, root: Path | None = None) -> list[Path]:
    """Return the built-in synthetic sites for ``(n_sites, seed)``, writing them on first use.

    Several site processes may call this at once (each virtual node of a Flower-native simulation does), so
    the sites are written into a private folder and moved into place with one rename; a process that loses
    the race uses the winner's identical copy.
    """
    base = Path(root) if root is not None else Path(tempfile.gettempdir()) / "deferredseg-builtin"
    final = base / f"sites-{n_sites}-seed-{seed}"
    if not final.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=base))
        write_synthetic_sites(scratch / "sites", n_sites=n_sites, seed=seed)
        try:
            os.rename(scratch / "sites", final)
        except OSError:
            if not final.is_dir():
                raise
        shutil.rmtree(scratch, ignore_errors=True)
    return [final / f"site-{index + 1}" for index in range(n_sites)]
