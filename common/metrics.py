"""Evaluation metrics for deferral: Dice inside the ROI, workload, oracle routing and the confidence baseline."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_dice, compute_iou, get_confusion_matrix
from scipy import ndimage

logger = logging.getLogger(__name__)

MODEL_OWNER = -1
"""Owner-map value of a pixel the model keeps. Values 0..K-1 name the expert a pixel is deferred to."""

FOREGROUND_THRESHOLD = 0.5
"""A pixel is foreground in the model prediction when its foreground probability exceeds this value."""

VIOLATION_TOLERANCE = 1e-12
"""Slack on ``load > capacity`` when violations are recounted, so float rounding alone never counts as one."""

ORACLE_GAIN_TOLERANCE = 1e-12
"""Oracle Dice gains at or below this value count as no gain, which makes the share of the oracle gain 0.0."""

SCORE_NAMES = ("dice", "iou", "sensitivity")


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------------


def _check_hw(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be an HW tensor, got shape {tuple(tensor.shape)}")


def _check_same_shape(first_name: str, first: torch.Tensor, /, **others: torch.Tensor) -> None:
    for name, tensor in others.items():
        _check_hw(name, tensor)
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape {tuple(first.shape)}. "
                "All maps of one image must have the same size"
            )


def _check_expert_masks(expert_masks: torch.Tensor, image_shape: torch.Size) -> int:
    if expert_masks.dim() != 3 or expert_masks.shape[1:] != image_shape:
        raise ValueError(
            f"expert_masks must be KHW with HW = {tuple(image_shape)}, got shape {tuple(expert_masks.shape)}"
        )
    return expert_masks.shape[0]


def _check_expert_vector(name: str, tensor: torch.Tensor, num_experts: int) -> None:
    if tensor.dim() != 1 or tensor.numel() != num_experts:
        raise ValueError(f"{name} must have one entry per expert (K = {num_experts}), got shape {tuple(tensor.shape)}")


def _check_capacity(capacity: torch.Tensor) -> None:
    if capacity.dim() != 1:
        raise ValueError(f"capacity must be a K tensor, got shape {tuple(capacity.shape)}")
    invalid = (capacity <= 0) | (capacity > 1) | torch.isnan(capacity)
    if invalid.any():
        raise ValueError(
            f"capacity must lie in (0, 1] (a fraction of the ROI), got {capacity.tolist()}. "
            "Fix the expert capacities in site.toml or the federation file"
        )


def _check_owner(name: str, owner: torch.Tensor, roi: torch.Tensor, num_experts: int) -> None:
    if owner.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 owner map, got dtype {owner.dtype}")
    if owner.numel() == 0:
        return
    low, high = int(owner.min()), int(owner.max())
    if low < MODEL_OWNER or high >= num_experts:
        raise ValueError(
            f"{name} contains values in [{low}, {high}], but only {MODEL_OWNER} (model) and expert indices "
            f"0..{num_experts - 1} are valid"
        )
    if (owner[~roi] != MODEL_OWNER).any():
        raise ValueError(f"{name} defers pixels outside the ROI, but pixels outside the ROI must stay {MODEL_OWNER}")


def _check_owner_available(name: str, owner: torch.Tensor, expert_available: torch.Tensor) -> None:
    counts = owner_counts(owner, expert_available.numel())
    receiving = (counts > 0) & ~expert_available.to(counts.device)
    if receiving.any():
        raise ValueError(
            f"{name} defers pixels to experts {torch.nonzero(receiving).flatten().tolist()}, "
            "who did not annotate this case. Route only to available experts"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------------------------------


def capacity_budget(capacity: torch.Tensor, n_roi: int) -> torch.Tensor:
    """Compute each expert's per-image pixel budget, ``floor(capacity * n_roi)``.

    The budget is the largest integer ``b`` with ``b / n_roi <= capacity`` in float64 arithmetic, so any
    routing that respects it has ``load <= capacity`` exactly. A float64 capacity of 0.29 on 100
    ROI pixels gives 29, although ``0.29 * 100`` rounds to 28.999999999999996. A float32 capacity is widened
    to float64 first and may then lose one pixel (float32 0.29 is below 0.29), so pass float64 capacities.

    Args:
        capacity: ``K`` capacities in (0, 1], fractions of the ROI.
        n_roi: number of ROI pixels of the image, >= 0.

    Returns:
        int64 ``K`` budgets on the device of ``capacity``.
    """
    _check_capacity(capacity)
    if n_roi < 0:
        raise ValueError(f"n_roi must be >= 0, got {n_roi}")

    if n_roi == 0:
        return torch.zeros(capacity.shape, dtype=torch.int64, device=capacity.device)

    # The floor of the rounded product can be one off in either direction, so fix it against the division.
    capacity64 = capacity.to(torch.float64)
    budget = torch.floor(capacity64 * n_roi)
    budget = torch.where(budget / n_roi > capacity64, budget - 1, budget)
    budget = torch.where((budget + 1) / n_roi <= capacity64, budget + 1, budget)
    return budget.to(torch.int64)


def owner_counts(owner: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count the pixels deferred to each expert.

    Args:
        owner: int64 ``HW`` owner map, ``MODEL_OWNER`` (-1) or an expert index per pixel.
        num_experts: K.

    Returns:
        int64 ``K`` pixel counts on the device of ``owner``.
    """
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")
    if owner.numel() and (int(owner.min()) < MODEL_OWNER or int(owner.max()) >= num_experts):
        raise ValueError(
            f"owner contains values in [{int(owner.min())}, {int(owner.max())}], but only {MODEL_OWNER} (model) "
            f"and expert indices 0..{num_experts - 1} are valid"
        )

    deferred = owner[owner != MODEL_OWNER]
    return torch.bincount(deferred.flatten(), minlength=num_experts).to(torch.int64)


