"""Capacity-constrained routing: per image, no expert receives more than their capacity share of the ROI."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.metrics import MODEL_OWNER, capacity_budget

ROUTERS = ("softmax", "benefit")


@dataclass
class Routing:
    """Routing of one image.

    Attributes:
        owner: int64 ``HW`` owner map after the capacity cap: ``-1`` (model) or the expert index.
        demand_owner: the same map before the cap, i.e. what the router would send to each expert if experts
            had no capacity limit. Demand is measured on it and load on ``owner``.
    """

    owner: torch.Tensor
    demand_owner: torch.Tensor


def softmax_scores(routing_logits: torch.Tensor, prices: torch.Tensor | None = None) -> torch.Tensor:
    """Score each channel by its routing probability, with expert prices subtracted.

    Args:
        routing_logits: ``(K+1)HW`` logits, experts first and the model channel last.
        prices: ``K`` non-negative capacity prices; ``None`` means zero. Prices shift scores only, so an
            overloaded expert's pixels move to the next channel without any change to the training loss.

    Returns:
        ``(K+1)HW`` scores, model channel last.
    """
    scores = torch.softmax(routing_logits.float(), dim=0)
    if prices is not None and prices.numel():
        scores = scores.clone()
        scores[:-1] -= prices.to(scores).view(-1, 1, 1)
    return scores


def benefit_scores(correctness_logits: torch.Tensor, prices: torch.Tensor | None = None) -> torch.Tensor:
    """Score each expert by the estimated benefit of deferring to them, minus their capacity price.

    The benefit of sending a pixel to expert k is ``P(k right) - P(model right)``, both from the per-agent
    correctness heads. The model channel scores 0, so a pixel leaves the model only where some expert's
    benefit minus price is positive: capacity is a maximum, and an expert who never helps stays idle.

    Args:
        correctness_logits: ``(K+1)HW`` logits of "this agent is right", experts first and the model last.
        prices: ``K`` non-negative capacity prices; ``None`` means zero.

    Returns:
        ``(K+1)HW`` scores, model channel last.
    """
    right = torch.sigmoid(correctness_logits.float())
    scores = right - right[-1:]
    if prices is not None and prices.numel():
        scores[:-1] -= prices.to(scores).view(-1, 1, 1)
    scores[-1] = 0.0
    return scores


def routing_scores(
    router: str,
    routing_logits: torch.Tensor,
    correctness_logits: torch.Tensor,
    prices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the ``(K+1)HW`` scores of ``router``: ``"softmax"`` (DeferredSeg) or ``"benefit"``."""
    if router == "softmax":
        return softmax_scores(routing_logits, prices)
    if router == "benefit":
        return benefit_scores(correctness_logits, prices)
    raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")


