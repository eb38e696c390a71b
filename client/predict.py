"""Prediction at a site with a finished run: model masks, capacity-bounded deferral maps and review lists."""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from client.app import SiteState
from client.engine import predict, select_device
from client.overlays import expert_colours, write_overlay
from client.sitedata import SiteData, open_site
from common.config import RunSettings, SiteEntry, load_federation
from common.imageio import image_suffix, is_supported, read_image_slices, write_png
from common.metrics import FOREGROUND_THRESHOLD, MODEL_OWNER, owner_counts
from common.model import DeferredSegNet, load_partial_state
from common.routing import assign_with_capacity, softmax_scores
from common.site import IMAGES_DIR
from common.site import normalize_image
from common.weights import load_weights

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
FEDERATION_FILE = "federation.toml"
SUMMARY_FILE = "summary.json"
FINAL_WEIGHTS_FILE = "model-final.safetensors"
CHECKPOINTS_DIR = "checkpoints"
REVIEW_FILE = "review.csv"
LEGEND_FILE = "deferral_legend.json"
OVERLAYS_DIR = "overlays"
REVIEW_COLUMNS = ("case", "source", "expert", "pixels", "roi_pixels", "roi_fraction", "capacity")

# A palette PNG has 256 entries, and index 0 is the model.
MAX_PALETTE_EXPERTS = 255
_EXPERT_HEADS_WEIGHT = "expert_heads.weight"


@dataclass
class PredictionInput:
    """One image to predict.

    Attributes:
        case_id: the case id; it names the output files.
        image: float32 ``CHW`` image, normalized per channel over the ROI as site cases are.
        roi: bool ``HW`` region of interest; the whole image for a new image.
        source: the file the image came from, for the review list.
        reference: uint8 ``HW`` reference mask when the case has one (site splits), else ``None``.
    """

    case_id: str
    image: np.ndarray
    roi: np.ndarray
    source: str
    reference: np.ndarray | None = None


@dataclass
class SitePredictor:
    """A run's network with one site's local heads, and the experts and capacities those heads route to.

    Attributes:
        model: the network, shared weights of ``round`` (or the chosen round) plus the site's local heads.
        settings: the run's settings (network, training, inference window).
        site: the site, with the experts of the run (site.toml re-read, plus federation overrides).
        round: the round whose shared weights are loaded.
        heads_path: the local-heads file that was loaded.
    """

    model: DeferredSegNet
    settings: RunSettings
    site: SiteData
    round: int
    heads_path: Path


@dataclass
class ImagePrediction:
    """Outputs for one image.

    Attributes:
        model_pred: bool ``HW`` model mask (probability above the foreground threshold, inside the ROI).
        owner: int64 ``HW`` owner map after the capacity cap: ``-1`` (model) or the expert index.
        counts: int64 ``K`` pixels deferred to each expert.
        roi_pixels: number of ROI pixels.
    """

    model_pred: np.ndarray
    owner: np.ndarray
    counts: np.ndarray
    roi_pixels: int


@dataclass(frozen=True)
class ReviewRow:
    """One line of the review list: the pixels of one image that one expert should review."""

    case: str
    source: str
    expert: str
    pixels: int
    roi_pixels: int
    roi_fraction: float
    capacity: float


def _require_file(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix}")
    return path


def _chosen_round(run_dir: Path) -> int:
    summary_path = _require_file(
        run_dir / SUMMARY_FILE,
        "the run did not finish; pass --round N to use checkpoints/round-N of an unfinished run",
    )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if "chosen_round" not in summary:
        raise ValueError(f"{summary_path} has no chosen_round; pass --round N to pick a round")
    return int(summary["chosen_round"])


def _shared_weights_path(run_dir: Path, round_number: int | None) -> Path:
    if round_number is None:
        return _require_file(run_dir / FINAL_WEIGHTS_FILE, "the run did not finish; pass --round N to use a checkpoint")

    path = run_dir / CHECKPOINTS_DIR / f"round-{round_number:04d}.safetensors"
    if not path.is_file():
        available = sorted(p.stem for p in (run_dir / CHECKPOINTS_DIR).glob("round-*.safetensors"))
        raise FileNotFoundError(
            f"{path} not found; pick one of the run's checkpoints {available or 'none'} with --round"
        )
    return path