def capacity_violations(owner: torch.Tensor, roi: torch.Tensor, capacity: torch.Tensor) -> int:
    """Count the experts whose load in this owner map exceeds their capacity.

    Load is recounted from the map as (pixels deferred to the expert) / (ROI pixels). An expert violates
    capacity when load > capacity + ``VIOLATION_TOLERANCE``. An empty ROI has no violations.

    Args:
        owner: int64 ``HW`` owner map after the capacity cap.
        roi: bool ``HW`` region of interest.
        capacity: ``K`` capacities in (0, 1].

    Returns:
        Number of experts over capacity on this image.
    """
    _check_hw("owner", owner)
    _check_same_shape("owner", owner, roi=roi)
    _check_capacity(capacity)
    roi = roi.to(device=owner.device, dtype=torch.bool)
    _check_owner("owner", owner, roi, capacity.numel())

    n_roi = int(roi.sum())
    if n_roi == 0:
        return 0
    load = owner_counts(owner, capacity.numel()).to(torch.float64) / n_roi
    over = load > capacity.to(device=owner.device, dtype=torch.float64) + VIOLATION_TOLERANCE
    return int(over.sum())


def count_regions(mask: torch.Tensor) -> int:
    """Count the connected regions of a bool ``HW`` mask.

    Uses ``scipy.ndimage.label`` with 8-connectivity, so pixels that touch only at a corner form one region.
    """
    _check_hw("mask", mask)
    structure = np.ones((3, 3), dtype=bool)
    _, num_regions = ndimage.label(mask.detach().cpu().numpy().astype(bool), structure=structure)
    return int(num_regions)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation scores
# ---------------------------------------------------------------------------------------------------------------------


def segmentation_scores(pred: torch.Tensor, reference: torch.Tensor, roi: torch.Tensor) -> dict[str, float]:
    """Compute Dice, IoU and sensitivity of a binary prediction inside the ROI with MONAI.

    Both masks are set to background outside the ROI. Nonzero values are foreground. Empty cases, where
    MONAI returns NaN or the score is undefined, are defined as follows:
    reference and prediction both empty in the ROI: dice = iou = sensitivity = 1.0 (nothing to find, nothing
    found). Reference empty but prediction not: all three are 0.0.

    Args:
        pred: ``HW`` binary prediction (bool or {0, 1}), not probabilities.
        reference: ``HW`` binary reference mask.
        roi: ``HW`` bool region of interest.

    Returns:
        ``{"dice": ..., "iou": ..., "sensitivity": ...}`` as Python floats.
    """
    _check_hw("pred", pred)
    _check_same_shape("pred", pred, reference=reference, roi=roi)

    roi = roi.to(device=pred.device, dtype=torch.bool)
    pred_in_roi = ((pred != 0) & roi).float()[None, None]
    reference_in_roi = ((reference.to(pred.device) != 0) & roi).float()[None, None]

    if not reference_in_roi.any():
        empty_score = 0.0 if pred_in_roi.any() else 1.0
        return {name: empty_score for name in SCORE_NAMES}

    # ignore_empty only matters for an empty reference, which is handled above.
    dice = compute_dice(pred_in_roi, reference_in_roi, include_background=True, ignore_empty=False)
    iou = compute_iou(pred_in_roi, reference_in_roi, include_background=True, ignore_empty=False)
    confusion = get_confusion_matrix(pred_in_roi, reference_in_roi, include_background=True)
    sensitivity = compute_confusion_matrix_metric("sensitivity", confusion)
    return {"dice": float(dice.item()), "iou": float(iou.item()), "sensitivity": float(sensitivity.item())}


