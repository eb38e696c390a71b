"""Capacity-constrained routing: per image, no expert receives more than their capacity share of the ROI."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.metrics import MODEL_OWNER, capacity_budget

ROUTERS = ("softmax",)


@dataclass
class Routing:
    """Routing of one image.

    Attributes:
        owner: int64 ``HW`` owner map after the capacity cap: ``-1`` (model) or the expert index.
        demand_owner: the same map before the cap, i.e. what the router would send to each expert if nobody
            had a capacity. Demand is measured on it and load on ``owner``.
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
