"""PNG overlays of one case for review at the site: image, reference, model prediction and deferral map."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from common.metrics import MODEL_OWNER

logger = logging.getLogger(__name__)

# Matplotlib's tab10 colours come first because they are well separated. The light shades of tab20 follow,
# so 20 experts get distinct colours, and the list repeats from the 21st expert on.
_FIRST_COLORMAP = "tab10"
_SECOND_COLORMAP = "tab20"

@dataclass(frozen=True)
class OverlayStyle:
    """Layout of an overlay figure.

    Args:
        panel_inches: width and height of each of the four panels, in inches.
        legend_inches: height of the legend strip under the panels, in inches.
        dpi: resolution of the PNG, in pixels per inch.
        display_percentiles: low and high percentiles of the image intensities mapped to black and white, so
            a few extreme pixels do not wash out the display.
    """

    panel_inches: float = 3.0
    legend_inches: float = 0.6
    dpi: int = 100
    display_percentiles: tuple[float, float] = (1.0, 99.0)

    def __post_init__(self) -> None:
        if self.panel_inches <= 0 or self.legend_inches < 0 or self.dpi < 1:
            raise ValueError(
                f"invalid overlay style: panel_inches={self.panel_inches}, legend_inches={self.legend_inches}, "
                f"dpi={self.dpi}; sizes must be positive and dpi at least 1"
            )
        low, high = self.display_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"display_percentiles {self.display_percentiles} must satisfy 0 <= low < high <= 100")


def expert_colours(num_experts: int) -> np.ndarray:
    """Return the fixed display colour of each expert index, uint8 ``K x 3`` RGB.

    Expert k gets the same colour whatever the number of experts, in overlays and in the palette of
    deferral-map PNGs. Colours repeat from the 21st expert on.
    """
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")

    first = colormaps[_FIRST_COLORMAP]
    second = colormaps[_SECOND_COLORMAP]
    table = [first(i)[:3] for i in range(first.N)] + [second(i)[:3] for i in range(1, second.N, 2)]
    rgb = np.array([table[k % len(table)] for k in range(num_experts)], dtype=np.float64).reshape(-1, 3)
    return np.round(rgb * 255).astype(np.uint8)


def colour_deferral_map(owner: np.ndarray, num_experts: int, background: np.ndarray | None = None) -> np.ndarray:
    """Colour an owner map: expert k's pixels take expert k's colour, model pixels the background.

    Args:
        owner: int ``HW`` owner map, ``-1`` (model) or an expert index in ``0..K-1``.
        num_experts: K.
        background: uint8 ``HW`` grey or ``HW3`` RGB image shown under the model pixels; ``None`` means black.

    Returns:
        uint8 ``HW3`` RGB image.
    """
    owner = np.asarray(owner)
    if owner.ndim != 2:
        raise ValueError(f"owner must be HW, got shape {owner.shape}")
    if owner.size and (owner.min() < MODEL_OWNER or owner.max() >= num_experts):
        raise ValueError(
            f"owner contains values in [{owner.min()}, {owner.max()}], but only {MODEL_OWNER} (model) and expert "
            f"indices 0..{num_experts - 1} are valid"
        )

    if background is None:
        rgb = np.zeros((*owner.shape, 3), dtype=np.uint8)
    else:
        background = np.asarray(background)
        if background.shape[:2] != owner.shape or background.ndim not in (2, 3):
            raise ValueError(f"background has shape {background.shape}, expected HW or HW3 with HW = {owner.shape}")
        grey = background if background.ndim == 3 else np.repeat(background[..., None], 3, axis=2)
        rgb = grey.astype(np.uint8).copy()

    deferred = owner != MODEL_OWNER
    rgb[deferred] = expert_colours(num_experts)[owner[deferred]]
    return rgb


def display_image(image: np.ndarray, percentiles: tuple[float, float] = OverlayStyle.display_percentiles) -> np.ndarray:
    """Rescale a normalized ``CHW`` image to uint8 for display: ``HW3`` RGB for 3 channels, grey ``HW`` otherwise.

    Other channel counts are shown as the mean over channels. Each displayed channel is stretched from its
    low to its high percentile.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"image must be CHW, got shape {image.shape}")

    planes = image if image.shape[0] == 3 else image.mean(axis=0, keepdims=True)
    scaled = np.empty(planes.shape, dtype=np.uint8)
    for index, plane in enumerate(planes):
        low, high = np.percentile(plane, percentiles)
        span = high - low
        unit = np.clip((plane - low) / span, 0.0, 1.0) if span > 0 else np.zeros_like(plane)
        scaled[index] = np.round(unit * 255).astype(np.uint8)
    return np.moveaxis(scaled, 0, -1) if scaled.shape[0] == 3 else scaled[0]