def _site_entry(run_dir: Path, site_dir: Path) -> SiteEntry | None:
    """Return the ``[[sites]]`` entry of the run's federation file whose ``dir`` is ``site_dir``, or ``None``."""
    federation = load_federation(
        _require_file(run_dir / FEDERATION_FILE, "pass the folder that `deferredseg simulate --out` wrote as --run")
    )
    for entry in federation.sites:
        if entry.site_dir is not None and entry.site_dir.resolve() == site_dir.resolve():
            return entry
    return None


def _heads_file(state: SiteState, round_number: int) -> Path:
    """Return the heads of ``round_number``, or the newest earlier ones when the site missed that round."""
    path = state.heads_path(round_number)
    if path.is_file():
        return path

    earlier = state.latest_heads(round_number)
    if earlier is None:
        raise FileNotFoundError(
            f"no local heads of round {round_number} or earlier in {state.root / 'heads'}; pass the site's "
            "state folder of this run with --state-dir"
        )
    # The site skipped or failed that round, so its evaluation used the newest earlier heads too.
    logger.warning("site missed round %d; using the local heads %s", round_number, earlier)
    return earlier


def load_site_predictor(
    run_dir: Path,
    site_dir: Path,
    state_dir: Path | None = None,
    round_number: int | None = None,
    device: torch.device | None = None,
) -> SitePredictor:
    """Load a finished run's shared weights and one site's local heads.

    Args:
        run_dir: the run folder written by ``deferredseg simulate``; its name is the run name.
        site_dir: the site folder.
        state_dir: the site's state folder; ``None`` takes ``state-dir`` of the run's ``[[sites]]`` entry whose
            ``dir`` is ``site_dir``.
        round_number: load ``checkpoints/round-N`` and the heads of round N; ``None`` loads
            ``model-final.safetensors`` and the heads of the chosen round in ``summary.json``.
        device: where the model is placed; ``None`` selects from the run's device setting.

    Raises:
        FileNotFoundError: a run file or the heads are missing; the message names the file and the fix.
        ValueError: the site's experts no longer match the heads, or another setting is invalid.
    """
    run_dir = Path(run_dir).resolve()
    site_dir = Path(site_dir).resolve()
    settings = RunSettings.from_json(
        _require_file(run_dir / SETTINGS_FILE, "pass the folder that `deferredseg simulate --out` wrote as --run")
        .read_text(encoding="utf-8")
    )
    shared_path = _shared_weights_path(run_dir, round_number)
    heads_round = round_number if round_number is not None else _chosen_round(run_dir)

    entry = _site_entry(run_dir, site_dir)
    if state_dir is None:
        if entry is None or entry.state_dir is None:
            raise ValueError(
                f"{run_dir / FEDERATION_FILE} names no state-dir for site {site_dir}; pass the site's state "
                "folder with --state-dir"
            )
        state_dir = entry.state_dir
    elif entry is None:
        logger.warning("site %s is not in %s; using the experts of its site.toml only", site_dir, FEDERATION_FILE)

    site = open_site(site_dir, entry)
    if site.spec.in_channels != settings.network.in_channels:
        raise ValueError(
            f"site {site_dir} has in-channels {site.spec.in_channels}, the run's network takes "
            f"{settings.network.in_channels}; predict with the run this site took part in"
        )

    heads_path = _heads_file(SiteState(Path(state_dir), run_dir.name), heads_round)
    heads = load_weights(heads_path)
    head_experts = int(heads[_EXPERT_HEADS_WEIGHT].shape[0]) if _EXPERT_HEADS_WEIGHT in heads else 0
    if head_experts != len(site.experts):
        raise ValueError(
            f"{heads_path} routes to {head_experts} experts, but the site now declares {len(site.experts)} "
            f"({', '.join(site.expert_ids) or 'none'}, site.toml plus federation overrides); restore the expert "
            "list of the run, or train a new run"
        )

    model = DeferredSegNet(settings.network, num_experts=len(site.experts))
    load_partial_state(model, load_weights(shared_path), "shared")
    load_partial_state(model, heads, "local")
    model.to(device or select_device(settings.train.device)).eval()
    logger.info("loaded %s and %s for site %s", shared_path, heads_path, site.site_id)
    return SitePredictor(model, settings, site, heads_round, heads_path)