def system_prediction(model_pred: torch.Tensor, owner: torch.Tensor, expert_masks: torch.Tensor) -> torch.Tensor:
    """Build the system prediction: the expert's label where a pixel is deferred, the model's elsewhere.

    Args:
        model_pred: ``HW`` binary model prediction (bool or {0, 1}).
        owner: int64 ``HW`` owner map.
        expert_masks: ``KHW`` binary expert masks.

    Returns:
        bool ``HW`` system prediction on the device of ``model_pred``.
    """
    _check_hw("model_pred", model_pred)
    _check_same_shape("model_pred", model_pred, owner=owner)
    num_experts = _check_expert_masks(expert_masks, model_pred.shape)
    owner = owner.to(model_pred.device)
    _check_owner("owner", owner, torch.ones_like(owner, dtype=torch.bool), num_experts)

    model_label = model_pred != 0
    deferred = owner != MODEL_OWNER
    if num_experts == 0:
        return model_label

    expert_label = torch.gather(expert_masks.to(model_pred.device) != 0, 0, owner.clamp(min=0)[None])[0]
    return torch.where(deferred, expert_label, model_label)


# ---------------------------------------------------------------------------------------------------------------------
# Oracle routing and confidence baseline
# ---------------------------------------------------------------------------------------------------------------------


def _claim_single_fixer_pixels(fixable: np.ndarray, single: np.ndarray, owner: np.ndarray, remaining: np.ndarray) -> None:
    """Give each expert the pixels only it can fix, in pixel-index order, up to its remaining budget."""
    for expert in range(fixable.shape[0]):
        pixels = np.flatnonzero(single & fixable[expert])[: remaining[expert]]
        owner[pixels] = expert
        remaining[expert] -= pixels.size


def _claim_shared_pixels(
    fixable: np.ndarray,
    shared: np.ndarray,
    fixer_counts: np.ndarray,
    owner: np.ndarray,
    remaining: np.ndarray,
) -> None:
    """Give pixels that several experts can fix, fewest fixers first, to the right expert with most budget left."""
    candidates = np.flatnonzero(shared)
    candidates = candidates[np.argsort(fixer_counts[candidates], kind="stable")]
    budgets = remaining.tolist()
    rows = fixable[:, candidates].T.tolist()

    for pixel, can_fix in zip(candidates.tolist(), rows):
        if not any(budgets):
            break
        chosen = MODEL_OWNER
        for expert, right in enumerate(can_fix):
            # Strictly greater keeps the lowest index on ties.
            if right and budgets[expert] > 0 and (chosen == MODEL_OWNER or budgets[expert] > budgets[chosen]):
                chosen = expert
        if chosen != MODEL_OWNER:
            owner[pixel] = chosen
            budgets[chosen] -= 1

    remaining[:] = budgets