def _grey(display: np.ndarray) -> np.ndarray:
    """Grey ``HW`` uint8 version of a display image (luma weights of ITU-R BT.601 for RGB)."""
    if display.ndim == 2:
        return display
    return np.round(display @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)


def write_overlay(
    path: Path,
    image: np.ndarray,
    reference: np.ndarray | None,
    model_pred: np.ndarray,
    owner: np.ndarray,
    expert_ids: Sequence[str],
    style: OverlayStyle | None = None,
) -> None:
    """Write one PNG with four panels side by side and a legend of the expert colours under them.

    The panels are the image, the reference mask, the model prediction and the deferral map. The deferral map
    draws each deferred pixel in its expert's colour over the grey image, and leaves model pixels uncoloured.
    The figure is built without pyplot, so writing overlays from worker threads or processes needs no
    display and shares no global state.

    Args:
        path: the PNG file to write; its folder is created.
        image: normalized float ``CHW`` image.
        reference: ``HW`` reference mask (nonzero is foreground), or ``None`` for a new image without one.
        model_pred: bool ``HW`` model prediction (thresholded probability).
        owner: int ``HW`` owner map after the capacity cap, ``-1`` (model) or the expert index.
        expert_ids: expert ids in routing-channel order; these are real names, so overlays stay at the site.
        style: figure layout; ``None`` uses :class:`OverlayStyle` defaults.
    """
    style = style or OverlayStyle()
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be CHW, got shape {image.shape}")
    shape = image.shape[1:]
    for name, array in (("reference", reference), ("model_pred", model_pred), ("owner", owner)):
        if array is not None and np.asarray(array).shape != shape:
            raise ValueError(f"{name} has shape {np.asarray(array).shape}, the image is {shape} (HW)")

    display = display_image(image, style.display_percentiles)
    deferral = colour_deferral_map(np.asarray(owner), len(expert_ids), background=_grey(display))

    figure = Figure(figsize=(4 * style.panel_inches, style.panel_inches + style.legend_inches), dpi=style.dpi)
    bottom = style.legend_inches / (style.panel_inches + style.legend_inches)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=bottom, wspace=0.04)
    axes = figure.subplots(1, 4)

    # (title, data, colormap, value shown as white); RGB panels take no colormap.
    panels = [
        ("image", display, "gray" if display.ndim == 2 else None, 255),
        ("reference", None if reference is None else np.asarray(reference) != 0, "gray", 1),
        ("model prediction", np.asarray(model_pred, dtype=bool), "gray", 1),
        ("deferral", deferral, None, 255),
    ]
    for axis, (title, data, cmap, white) in zip(axes, panels):
        axis.set_axis_off()
        axis.set_title(title, fontsize="small")
        if data is None:
            axis.imshow(np.zeros(shape), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axis.text(0.5, 0.5, "no reference", color="white", ha="center", va="center", transform=axis.transAxes)
        elif cmap is None:
            axis.imshow(data, interpolation="nearest")
        else:
            axis.imshow(data, cmap=cmap, vmin=0, vmax=white, interpolation="nearest")

    colours = expert_colours(len(expert_ids)) / 255.0
    handles = [Patch(facecolor="none", edgecolor="black", label="model (uncoloured)")]
    handles += [Patch(facecolor=colour, label=expert_id) for colour, expert_id in zip(colours, expert_ids)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize="small", frameon=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    logger.debug("wrote overlay %s", path)
