"""DeferredSeg training losses as pure functions of tensors, each averaged over the region of interest.

Notation per pixel: reference label y in {0, 1}, expert k's label m_k, segmentation logit s, routing logits r
with K + 1 channels (channels 0..K-1 are the experts, channel K, the last, is the model), pi = softmax(r) over
the channel dimension, deferral logit d and q = sigmoid(d).

Shapes: `B1HW` for the segmentation logit, deferral logit, reference and region of interest (ROI), `BKHW` for
expert masks, `B(K+1)HW` for routing logits and `BK` for the expert availability flags. K may be 0, and then
every expert term is zero.

Method: Tian, Sun, Wang, Shi, Yin, "DeferredSeg: A Multi-Expert Deferral Framework for Trustworthy Medical
Image Segmentation", arXiv 2604.12411. Unlike the official DeferredSeg code, which applies a sigmoid before
`binary_cross_entropy_with_logits` and so applies it twice, every loss here applies the sigmoid once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

# Laplace smoothing of the Dice ratio. With no foreground in the batch's ROI the loss still falls to 0 as the
# predicted foreground falls to 0, and on hundreds of foreground pixels the smoothing changes little.
DICE_SMOOTH = 1.0


def _roi_mean(term: Tensor, roi: Tensor) -> Tensor:
    """Average a per-pixel term `B1HW` over the ROI pixels of the whole batch (0 when the ROI is empty)."""
    return (term * roi).sum() / roi.sum().clamp(min=1)


def _routing_shape(routing_logits: Tensor) -> tuple[int, int, int, int]:
    """Return (B, K, H, W) of routing logits `B(K+1)HW`, or raise ValueError."""
    if routing_logits.ndim != 4 or routing_logits.shape[1] < 1:
        raise ValueError(
            f"routing_logits has shape {tuple(routing_logits.shape)}, expected B(K+1)HW with K experts "
            "and the model channel last"
        )
    batch, channels, height, width = routing_logits.shape
    return batch, channels - 1, height, width


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")


def _check_unit_range(name: str, tensor: Tensor) -> None:
    if tensor.numel() > 0 and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(
            f"{name} has values in [{tensor.min().item()}, {tensor.max().item()}], expected values in [0, 1] "
            "(masks as 0/1, not 0/255)"
        )


def _as_float_roi(roi: Tensor, like: Tensor) -> Tensor:
    _check_unit_range("roi", roi)
    return roi.to(dtype=like.dtype)


def _log_one_minus_softmax(logits: Tensor, n_channels: int) -> Tensor:
    """Return log(1 - pi_k) `BKHW` for the first `n_channels` channels of logits `BCHW`.

    log(1 - pi_k) = logsumexp(r_j, j != k) - logsumexp(r_j, all j), which stays finite and keeps its gradient
    even where pi_k rounds to 1. At least the last (model) channel remains in every exclusion.
    """
    batch, channels, height, width = logits.shape
    excluded = torch.eye(n_channels, channels, dtype=torch.bool, device=logits.device)
    others = logits.unsqueeze(1).expand(batch, n_channels, channels, height, width)
    others = others.masked_fill(excluded[None, :, :, None, None], float("-inf"))
    return torch.logsumexp(others, dim=2) - torch.logsumexp(logits, dim=1, keepdim=True)


def collaboration_surrogate(
    seg_logit: Tensor,
    routing_logits: Tensor,
    reference: Tensor,
    expert_masks: Tensor,
    expert_available: Tensor,
    roi: Tensor,
    *,
    wrong_expert_penalty: bool = False,
) -> Tensor:
    """Compute the per-pixel learning-to-defer surrogate, averaged over the ROI.

    Per pixel: `BCE(s, y) - [model correct] * log pi_M - sum_k avail_k [m_k == y] * log pi_k`. This is the
    cross-entropy surrogate of Mozannar and Sontag (2020) with several agents (Verma et al., 2023), applied to
    every pixel. "Model correct" compares the thresholded prediction `(s > 0)` with y, and no gradient flows
    through either indicator. An expert with `expert_available[b, k] == False` adds nothing on case b.

    With `wrong_expert_penalty`, the term `- avail_k [m_k != y] * log(1 - pi_k)` is added, which pushes a
    wrong expert's probability down and is bounded below by 0. The official DeferredSeg code adds
    `+ [m_k != y] * log pi_k` instead, which goes to -inf as pi_k -> 0 and so has no lower bound.

    Args:
        seg_logit: segmentation logits `B1HW`.
        routing_logits: routing logits `B(K+1)HW`, model channel last.
        reference: reference mask `B1HW`, float in {0, 1}.
        expert_masks: expert masks `BKHW`, float in {0, 1}.
        expert_available: `BK` bool, whether expert k annotated case b.
        roi: region of interest `B1HW`, float or bool in {0, 1}.
        wrong_expert_penalty: add the bounded penalty on wrong experts described above.

    Returns:
        Scalar loss.
    """
    batch, n_experts, height, width = _routing_shape(routing_logits)
    _check_shape("seg_logit", seg_logit, (batch, 1, height, width))
    _check_shape("reference", reference, (batch, 1, height, width))
    _check_shape("expert_masks", expert_masks, (batch, n_experts, height, width))
    _check_shape("expert_available", expert_available, (batch, n_experts))
    _check_shape("roi", roi, (batch, 1, height, width))
    _check_unit_range("reference", reference)
    roi = _as_float_roi(roi, seg_logit)

    target = reference.to(seg_logit.dtype)
    segmentation_term = F.binary_cross_entropy_with_logits(seg_logit, target, reduction="none")

    log_pi = F.log_softmax(routing_logits, dim=1)
    model_correct = ((seg_logit > 0) == (reference > 0.5)).to(log_pi.dtype)
    per_pixel = segmentation_term - model_correct * log_pi[:, n_experts:]

    if n_experts > 0:
        available = expert_available.to(log_pi.dtype)[:, :, None, None]
        expert_correct = (expert_masks > 0.5) == (reference > 0.5)
        per_pixel = per_pixel - (available * expert_correct * log_pi[:, :n_experts]).sum(dim=1, keepdim=True)

        if wrong_expert_penalty:
            log_one_minus_pi = _log_one_minus_softmax(routing_logits, n_experts)
            penalty = available * ~expert_correct * log_one_minus_pi
            per_pixel = per_pixel - penalty.sum(dim=1, keepdim=True)

    return _roi_mean(per_pixel, roi)


def dice_loss(seg_logit: Tensor, reference: Tensor, roi: Tensor) -> Tensor:
    """Compute the soft Dice loss of the segmentation inside the ROI with MONAI `DiceLoss`.

    The sigmoid is applied here once, and probabilities and reference are multiplied by the ROI, so pixels
    outside it count in neither the overlap nor the sums. The Dice ratio is pooled over the whole batch
    (`batch=True`), because a case with no foreground would otherwise get a loss near 1 that no prediction
    can lower. Both smoothing terms are `DICE_SMOOTH`.

    Args:
        seg_logit: segmentation logits `B1HW`.
        reference: reference mask `B1HW`, float in {0, 1}.
        roi: region of interest `B1HW`, float or bool in {0, 1}.

    Returns:
        Scalar loss in [0, 1].
    """
    _check_shape("reference", reference, tuple(seg_logit.shape))
    _check_shape("roi", roi, tuple(seg_logit.shape))
    if seg_logit.ndim != 4 or seg_logit.shape[1] != 1:
        raise ValueError(f"seg_logit has shape {tuple(seg_logit.shape)}, expected B1HW")
    _check_unit_range("reference", reference)
    roi = _as_float_roi(roi, seg_logit)

    probabilities = torch.sigmoid(seg_logit) * roi
    target = reference.to(seg_logit.dtype) * roi
    loss = DiceLoss(sigmoid=False, smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH, batch=True)
    return loss(probabilities, target)


def deferral_predictor_loss(
    deferral_logit: Tensor,
    routing_logits: Tensor,
    roi: Tensor,
    *,
    mse_weight: float = 1.0,
    sparsity_weight: float = 0.01,
) -> Tensor:
    """Train the deferral predictor to follow the routing, averaged over the ROI.

    Per pixel: `BCE(d, [argmax pi != M]) + mse_weight * (q - stopgrad(sum_k pi_k))^2 + sparsity_weight * q`.
    The first term learns the hard routing decision and the second its expert probability mass. Neither sends
    a gradient to the routing logits, so this loss trains only the deferral predictor. A pixel counts as
    deferred when some expert channel is strictly larger than the model channel, so ties keep the model.

    Args:
        deferral_logit: deferral logits `B1HW`.
        routing_logits: routing logits `B(K+1)HW`, model channel last.
        roi: region of interest `B1HW`, float or bool in {0, 1}.
        mse_weight: weight of the squared error to the expert probability mass, >= 0.
        sparsity_weight: weight of the mean deferral probability, >= 0.

    Returns:
        Scalar loss.
    """
    batch, n_experts, height, width = _routing_shape(routing_logits)
    _check_shape("deferral_logit", deferral_logit, (batch, 1, height, width))
    _check_shape("roi", roi, (batch, 1, height, width))
    for name, value in (("mse_weight", mse_weight), ("sparsity_weight", sparsity_weight)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value} is invalid, use a finite value >= 0")
    roi = _as_float_roi(roi, deferral_logit)

    routing = routing_logits.detach()
    if n_experts > 0:
        best_expert = routing[:, :n_experts].amax(dim=1, keepdim=True)
        deferred = (best_expert > routing[:, n_experts:]).to(deferral_logit.dtype)
        expert_mass = torch.softmax(routing, dim=1)[:, :n_experts].sum(dim=1, keepdim=True)
    else:
        deferred = torch.zeros_like(deferral_logit)
        expert_mass = torch.zeros_like(deferral_logit)

    q = torch.sigmoid(deferral_logit)
    decision_term = F.binary_cross_entropy_with_logits(deferral_logit, deferred, reduction="none")
    per_pixel = decision_term + mse_weight * (q - expert_mass) ** 2 + sparsity_weight * q
    return _roi_mean(per_pixel, roi)


def spatial_coherence(deferral_prob: Tensor, roi: Tensor) -> Tensor:
    """Compute the anisotropic total variation of a deferral probability map, so deferral forms regions.

    The mean of `|p_a - p_b|` runs over all pairs of vertically or horizontally adjacent pixels (4-neighbours,
    each pair counted once) where both pixels lie in the ROI. It is 0 when no pair qualifies.

    Args:
        deferral_prob: deferral probabilities `B1HW` (for example q or sum_k pi_k), not logits.
        roi: region of interest `B1HW`, float or bool in {0, 1}.

    Returns:
        Scalar loss in [0, 1].
    """
    if deferral_prob.ndim != 4 or deferral_prob.shape[1] != 1:
        raise ValueError(f"deferral_prob has shape {tuple(deferral_prob.shape)}, expected B1HW")
    _check_shape("roi", roi, tuple(deferral_prob.shape))
    _check_unit_range("deferral_prob", deferral_prob.detach())
    roi = _as_float_roi(roi, deferral_prob)

    vertical_pairs = roi[:, :, 1:, :] * roi[:, :, :-1, :]
    horizontal_pairs = roi[:, :, :, 1:] * roi[:, :, :, :-1]
    vertical = (deferral_prob[:, :, 1:, :] - deferral_prob[:, :, :-1, :]).abs() * vertical_pairs
    horizontal = (deferral_prob[:, :, :, 1:] - deferral_prob[:, :, :, :-1]).abs() * horizontal_pairs

    n_pairs = (vertical_pairs.sum() + horizontal_pairs.sum()).clamp(min=1)
    return (vertical.sum() + horizontal.sum()) / n_pairs


def load_balancing(
    routing_logits: Tensor,
    roi: Tensor,
    lower: Tensor,
    upper: Tensor,
    temperature: float = 1.0,
    hard: bool = False,
) -> Tensor:
    """Penalize expert channels whose mean routing probability leaves [lower_k, upper_k].

    Returns `sum_k relu(mean_roi(pi_k) - upper_k) + relu(lower_k - mean_roi(pi_k))` over the expert channels,
    where the mean runs over all ROI pixels of the batch and `pi = softmax(r / temperature)`. The model channel
    has no bound. The coordinator sends the bounds each round (upper_k = capacity_k, lower_k = 0).

    With ``hard``, `pi` is the one-hot argmax of the routing logits, the load the router really defers, and
    the gradient is that of `softmax(r / temperature)` (straight-through). Soft probabilities can meet a
    lower bound with no pixel routed at all, when an expert channel stays just below the model channel on
    every pixel.

    With temperature 1 this is DeferredSeg's term on soft probabilities. An accurate expert then has a
    large share of probability on almost every pixel, and an upper bound at capacity level pushes that
    expert's channel below the model channel everywhere, so argmax never defers. A low temperature sharpens
    pi towards the argmax, so the mean approaches the realized (hard) load.

    Sharpening alone does not prevent that collapse: with temperature 0.1 and upper bounds at a capacity of
    0.05, weights 1.0 (DRIVE, CHASE_DB1) and 0.1 (DRIVE) still ended with no deferral at all. The bound has
    only a downward pull while lower_k = 0, so :func:`deferredseg_loss` raises each lower bound to a share of
    the upper one (``LossWeights.load_balancing_floor``). On soft loads that floor still left CHASE_DB1 with
    nothing routed. On hard loads both retina sites deferred about 5% of their pixels, within capacity
    (``docs/routing.md``).

    Args:
        routing_logits: routing logits `B(K+1)HW`, model channel last.
        roi: region of interest `B1HW`, float or bool in {0, 1}.
        lower: lower bounds, shape `K`, in [0, 1].
        upper: upper bounds, shape `K`, in [0, 1] and >= lower.
        temperature: softmax temperature, > 0; 1 is DeferredSeg's soft form.

    Returns:
        Scalar loss (0 when K = 0).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    batch, n_experts, height, width = _routing_shape(routing_logits)
    _check_shape("roi", roi, (batch, 1, height, width))
    _check_shape("lower", lower, (n_experts,))
    _check_shape("upper", upper, (n_experts,))
    _check_unit_range("lower", lower)
    _check_unit_range("upper", upper)
    if bool((lower > upper).any()):
        raise ValueError(f"lower bounds {lower.tolist()} exceed upper bounds {upper.tolist()}, use lower <= upper")
    roi = _as_float_roi(roi, routing_logits)

    if n_experts == 0:
        return routing_logits.new_zeros(())

    soft = torch.softmax(routing_logits / temperature, dim=1)
    if hard:
        one_hot = F.one_hot(routing_logits.argmax(dim=1), routing_logits.shape[1]).permute(0, 3, 1, 2).to(soft)
        soft = one_hot + soft - soft.detach()
    pi = soft[:, :n_experts]
    mean_pi = (pi * roi).sum(dim=(0, 2, 3)) / roi.sum().clamp(min=1)
    lower = lower.to(device=mean_pi.device, dtype=mean_pi.dtype)
    upper = upper.to(device=mean_pi.device, dtype=mean_pi.dtype)
    return (F.relu(mean_pi - upper) + F.relu(lower - mean_pi)).sum()