def _image_to_chw(path: Path, array: np.ndarray, in_channels: int) -> np.ndarray:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{path}: image dtype {array.dtype} is not numeric; store pixel values as numbers")
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: image has shape {array.shape}, expected HW or HWC; export a 2D image")

    chw = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if chw.shape[0] != in_channels:
        raise ValueError(
            f"{path}: image has {chw.shape[0]} channel(s), the run's network takes {in_channels}; convert the "
            "image (for example grayscale to RGB, or drop an alpha channel)"
        )
    return chw.astype(np.float32)


def read_new_images(pattern: str, in_channels: int, slice_axis: int) -> list[PredictionInput]:
    """Read every supported image that ``pattern`` (a glob, ``**`` allowed) matches, sorted by path.

    A new image has no ROI file, so its ROI is the whole image, and it is normalized over all its pixels.
    A 3D NIfTI volume gives one input per slice along ``slice_axis``.

    Raises:
        ValueError: nothing matches, two files give the same case id, or an image has another channel count
            than ``in_channels``.
        ImageReadError: a file cannot be read.
    """
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    skipped = [p for p in paths if not is_supported(p)]
    if skipped:
        logger.warning("skipping %d files with unsupported extensions, e.g. %s", len(skipped), skipped[0])
    paths = [p for p in paths if is_supported(p)]
    if not paths:
        raise ValueError(f"--images {pattern!r} matches no image file; quote the pattern and check the folder")

    inputs: list[PredictionInput] = []
    seen: dict[str, Path] = {}
    for path in paths:
        for case_id, array in read_image_slices(path, slice_axis):
            if case_id in seen:
                raise ValueError(
                    f"{seen[case_id]} and {path} both give case id {case_id!r}, and outputs are named by case id; "
                    "rename one of them"
                )
            seen[case_id] = path
            image = _image_to_chw(path, array, in_channels)
            roi = np.ones(image.shape[1:], dtype=bool)
            inputs.append(PredictionInput(case_id, normalize_image(image, roi), roi, str(path)))
    return inputs


def _case_source(site: SiteData, case_id: str) -> str:
    """Return the site's image file of a case, or the images folder for a slice of a volume."""
    images = site.spec.root / IMAGES_DIR
    for path in sorted(images.glob(f"{glob.escape(case_id)}.*")):
        if is_supported(path) and path.name[: -len(image_suffix(path))] == case_id:
            return str(path)
    return str(images)


def split_inputs(site: SiteData, split: str = "test") -> list[PredictionInput]:
    """Return the cases of a site split as prediction inputs, with their ROI and reference."""
    return [
        PredictionInput(case.case_id, case.image, case.roi, _case_source(site, case.case_id), case.reference)
        for case in site.split(split)
    ]


def predict_image(predictor: SitePredictor, item: PredictionInput) -> ImagePrediction:
    """Predict one image and route its ROI pixels to the model or an expert, within each expert's capacity.

    Every expert counts as available, because a new image has no annotation yet and any expert may review it.
    Pixels outside the ROI stay with the model and are background in the model mask.

    Raises:
        ValueError: the image's channel count differs from the network's in-channels.
    """
    in_channels = predictor.settings.network.in_channels
    if item.image.ndim != 3 or item.image.shape[0] != in_channels:
        raise ValueError(
            f"{item.source}: image has shape {item.image.shape}, the network takes {in_channels} channel(s) "
            "(CHW); convert the image"
        )

    device = next(predictor.model.parameters()).device
    prob, routing_logits, _, _ = predict(predictor.model, item.image, predictor.settings.train, device)
    roi = torch.as_tensor(item.roi, dtype=torch.bool)
    model_pred = (prob > FOREGROUND_THRESHOLD) & roi

    # NOTE: prices are taken as zero, because the run folder keeps no price ledger that this code reads yet.
    # With prices, an overloaded expert's pixels would move to the next channel earlier.
    scores = softmax_scores(routing_logits)
    capacity = torch.tensor(predictor.site.capacity, dtype=torch.float64)
    routing = assign_with_capacity(scores, roi, capacity)

    num_experts = len(predictor.site.experts)
    return ImagePrediction(
        model_pred=model_pred.numpy(),
        owner=routing.owner.numpy(),
        counts=owner_counts(routing.owner, num_experts).numpy(),
        roi_pixels=int(roi.sum()),
    )