def oracle_assignment(
    model_pred: torch.Tensor,
    reference: torch.Tensor,
    expert_masks: torch.Tensor,
    expert_available: torch.Tensor,
    roi: torch.Tensor,
    capacity: torch.Tensor,
) -> torch.Tensor:
    """Route one image with the reference in hand: the best routing under the same capacities.

    Only ROI pixels where the model is wrong and some available expert is right are deferred, so the oracle
    never defers a pixel the model gets right and never sends a pixel to an expert who is wrong on it. Each
    expert receives at most ``capacity_budget(capacity, n_roi)`` pixels. The greedy pass runs in this order:

    1. pixels that exactly one expert can fix, in pixel-index order (row-major), each to that expert while its
       budget lasts;
    2. pixels that several experts can fix, by number of such experts (fewest first), then by pixel index,
       each to the expert right on it with the most remaining budget, ties to the lower expert index.

    Claiming single-fixer pixels first keeps flexible pixels from using up the budget of the only expert
    who could fix another pixel. For K <= 2 this maximizes the number of corrected pixels exactly.

    NOTE: for K > 2 the greedy pass is an approximation. An exact maximum is a bipartite b-matching, which
    this function does not solve.

    Args:
        model_pred: ``HW`` binary model prediction (bool or {0, 1}), not probabilities.
        reference: ``HW`` binary reference mask.
        expert_masks: ``KHW`` binary expert masks. Masks of unavailable experts are ignored.
        expert_available: bool ``K``. An expert who did not annotate this case receives no pixels.
        roi: bool ``HW`` region of interest.
        capacity: ``K`` capacities in (0, 1].

    Returns:
        int64 ``HW`` owner map on the device of ``model_pred``.
    """
    _check_hw("model_pred", model_pred)
    _check_same_shape("model_pred", model_pred, reference=reference, roi=roi)
    num_experts = _check_expert_masks(expert_masks, model_pred.shape)
    _check_expert_vector("expert_available", expert_available, num_experts)
    _check_expert_vector("capacity", capacity, num_experts)
    _check_capacity(capacity)

    device = model_pred.device
    roi = roi.to(device=device, dtype=torch.bool)
    label = reference.to(device) != 0
    model_wrong = ((model_pred != 0) != label) & roi
    expert_right = (expert_masks.to(device) != 0) == label[None]
    available = expert_available.to(device=device, dtype=torch.bool)

    # fixable[k, i]: expert k is available and right on ROI pixel i where the model is wrong.
    fixable_map = expert_right & model_wrong[None] & available[:, None, None]
    fixable = fixable_map.reshape(num_experts, model_pred.numel()).cpu().numpy()
    fixer_counts = fixable.sum(axis=0)

    n_roi = int(roi.sum())
    remaining = capacity_budget(capacity, n_roi).cpu().numpy().copy()
    owner = np.full(fixable.shape[1], MODEL_OWNER, dtype=np.int64)

    _claim_single_fixer_pixels(fixable, fixer_counts == 1, owner, remaining)
    _claim_shared_pixels(fixable, fixer_counts >= 2, fixer_counts, owner, remaining)

    return torch.from_numpy(owner).reshape(model_pred.shape).to(device)


def confidence_assignment(
    prob: torch.Tensor,
    roi: torch.Tensor,
    counts: torch.Tensor,
    expert_priority: Sequence[int],
    expert_available: torch.Tensor,
) -> torch.Tensor:
    """Route the least confident ROI pixels to experts, the most accurate expert first.

    ROI pixels are ranked by confidence ``|prob - 0.5|``, least confident first, ties by pixel index
    (row-major). Going through ``expert_priority``, each available expert takes the next ``counts[k]`` pixels
    of that ranking. An unavailable expert gets none, and its count is not passed on to the next expert. When
    the counts add up to more than the ROI, the experts late in the priority get fewer pixels.

    Args:
        prob: ``HW`` model foreground probabilities in [0, 1], not logits.
        roi: bool ``HW`` region of interest.
        counts: int64 ``K`` pixels per expert, usually ``owner_counts`` of the routing being compared.
        expert_priority: every expert index 0..K-1 exactly once, from most to least accurate on validation.
        expert_available: bool ``K``.

    Returns:
        int64 ``HW`` owner map on the device of ``prob``.
    """
    _check_hw("prob", prob)
    _check_same_shape("prob", prob, roi=roi)
    num_experts = counts.numel()
    _check_expert_vector("counts", counts, num_experts)
    _check_expert_vector("expert_available", expert_available, num_experts)
    if sorted(expert_priority) != list(range(num_experts)):
        raise ValueError(
            f"expert_priority must list every expert index 0..{num_experts - 1} exactly once, "
            f"got {list(expert_priority)}"
        )
    if (counts < 0).any():
        raise ValueError(f"counts must be >= 0, got {counts.tolist()}")

    device = prob.device
    roi = roi.to(device=device, dtype=torch.bool)
    owner = torch.full(prob.shape, MODEL_OWNER, dtype=torch.int64, device=device)
    owner_flat = owner.view(-1)

    # ROI indices come out ascending, so a stable sort breaks confidence ties by pixel index.
    roi_pixels = torch.nonzero(roi.view(-1)).flatten()
    confidence = (prob.view(-1)[roi_pixels].double() - FOREGROUND_THRESHOLD).abs()
    ranked = roi_pixels[torch.sort(confidence, stable=True).indices]

    start = 0
    for expert in expert_priority:
        if not bool(expert_available[expert]):
            continue
        stop = min(start + int(counts[expert]), ranked.numel())
        owner_flat[ranked[start:stop]] = expert
        start = stop

    return owner