TERM_NAMES = ("surrogate", "dice", "deferral", "coherence", "load_balancing")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the DeferredSeg loss terms. A term with weight 0 is not computed.

    surrogate: collaboration surrogate (segmentation BCE and routing cross-entropy).
    dice: Dice loss of the segmentation.
    deferral: deferral predictor loss.
    coherence: total variation of q = sigmoid(d).
    load_balancing: bounds on each expert's mean routing load. It is off (0.0) by default, because the
        capacity-constrained routing at inference already enforces capacity, and even with the fixes below
        the softmax router trails confidence deferral on the real sites.
    load_balancing_temperature: softmax temperature of the load-balancing term. The default 0.1 applies the
        bounds to nearly hard loads; 1.0 is DeferredSeg's form.
    load_balancing_floor: each expert's lower bound is raised to at least this share of its upper bound, in
        [0, 1]. With a floor of 0 (DeferredSeg's bounds [0, capacity]) the term stopped all deferral on the
        real sites. The floor acts in training only. At inference capacity stays a maximum, not a quota.
    load_balancing_hard: apply the bounds to the hard (argmax) loads, with the gradient of the sharpened
        softmax (straight-through). On soft loads a floor of 0.5 still left CHASE_DB1 with no deferral.
    wrong_expert_penalty: add the bounded wrong-expert penalty to the surrogate.
    deferral_mse_weight: weight of the squared error inside the deferral predictor loss.
    deferral_sparsity_weight: weight of mean(q) inside the deferral predictor loss.
    """

    surrogate: float = 1.0
    dice: float = 1.0
    deferral: float = 0.5
    coherence: float = 0.1
    load_balancing: float = 0.0
    load_balancing_temperature: float = 0.1
    load_balancing_floor: float = 0.5
    load_balancing_hard: bool = True
    wrong_expert_penalty: bool = False
    deferral_mse_weight: float = 1.0
    deferral_sparsity_weight: float = 0.01

    def __post_init__(self) -> None:
        for name in (*TERM_NAMES, "deferral_mse_weight", "deferral_sparsity_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"LossWeights.{name}={value} is invalid, use a finite value >= 0")
        if not self.load_balancing_temperature > 0:
            raise ValueError(
                f"LossWeights.load_balancing_temperature={self.load_balancing_temperature} is invalid, use a value > 0"
            )
        if not 0 <= self.load_balancing_floor <= 1:
            raise ValueError(
                f"LossWeights.load_balancing_floor={self.load_balancing_floor} is invalid, use a value in [0, 1]"
            )
        if not any(getattr(self, name) > 0 for name in TERM_NAMES):
            raise ValueError(f"all term weights {TERM_NAMES} are 0, give at least one a positive weight")


def deferredseg_loss(
    seg_logit: Tensor,
    routing_logits: Tensor,
    deferral_logit: Tensor,
    reference: Tensor,
    expert_masks: Tensor,
    expert_available: Tensor,
    roi: Tensor,
    weights: LossWeights,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Compute the weighted sum of the DeferredSeg loss terms.

    Shapes and value ranges are those of the term functions. Spatial coherence is applied to
    q = sigmoid(deferral_logit). `lower` and `upper` (shape `K`) are required when `weights.load_balancing > 0`;
    each lower bound is raised to at least `weights.load_balancing_floor * upper`.

    Returns:
        The scalar total loss and a dict with the detached float value of each computed (non-zero weight)
        term, unweighted, under the names of `TERM_NAMES`, plus "total".
    """
    if weights.load_balancing > 0 and (lower is None or upper is None):
        raise ValueError(
            f"load_balancing weight is {weights.load_balancing} but lower or upper bounds are missing. "
            "Pass the per-expert bounds or set the weight to 0."
        )

    terms: dict[str, Tensor] = {}
    if weights.surrogate > 0:
        terms["surrogate"] = collaboration_surrogate(
            seg_logit,
            routing_logits,
            reference,
            expert_masks,
            expert_available,
            roi,
            wrong_expert_penalty=weights.wrong_expert_penalty,
        )
    if weights.dice > 0:
        terms["dice"] = dice_loss(seg_logit, reference, roi)
    if weights.deferral > 0:
        terms["deferral"] = deferral_predictor_loss(
            deferral_logit,
            routing_logits,
            roi,
            mse_weight=weights.deferral_mse_weight,
            sparsity_weight=weights.deferral_sparsity_weight,
        )
    if weights.coherence > 0:
        terms["coherence"] = spatial_coherence(torch.sigmoid(deferral_logit), roi)
    if weights.load_balancing > 0:
        assert lower is not None and upper is not None
        floor = torch.maximum(lower, weights.load_balancing_floor * upper)
        terms["load_balancing"] = load_balancing(
            routing_logits,
            roi,
            floor,
            upper,
            temperature=weights.load_balancing_temperature,
            hard=weights.load_balancing_hard,
        )

    total = sum((getattr(weights, name) * value for name, value in terms.items()), start=seg_logit.new_zeros(()))
    values = {name: float(value.detach()) for name, value in terms.items()}
    values["total"] = float(total.detach())
    return total, values