def fit_prices(
    scores: list[torch.Tensor],
    rois: list[torch.Tensor],
    capacity: torch.Tensor,
    available: list[torch.Tensor],
    sweeps: int = 20,
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """Find small non-negative prices that keep each expert's mean demand within capacity.

    Demand of expert k is the mean over images of the fraction of ROI pixels whose best score, after
    prices, is k's. It falls as k's price rises and rises as another expert's price rises.

    The fit starts from prices that are feasible on their own: each expert's price makes the share of
    pixels where it beats the model channel, ignoring the other experts, fit its capacity. Sweeps then
    lower each price in turn, by bisection, as far as that expert's demand still fits. Lowering one price
    only takes pixels from the other experts, so every step stays feasible. Raising prices from zero
    instead converges very slowly when the experts' scores move together, as the benefit router's do:
    each raise hands the pixels to the next expert.

    Args:
        scores: per image, ``(K+1)HW`` routing scores before prices, model channel last.
        rois: per image, bool ``HW`` region of interest.
        capacity: ``K`` capacities.
        available: per image, bool ``K``.
        sweeps: maximum passes over the experts that lower prices.
        tolerance: bisection stops when the price interval is narrower than this.

    Returns:
        ``K`` prices.
    """
    num_experts = capacity.numel()
    prices = torch.zeros(num_experts, dtype=torch.float64)
    if num_experts == 0 or not scores:
        return prices.float()

    # Only ROI pixels matter; flatten them once, unavailable experts already excluded.
    flat = []
    for image_scores, roi, image_available in zip(scores, rois, available):
        pixels = image_scores[:, roi.bool()].double().clone()
        pixels[:num_experts][~image_available.bool()] = float("-inf")
        if pixels.shape[1]:
            flat.append(pixels)
    if not flat:
        return prices.float()

    def demand(k: int, price: float, alone: bool = False) -> float:
        shifted = prices.clone()
        shifted[k] = price
        fractions = []
        for pixels in flat:
            if alone:
                fractions.append(float((pixels[k] - price > pixels[-1]).double().mean()))
                continue
            adjusted = pixels.clone()
            adjusted[:num_experts] -= shifted.view(-1, 1)
            fractions.append(float((adjusted.argmax(dim=0) == k).double().mean()))
        return sum(fractions) / len(fractions)

    def smallest_price(k: int, low: float, high: float, alone: bool = False) -> float:
        """Return the smallest price in [low, high] whose demand fits, by bisection. ``high`` must fit."""
        if demand(k, low, alone) <= float(capacity[k]):
            return low
        while high - low > tolerance:
            middle = (low + high) / 2.0
            if demand(k, middle, alone) > float(capacity[k]):
                low = middle
            else:
                high = middle
        return high

    for k in range(num_experts):
        high = 1.0
        while demand(k, high, alone=True) > float(capacity[k]) and high < 1e6:
            high *= 2.0
        prices[k] = smallest_price(k, 0.0, high, alone=True)

    for _ in range(sweeps):
        before = prices.clone()
        for k in range(num_experts):
            prices[k] = smallest_price(k, 0.0, float(prices[k]))
        if float((before - prices).abs().max()) <= tolerance:
            break
    # Callers shift float32 scores; round up so the float32 price still keeps demand within capacity.
    rounded = prices.float()
    return torch.where(rounded > 0, torch.nextafter(rounded, torch.tensor(float("inf"))), rounded)


def assign_with_capacity(
    scores: torch.Tensor,
    roi: torch.Tensor,
    capacity: torch.Tensor,
    available: torch.Tensor | None = None,
) -> Routing:
    """Route the pixels of one image to the model or to an expert, never above an expert's capacity.

    Each ROI pixel prefers the channel with the highest score. An expert keeps the pixels that prefer it in
    descending order of its score until its budget, ``floor(capacity * n_roi)`` pixels, is full. The pixels
    that do not fit fall back to their next best channel, and so on, until the model channel (which has no
    limit) or a channel with room is reached. An expert whose every score is below the model's gets nothing:
    capacity is a maximum, not a quota. Pixels outside the ROI always stay with the model.

    Args:
        scores: ``(K+1)HW`` routing scores, experts first and the model channel last.
        roi: bool ``HW`` region of interest.
        capacity: ``K`` capacities in (0, 1], fractions of the ROI.
        available: bool ``K``; an expert who did not annotate this case gets no pixels. ``None`` means all.

    Returns:
        The owner maps after and before the capacity cap.
    """
    num_experts = scores.shape[0] - 1
    if scores.dim() != 3 or num_experts < 0:
        raise ValueError(f"scores must be (K+1)HW, got shape {tuple(scores.shape)}")
    if tuple(roi.shape) != tuple(scores.shape[1:]):
        raise ValueError(f"roi has shape {tuple(roi.shape)}, scores have spatial shape {tuple(scores.shape[1:])}")
    if capacity.numel() != num_experts:
        raise ValueError(f"capacity lists {capacity.numel()} experts, scores have {num_experts} expert channels")

    device = scores.device
    roi = roi.to(device=device, dtype=torch.bool)
    if available is None:
        available = torch.ones(num_experts, dtype=torch.bool, device=device)
    available = available.to(device=device, dtype=torch.bool)

    owner = torch.full(roi.shape, MODEL_OWNER, dtype=torch.int64, device=device)
    demand_owner = owner.clone()
    n_roi = int(roi.sum())
    if num_experts == 0 or n_roi == 0:
        return Routing(owner, demand_owner)

    # Flatten the ROI pixels: candidates is (K+1, N) with unavailable experts removed from every choice.
    candidates = scores[:, roi].float().clone()
    candidates[:num_experts][~available] = float("-inf")
    model_channel = num_experts

    # A non-finite score must never send work to an expert: NaN expert scores rank last, a NaN model score first.
    candidates[:num_experts] = torch.nan_to_num(candidates[:num_experts], nan=float("-inf"))
    candidates[model_channel] = torch.nan_to_num(candidates[model_channel], nan=float("inf"))

    first_choice = candidates.argmax(dim=0)
    demand_flat = torch.where(first_choice == model_channel, MODEL_OWNER, first_choice)
    demand_owner[roi] = demand_flat

    remaining = capacity_budget(capacity.to(device), n_roi).clone()
    owner_flat = torch.full((candidates.shape[1],), MODEL_OWNER, dtype=torch.int64, device=device)
    unresolved = torch.ones(candidates.shape[1], dtype=torch.bool, device=device)
    full = remaining <= 0

    # Each pass either settles every unresolved pixel or fills at least one expert, so K+1 passes suffice.
    for _ in range(num_experts + 1):
        masked = candidates.clone()
        masked[:num_experts][full] = float("-inf")
        choice = masked.argmax(dim=0)

        unresolved &= choice != model_channel
        if not unresolved.any():
            break

        for k in range(num_experts):
            wants = torch.nonzero(unresolved & (choice == k)).flatten()
            if wants.numel() == 0:
                continue
            budget = int(remaining[k])
            if wants.numel() > budget:
                keep = torch.topk(candidates[k, wants], budget).indices
                wants = wants[keep]
                full[k] = True
            owner_flat[wants] = k
            unresolved[wants] = False
            remaining[k] -= wants.numel()
            if remaining[k] <= 0:
                full[k] = True

    owner[roi] = owner_flat
    return Routing(owner, demand_owner)