def expert_accuracy(
    expert_masks: torch.Tensor,
    reference: torch.Tensor,
    roi: torch.Tensor,
    expert_available: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count each expert's correct ROI pixels on one image, for a pixel accuracy summed over a split.

    Args:
        expert_masks: ``KHW`` binary expert masks.
        reference: ``HW`` binary reference mask.
        roi: bool ``HW`` region of interest.
        expert_available: bool ``K``. Unavailable experts count 0 correct out of 0 pixels.

    Returns:
        ``(correct, total)``: int64 ``K`` correct ROI pixels and ROI pixels judged per expert. Sum both over
        the images of a split, then divide.
    """
    _check_hw("reference", reference)
    _check_same_shape("reference", reference, roi=roi)
    num_experts = _check_expert_masks(expert_masks, reference.shape)
    _check_expert_vector("expert_available", expert_available, num_experts)

    device = expert_masks.device
    roi = roi.to(device=device, dtype=torch.bool)
    available = expert_available.to(device=device, dtype=torch.bool)
    label = reference.to(device) != 0

    right = ((expert_masks != 0) == label[None]) & roi[None]
    correct = right.reshape(num_experts, reference.numel()).sum(dim=1) * available
    total = torch.full((num_experts,), int(roi.sum()), dtype=torch.int64, device=device) * available
    return correct.to(torch.int64), total.to(torch.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Per-image evaluation and summary
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageEvaluation:
    """Numbers of one evaluated image. Per-expert lists have K entries, in expert-index order.

    Attributes:
        model_scores: Dice, IoU and sensitivity of the model prediction inside the ROI.
        system_scores: the same for the system prediction of the routing being evaluated.
        oracle_system_dice: system Dice of the oracle routing under the same capacities.
        confidence_system_dice: system Dice of the confidence baseline at the routing's per-expert counts.
        deferral_rate: fraction of ROI pixels deferred to any expert.
        deferral_regions: connected regions (8-connectivity) of the deferral mask.
        demand: per expert, fraction of ROI pixels the router would send before the capacity cap.
        load: per expert, fraction of ROI pixels routed after the cap.
        expert_violations: per expert, 1 when load exceeds capacity on this image, else 0.
        capacity_violations: sum of ``expert_violations``.
        n_roi: number of ROI pixels.
        expert_available: per expert, whether they annotated this case.
        corrected_pixels: per expert, deferred pixels where the model was wrong and the expert right.
        deferred_pixels: per expert, pixels deferred to them.
    """

    model_scores: dict[str, float]
    system_scores: dict[str, float]
    oracle_system_dice: float
    confidence_system_dice: float
    deferral_rate: float
    deferral_regions: int
    demand: list[float]
    load: list[float]
    expert_violations: list[int]
    capacity_violations: int
    n_roi: int
    expert_available: list[bool]
    corrected_pixels: list[int]
    deferred_pixels: list[int]


def evaluate_image(
    prob: torch.Tensor,
    reference: torch.Tensor,
    roi: torch.Tensor,
    expert_masks: torch.Tensor,
    expert_available: torch.Tensor,
    capacity: torch.Tensor,
    owner: torch.Tensor,
    demand_owner: torch.Tensor,
    expert_priority: Sequence[int],
) -> ImageEvaluation:
    """Evaluate one image's routing against the model alone, the oracle and the confidence baseline.

    The model prediction is ``prob > FOREGROUND_THRESHOLD``. The oracle uses the same capacities, and the
    confidence baseline uses the per-expert pixel counts of ``owner``.

    Args:
        prob: ``HW`` model foreground probabilities in [0, 1], not logits.
        reference: ``HW`` binary reference mask.
        roi: bool ``HW`` region of interest with at least one pixel.
        expert_masks: ``KHW`` binary expert masks. Masks of unavailable experts are ignored.
        expert_available: bool ``K``.
        capacity: ``K`` capacities in (0, 1].
        owner: int64 ``HW`` owner map after the capacity cap. It must not defer to an unavailable expert.
        demand_owner: int64 ``HW`` owner map the router wanted before the cap, with the same convention.
        expert_priority: expert indices from most to least accurate on validation, for the confidence baseline.

    Returns:
        The image's numbers.
    """
    _check_hw("prob", prob)
    _check_same_shape("prob", prob, reference=reference, roi=roi, owner=owner, demand_owner=demand_owner)
    num_experts = _check_expert_masks(expert_masks, prob.shape)
    _check_expert_vector("expert_available", expert_available, num_experts)
    _check_expert_vector("capacity", capacity, num_experts)
    _check_capacity(capacity)
    if prob.numel() and (prob.min() < 0 or prob.max() > 1 or torch.isnan(prob).any()):
        raise ValueError(
            f"prob must contain foreground probabilities in [0, 1], got values in "
            f"[{float(prob.min())}, {float(prob.max())}]. Apply a sigmoid to logits first"
        )

    device = prob.device
    roi = roi.to(device=device, dtype=torch.bool)
    reference = reference.to(device) != 0
    expert_masks = expert_masks.to(device) != 0
    available = expert_available.to(device=device, dtype=torch.bool)
    owner = owner.to(device)
    demand_owner = demand_owner.to(device)
    _check_owner("owner", owner, roi, num_experts)
    _check_owner("demand_owner", demand_owner, roi, num_experts)
    _check_owner_available("owner", owner, available)
    n_roi = int(roi.sum())
    if n_roi == 0:
        raise ValueError("roi contains no pixels, so loads and rates are undefined. Check the image's ROI mask")

    model_pred = prob > FOREGROUND_THRESHOLD
    system = system_prediction(model_pred, owner, expert_masks)

    oracle_owner = oracle_assignment(model_pred, reference, expert_masks, available, roi, capacity)
    oracle_system = system_prediction(model_pred, oracle_owner, expert_masks)

    deferred_pixels = owner_counts(owner, num_experts)
    confidence_owner = confidence_assignment(prob, roi, deferred_pixels, expert_priority, available)
    confidence_system = system_prediction(model_pred, confidence_owner, expert_masks)

    # A deferred pixel is corrected when the model was wrong there and the chosen expert right.
    corrected = (system == reference) & (model_pred != reference) & (owner != MODEL_OWNER)
    corrected_pixels = owner_counts(torch.where(corrected, owner, MODEL_OWNER), num_experts)

    load = deferred_pixels.double() / n_roi
    demand = owner_counts(demand_owner, num_experts).double() / n_roi
    over = load > capacity.to(device=device, dtype=torch.float64) + VIOLATION_TOLERANCE
    violations = capacity_violations(owner, roi, capacity)
    deferral_mask = owner != MODEL_OWNER

    return ImageEvaluation(
        model_scores=segmentation_scores(model_pred, reference, roi),
        system_scores=segmentation_scores(system, reference, roi),
        oracle_system_dice=segmentation_scores(oracle_system, reference, roi)["dice"],
        confidence_system_dice=segmentation_scores(confidence_system, reference, roi)["dice"],
        deferral_rate=float(deferral_mask.sum()) / n_roi,
        deferral_regions=count_regions(deferral_mask),
        demand=demand.tolist(),
        load=load.tolist(),
        expert_violations=over.to(torch.int64).tolist(),
        capacity_violations=violations,
        n_roi=n_roi,
        expert_available=available.tolist(),
        corrected_pixels=corrected_pixels.tolist(),
        deferred_pixels=deferred_pixels.tolist(),
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _summarize_expert(evaluations: Sequence[ImageEvaluation], expert: int, capacity: float) -> dict[str, float | int]:
    """Average one expert's workload over the images where they were available."""
    available = [evaluation for evaluation in evaluations if evaluation.expert_available[expert]]
    demand = _mean([evaluation.demand[expert] for evaluation in available])
    load = _mean([evaluation.load[expert] for evaluation in available])
    corrected = sum(evaluation.corrected_pixels[expert] for evaluation in evaluations)
    deferred = sum(evaluation.deferred_pixels[expert] for evaluation in evaluations)

    return {
        "capacity": float(capacity),
        "demand": demand,
        "load": load,
        "utilization": load / capacity,
        "pressure": demand / capacity,
        "violations": int(sum(evaluation.expert_violations[expert] for evaluation in evaluations)),
        "deferral_precision": corrected / deferred if deferred else 0.0,
    }


def summarize(
    evaluations: Sequence[ImageEvaluation],
    expert_ids: Sequence[str],
    capacity: Sequence[float],
) -> dict:
    """Summarize a split's per-image evaluations: means over images, sums of violations, per-expert workload.

    Scores, Dice values, deferral rate and deferral regions are means over images. ``capacity_violations``
    is a sum over (image, expert) pairs. Per expert, demand and load are means over the images where the
    expert was available (0.0 if never available), utilization = load / capacity and pressure =
    demand / capacity. ``deferral_precision`` pools all images: corrected pixels / deferred pixels, 0.0 when
    nothing was deferred. Deferral precision is a per-expert number that stays at the site.

    ``oracle_gain_share`` = (system Dice - model Dice) / (oracle Dice - model Dice) on the mean Dice values.
    It is 0.0 when the oracle gains nothing (gain <= ``ORACLE_GAIN_TOLERANCE``), and it is negative when the
    routing makes the system worse than the model alone.

    Args:
        evaluations: at least one ``ImageEvaluation``, all with K experts.
        expert_ids: K expert ids (pseudonyms outside the site), in expert-index order.
        capacity: K capacities in (0, 1], in the same order.

    Returns:
        A JSON-serializable dict with keys ``num_images``, ``model_dice``, ``model_iou``,
        ``model_sensitivity``, ``system_dice``, ``system_iou``, ``system_sensitivity``, ``oracle_system_dice``,
        ``oracle_gain_share``, ``confidence_system_dice``, ``deferral_rate``, ``deferral_regions``,
        ``capacity_violations`` and ``experts`` (``{id: {capacity, demand, load, utilization, pressure,
        violations, deferral_precision}}``).
    """
    if not evaluations:
        raise ValueError("evaluations is empty. Evaluate at least one image before summarizing")
    num_experts = len(expert_ids)
    if len(set(expert_ids)) != num_experts:
        raise ValueError(f"expert_ids must be unique, got {list(expert_ids)}")
    if len(capacity) != num_experts:
        raise ValueError(f"capacity lists {len(capacity)} values for {num_experts} expert_ids {list(expert_ids)}")
    _check_capacity(torch.tensor(list(capacity), dtype=torch.float64))
    for index, evaluation in enumerate(evaluations):
        if len(evaluation.load) != num_experts:
            raise ValueError(
                f"evaluation {index} has {len(evaluation.load)} experts, but expert_ids lists {num_experts}"
            )

    summary: dict = {"num_images": len(evaluations)}
    for name in SCORE_NAMES:
        summary[f"model_{name}"] = _mean([evaluation.model_scores[name] for evaluation in evaluations])
    for name in SCORE_NAMES:
        summary[f"system_{name}"] = _mean([evaluation.system_scores[name] for evaluation in evaluations])
    summary["oracle_system_dice"] = _mean([evaluation.oracle_system_dice for evaluation in evaluations])

    oracle_gain = summary["oracle_system_dice"] - summary["model_dice"]
    system_gain = summary["system_dice"] - summary["model_dice"]
    summary["oracle_gain_share"] = system_gain / oracle_gain if oracle_gain > ORACLE_GAIN_TOLERANCE else 0.0

    summary["confidence_system_dice"] = _mean([evaluation.confidence_system_dice for evaluation in evaluations])
    summary["deferral_rate"] = _mean([evaluation.deferral_rate for evaluation in evaluations])
    summary["deferral_regions"] = _mean([evaluation.deferral_regions for evaluation in evaluations])
    summary["capacity_violations"] = int(sum(evaluation.capacity_violations for evaluation in evaluations))

    experts = {}
    for index, expert_id in enumerate(expert_ids):
        if not any(evaluation.expert_available[index] for evaluation in evaluations):
            logger.warning(
                "expert %s annotated none of the %d images, so demand and load are reported as 0.0",
                expert_id,
                len(evaluations),
            )
        experts[str(expert_id)] = _summarize_expert(evaluations, index, float(capacity[index]))
    summary["experts"] = experts
    return summary