def write_deferral_png(path: Path, owner: np.ndarray, num_experts: int) -> None:
    """Write an owner map as a palette PNG: index 0 is the model and index k+1 is expert k, in expert k's colour."""
    if num_experts > MAX_PALETTE_EXPERTS:
        raise ValueError(f"a palette PNG stores at most {MAX_PALETTE_EXPERTS} experts, the site has {num_experts}")
    owner = np.asarray(owner)
    if owner.size and (owner.min() < MODEL_OWNER or owner.max() >= num_experts):
        raise ValueError(f"owner values span {owner.min()}..{owner.max()}, outside -1..{num_experts - 1}")

    indices = (owner - MODEL_OWNER).astype(np.uint8)
    palette = np.zeros((num_experts + 1, 3), dtype=np.uint8)
    palette[1:] = expert_colours(num_experts)
    picture = Image.fromarray(indices)
    picture.putpalette(palette.flatten().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")


def deferral_legend(site: SiteData) -> dict:
    """Return the legend of the deferral maps: palette index, owner and colour of each index."""
    colours = expert_colours(len(site.experts))
    entries = [{"index": 0, "owner": "model", "colour": [0, 0, 0]}]
    for k, expert in enumerate(site.experts):
        entries.append(
            {
                "index": k + 1,
                "owner": expert.id,
                "simulated": expert.simulated,
                "capacity": expert.capacity,
                "colour": [int(c) for c in colours[k]],
            }
        )
    return {"site": site.site_id, "indices": entries}


def review_rows(predictor: SitePredictor, item: PredictionInput, prediction: ImagePrediction) -> list[ReviewRow]:
    """Return one row per expert with deferred pixels on this image; experts with none get no row."""
    rows = []
    for k, expert in enumerate(predictor.site.experts):
        pixels = int(prediction.counts[k])
        if pixels == 0:
            continue
        rows.append(
            ReviewRow(
                case=item.case_id,
                source=item.source,
                expert=expert.id,
                pixels=pixels,
                roi_pixels=prediction.roi_pixels,
                roi_fraction=pixels / prediction.roi_pixels,
                capacity=expert.capacity,
            )
        )
    return rows


def write_predictions(
    predictor: SitePredictor, inputs: Sequence[PredictionInput], out_dir: Path, overlays: bool = False
) -> list[ReviewRow]:
    """Predict every input and write the outputs into ``out_dir``.

    Writes ``<case>_model.png`` (model mask, 0/255), ``<case>_deferral.png`` (palette owner map),
    ``deferral_legend.json``, ``review.csv`` and, with ``overlays``, ``overlays/<case>.png``. The review list
    and the legend name the real experts, so these files stay at the site.

    Returns:
        The rows written to ``review.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_experts = len(predictor.site.experts)

    rows: list[ReviewRow] = []
    for item in inputs:
        prediction = predict_image(predictor, item)
        write_png(out_dir / f"{item.case_id}_model.png", prediction.model_pred)
        write_deferral_png(out_dir / f"{item.case_id}_deferral.png", prediction.owner, num_experts)
        if overlays:
            write_overlay(
                out_dir / OVERLAYS_DIR / f"{item.case_id}.png",
                item.image,
                item.reference,
                prediction.model_pred,
                prediction.owner,
                predictor.site.expert_ids,
            )
        rows.extend(review_rows(predictor, item, prediction))
        logger.info(
            "%s: %d of %d ROI pixels deferred", item.case_id, int(prediction.counts.sum()), prediction.roi_pixels
        )

    legend_path = out_dir / LEGEND_FILE
    legend_path.write_text(json.dumps(deferral_legend(predictor.site), indent=2) + "\n", encoding="utf-8")
    with (out_dir / REVIEW_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REVIEW_COLUMNS)
        for row in rows:
            writer.writerow(
                [row.case, row.source, row.expert, row.pixels, row.roi_pixels, f"{row.roi_fraction:.6f}", row.capacity]
            )
    return rows
