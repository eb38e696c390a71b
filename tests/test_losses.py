"""Tests for the DeferredSeg losses against values computed by hand with plain Python math."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.losses import (
    LossWeights,
    collaboration_surrogate,
    deferral_predictor_loss,
    deferredseg_loss,
    dice_loss,
    load_balancing,
    spatial_coherence,
)


def bce(logit: float, label: float) -> float:
    """Binary cross-entropy of one logit, written out with math."""
    return label * math.log1p(math.exp(-logit)) + (1 - label) * math.log1p(math.exp(logit))


def sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(value) for value in logits]
    return [value / sum(exps) for value in exps]


def row(values: list[float]) -> torch.Tensor:
    """Return a `1x1x1xN` float64 tensor: one image row of N pixels."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1)


def channels(per_pixel: list[list[float]]) -> torch.Tensor:
    """Return a `1xCx1xN` float64 tensor from N pixels of C channel values each."""
    return torch.tensor(per_pixel, dtype=torch.float64).T.reshape(1, len(per_pixel[0]), 1, len(per_pixel))


# Two pixels, two experts. Pixel 0: model right, expert 0 right, expert 1 wrong.
# Pixel 1: model wrong (s > 0 but y = 0), expert 0 wrong, expert 1 right.
SEG = [1.0, 0.3]
REF = [1.0, 0.0]
ROUTING = [[0.5, -1.0, 0.2], [-0.4, 0.8, 0.1]]
EXPERTS = [[1.0, 0.0], [1.0, 0.0]]


def expected_surrogate(available: list[bool], penalty: bool) -> float:
    total = 0.0
    for pixel in range(2):
        pi = softmax(ROUTING[pixel])
        value = bce(SEG[pixel], REF[pixel])
        if (SEG[pixel] > 0) == (REF[pixel] == 1):
            value -= math.log(pi[2])
        for expert in range(2):
            if not available[expert]:
                continue
            if EXPERTS[pixel][expert] == REF[pixel]:
                value -= math.log(pi[expert])
            elif penalty:
                value -= math.log(1 - pi[expert])
        total += value
    return total / 2


def surrogate_inputs(available: list[bool]) -> tuple[torch.Tensor, ...]:
    return (
        row(SEG),
        channels(ROUTING),
        row(REF),
        channels(EXPERTS),
        torch.tensor([available]),
        torch.ones(1, 1, 1, 2),
    )


@pytest.mark.parametrize("penalty", [False, True])
@pytest.mark.parametrize("available", [[True, True], [True, False], [False, False]])
def test_surrogate_hand_value(available: list[bool], penalty: bool) -> None:
    loss = collaboration_surrogate(*surrogate_inputs(available), wrong_expert_penalty=penalty)
    assert loss.item() == pytest.approx(expected_surrogate(available, penalty), rel=1e-12)


def test_surrogate_sigmoid_once() -> None:
    # BCE(s = 0, y = 1) is log 2; a second sigmoid would give log(1 + exp(-0.5)) = 0.474.
    loss = collaboration_surrogate(
        torch.zeros(1, 1, 1, 1),
        torch.zeros(1, 1, 1, 1),
        torch.ones(1, 1, 1, 1),
        torch.zeros(1, 0, 1, 1),
        torch.zeros(1, 0, dtype=torch.bool),
        torch.ones(1, 1, 1, 1),
    )
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_surrogate_unavailable_expert_ignored() -> None:
    seg, routing, reference, masks, _, roi = surrogate_inputs([True, False])
    available = torch.tensor([[True, False]])
    base = collaboration_surrogate(seg, routing, reference, masks, available, roi, wrong_expert_penalty=True)

    flipped = masks.clone()
    flipped[:, 1] = 1 - flipped[:, 1]
    changed = collaboration_surrogate(seg, routing, reference, flipped, available, roi, wrong_expert_penalty=True)
    assert changed.item() == base.item()


def test_surrogate_seg_gradient() -> None:
    # The model-correct indicator has no gradient, so d/ds is the BCE gradient alone: (sigmoid(s) - y) / N.
    seg, routing, reference, masks, available, roi = surrogate_inputs([True, True])
    seg.requires_grad_(True)
    routing.requires_grad_(True)
    loss = collaboration_surrogate(seg, routing, reference, masks, available, roi)
    seg_grad, routing_grad = torch.autograd.grad(loss, [seg, routing])

    for pixel in range(2):
        expected = (sigmoid(SEG[pixel]) - REF[pixel]) / 2
        assert seg_grad[0, 0, 0, pixel].item() == pytest.approx(expected, rel=1e-12)
    assert routing_grad.abs().sum().item() > 0


def test_surrogate_penalty_finite_extremes() -> None:
    # A wrong expert with logit 100 costs about -log(1 - pi) = 100 (bounded form, no overflow);
    # with logit -100 it costs about 0, where the official `+ log pi` form would give about -100.
    seg, routing, reference, masks, _, roi = surrogate_inputs([True, True])
    available = torch.tensor([[False, True]])
    seg = torch.full_like(seg, 5.0)
    reference = torch.ones_like(reference)
    masks = torch.zeros_like(masks)

    high = torch.tensor([0.0, 100.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1).expand(1, 3, 1, 2)
    loss_high = collaboration_surrogate(seg, high, reference, masks, available, roi, wrong_expert_penalty=True)
    expected_high = bce(5.0, 1.0) - math.log(1 / (2 + math.exp(100))) + (100 - math.log(2))
    assert loss_high.item() == pytest.approx(expected_high, rel=1e-9)

    low = -high
    loss_low = collaboration_surrogate(seg, low, reference, masks, available, roi, wrong_expert_penalty=True)
    expected_low = bce(5.0, 1.0) - math.log(1 / (1 + math.exp(-100) + 1)) + math.exp(-100) / 2
    assert loss_low.item() == pytest.approx(expected_low, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.floats(-60, 60), min_size=8, max_size=8),
    labels=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_surrogate_nonnegative_finite(logits: list[float], labels: list[bool]) -> None:
    # Every term is -log of a probability or a BCE, so the loss is finite and >= 0 for any logits.
    seg = torch.tensor(logits[:2]).reshape(1, 1, 1, 2)
    routing = torch.tensor(logits[2:]).reshape(1, 3, 1, 2)
    reference = torch.tensor(labels[:2], dtype=torch.float32).reshape(1, 1, 1, 2)
    masks = torch.tensor(labels[2:6], dtype=torch.float32).reshape(1, 2, 1, 2)
    loss = collaboration_surrogate(
        seg, routing, reference, masks, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, 1, 2),
        wrong_expert_penalty=True,
    )
    assert math.isfinite(loss.item())
    assert loss.item() >= 0


def test_dice_hand_value() -> None:
    logits = [2.0, -1.0, 0.5, 3.0]
    labels = [1.0, 0.0, 1.0, 1.0]
    roi = [1.0, 1.0, 1.0, 0.0]
    p = [sigmoid(value) for value in logits]
    overlap = sum(p[i] * labels[i] * roi[i] for i in range(4))
    sums = sum(p[i] * roi[i] for i in range(4)) + sum(labels[i] * roi[i] for i in range(4))
    expected = 1 - (2 * overlap + 1) / (sums + 1)

    loss = dice_loss(row(logits).reshape(1, 1, 2, 2), row(labels).reshape(1, 1, 2, 2), row(roi).reshape(1, 1, 2, 2))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_dice_empty_batch_goes_to_zero() -> None:
    # With no foreground, a confident background prediction gives a loss near 0, not near 1.
    loss = dice_loss(torch.full((2, 1, 4, 4), -20.0), torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    assert loss.item() < 1e-6


def test_deferral_hand_value() -> None:
    # K = 1. Pixel 0: expert logit above model -> deferred. Pixel 1: tie -> kept by the model.
    routing = [[1.0, -0.5], [0.3, 0.3]]
    deferral = [0.4, -1.2]
    targets = [1.0, 0.0]
    mse_weight, sparsity_weight = 0.7, 0.2
    expected = 0.0
    for pixel in range(2):
        q = sigmoid(deferral[pixel])
        mass = softmax(routing[pixel])[0]
        expected += bce(deferral[pixel], targets[pixel]) + mse_weight * (q - mass) ** 2 + sparsity_weight * q
    expected /= 2

    loss = deferral_predictor_loss(
        row(deferral), channels(routing), torch.ones(1, 1, 1, 2), mse_weight=mse_weight, sparsity_weight=sparsity_weight
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_deferral_no_routing_gradient() -> None:
    routing = torch.randn(2, 3, 4, 4, requires_grad=True)
    deferral = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = deferral_predictor_loss(deferral, routing, torch.ones(2, 1, 4, 4), mse_weight=5.0)
    deferral_grad, routing_grad = torch.autograd.grad(loss, [deferral, routing], allow_unused=True)
    assert routing_grad is None
    assert deferral_grad.abs().sum().item() > 0


def test_coherence_hand_value() -> None:
    p = torch.tensor([[0.1, 0.5], [0.9, 0.2]]).reshape(1, 1, 2, 2)
    full = spatial_coherence(p, torch.ones(1, 1, 2, 2))
    # Pairs: (0.1, 0.5), (0.9, 0.2) horizontal and (0.1, 0.9), (0.5, 0.2) vertical.
    assert full.item() == pytest.approx((0.4 + 0.7 + 0.8 + 0.3) / 4, rel=1e-6)

    # Without pixel (1, 1) only the pairs (0.1, 0.5) and (0.1, 0.9) have both pixels in the ROI.
    roi = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).reshape(1, 1, 2, 2)
    assert spatial_coherence(p, roi).item() == pytest.approx((0.4 + 0.8) / 2, rel=1e-6)


def test_coherence_constant_is_zero() -> None:
    assert spatial_coherence(torch.full((2, 1, 5, 5), 0.3), torch.ones(2, 1, 5, 5)).item() == 0.0


def test_coherence_rejects_logits() -> None:
    with pytest.raises(ValueError, match="deferral_prob"):
        spatial_coherence(torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 2, 2))


def test_load_balancing_inside_bounds() -> None:
    # pi = (0.25, 0.5, 0.25) at every pixel; the model channel (0.25) has no bound.
    routing = torch.tensor([0.0, math.log(2), 0.0]).reshape(1, 3, 1, 1).expand(2, 3, 3, 3)
    loss = load_balancing(routing, torch.ones(2, 1, 3, 3), torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.6]))
    assert loss.item() == 0.0


def test_load_balancing_hinge_value() -> None:
    # Two pixels, pixel 1 outside the ROI, so the mean is pixel 0's pi alone.
    routing = [[1.0, 0.0, -1.0], [5.0, 5.0, -5.0]]
    pi = softmax(routing[0])
    lower, upper = [0.7, 0.0], [1.0, 0.1]
    expected = max(0.0, lower[0] - pi[0]) + max(0.0, pi[1] - upper[1])
    assert expected > 0

    roi = row([1.0, 0.0])
    loss = load_balancing(channels(routing), roi, torch.tensor(lower), torch.tensor(upper))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_load_balancing_rejects_bounds() -> None:
    routing = torch.zeros(1, 3, 2, 2)
    roi = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="lower"):
        load_balancing(routing, roi, torch.tensor([0.5, 0.0]), torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match=r"upper has shape \(3,\)"):
        load_balancing(routing, roi, torch.zeros(2), torch.ones(3))


def test_load_balancing_floor_raises_lower() -> None:
    # One pixel with logits ln(0.2), ln(0.05), ln(0.75), so pi = (0.2, 0.05, 0.75) at temperature 1, model last.
    # Bounds [0, 0.5] per expert with a floor of 0.5 become [0.25, 0.5]: expert 0 is 0.05 short and
    # expert 1 0.2 short, so the term is 0.25. With a floor of 0 the loads are inside [0, 0.5], so it is 0.
    routing = torch.tensor([math.log(0.2), math.log(0.05), math.log(0.75)]).reshape(1, 3, 1, 1)
    inputs = {
        "seg_logit": torch.zeros(1, 1, 1, 1),
        "routing_logits": routing,
        "deferral_logit": torch.zeros(1, 1, 1, 1),
        "reference": torch.ones(1, 1, 1, 1),
        "expert_masks": torch.ones(1, 2, 1, 1),
        "expert_available": torch.ones(1, 2, dtype=torch.bool),
        "roi": torch.ones(1, 1, 1, 1),
        "lower": torch.zeros(2),
        "upper": torch.full((2,), 0.5),
    }
    floored = LossWeights(
        load_balancing=1.0, load_balancing_temperature=1.0, load_balancing_floor=0.5, load_balancing_hard=False
    )
    _, values = deferredseg_loss(**inputs, weights=floored)
    assert values["load_balancing"] == pytest.approx(0.25, rel=1e-6)
    unfloored = LossWeights(
        load_balancing=1.0, load_balancing_temperature=1.0, load_balancing_floor=0.0, load_balancing_hard=False
    )
    _, values = deferredseg_loss(**inputs, weights=unfloored)
    assert values["load_balancing"] == 0.0
    with pytest.raises(ValueError, match="load_balancing_floor"):
        LossWeights(load_balancing_floor=1.5)


def test_load_balancing_hard_loads() -> None:
    # Two pixels: pixel 0 routes to expert 0 (logit 2 against the model's 1), pixel 1 stays with the model.
    # Hard loads are (0.5, 0): expert 0 is 0.25 over its upper bound 0.25 and expert 1 is 0.1 under its lower
    # bound 0.1, so the term is 0.35. Soft probabilities give mean loads of about (0.355, 0.068) instead.
    routing = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[1.0, 3.0]]]], requires_grad=True)
    roi = torch.ones(1, 1, 1, 2)
    lower, upper = torch.tensor([0.0, 0.1]), torch.tensor([0.25, 0.5])
    loss = load_balancing(routing, roi, lower, upper, temperature=1.0, hard=True)
    assert loss.item() == pytest.approx(0.35, rel=1e-6)
    # The gradient is the softmax's: it lowers expert 0's logits and raises expert 1's on both pixels.
    loss.backward()
    assert bool((routing.grad[0, 0] > 0).all())
    assert bool((routing.grad[0, 1] < 0).all())
    soft = load_balancing(routing.detach(), roi, lower, upper, temperature=1.0)
    assert soft.item() == pytest.approx(0.13761, abs=1e-4)


def random_inputs(generator: torch.Generator, n_experts: int = 2) -> dict[str, torch.Tensor]:
    shape = (2, 1, 6, 6)
    return {
        "seg_logit": torch.randn(shape, generator=generator),
        "routing_logits": torch.randn((2, n_experts + 1, 6, 6), generator=generator),
        "deferral_logit": torch.randn(shape, generator=generator),
        "reference": (torch.rand(shape, generator=generator) > 0.5).float(),
        "expert_masks": (torch.rand((2, n_experts, 6, 6), generator=generator) > 0.5).float(),
        "expert_available": torch.ones(2, n_experts, dtype=torch.bool),
    }


def all_terms(inputs: dict[str, torch.Tensor], roi: torch.Tensor) -> list[float]:
    weights = LossWeights(load_balancing=1.0, wrong_expert_penalty=True)
    bounds = torch.tensor([0.0, 0.0]), torch.tensor([0.05, 0.05])
    _, values = deferredseg_loss(**inputs, roi=roi, weights=weights, lower=bounds[0], upper=bounds[1])
    return [values[name] for name in ("surrogate", "dice", "deferral", "coherence", "load_balancing")]


def test_terms_ignore_outside_roi() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = random_inputs(generator)
    roi = torch.zeros(2, 1, 6, 6)
    roi[:, :, 1:5, 2:6] = 1
    base = all_terms(inputs, roi)

    outside = roi == 0
    changed = random_inputs(generator)
    for name in ("seg_logit", "deferral_logit", "reference"):
        changed[name] = torch.where(outside, changed[name], inputs[name])
    for name in ("routing_logits", "expert_masks"):
        changed[name] = torch.where(outside.expand_as(changed[name]), changed[name], inputs[name])
    assert not torch.equal(changed["seg_logit"], inputs["seg_logit"])

    assert all_terms(changed, roi) == pytest.approx(base, rel=1e-6)


def test_terms_without_experts() -> None:
    # K = 0: the surrogate is the BCE alone, the deferral target and expert mass are 0, load balancing is 0.
    inputs = random_inputs(torch.Generator().manual_seed(1), n_experts=0)
    roi = torch.ones(2, 1, 6, 6)
    weights = LossWeights(load_balancing=1.0)
    _, values = deferredseg_loss(**inputs, roi=roi, weights=weights, lower=torch.zeros(0), upper=torch.zeros(0))

    seg = inputs["seg_logit"].flatten().tolist()
    reference = inputs["reference"].flatten().tolist()
    expected_bce = sum(bce(s, y) for s, y in zip(seg, reference)) / len(seg)
    assert values["surrogate"] == pytest.approx(expected_bce, rel=1e-5)

    deferral = inputs["deferral_logit"].flatten().tolist()
    expected_deferral = sum(bce(d, 0.0) + sigmoid(d) ** 2 + 0.01 * sigmoid(d) for d in deferral) / len(deferral)
    assert values["deferral"] == pytest.approx(expected_deferral, rel=1e-5)
    assert values["load_balancing"] == 0.0


def test_total_coherence_only() -> None:
    # Coherence acts on q = sigmoid(d). In the row of logits (0, 2, 2) the pairs differ by
    # |0.5 - sigmoid(2)| and 0.
    inputs = random_inputs(torch.Generator().manual_seed(2))
    for name in ("seg_logit", "routing_logits", "reference", "expert_masks"):
        inputs[name] = inputs[name][:1, :, :1, :3]
    inputs["deferral_logit"] = row([0.0, 2.0, 2.0]).float()
    inputs["expert_available"] = torch.ones(1, 2, dtype=torch.bool)
    weights = LossWeights(surrogate=0.0, dice=0.0, deferral=0.0, coherence=2.0)

    total, values = deferredseg_loss(**inputs, roi=torch.ones(1, 1, 1, 3), weights=weights)
    expected = (abs(0.5 - sigmoid(2.0)) + 0.0) / 2
    assert set(values) == {"coherence", "total"}
    assert values["coherence"] == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(2 * expected, rel=1e-6)


def test_total_weighted_sum() -> None:
    inputs = random_inputs(torch.Generator().manual_seed(3))
    roi = torch.ones(2, 1, 6, 6)
    weights = LossWeights()
    total, values = deferredseg_loss(**inputs, roi=roi, weights=weights)

    separate = (
        1.0 * collaboration_surrogate(
            inputs["seg_logit"], inputs["routing_logits"], inputs["reference"],
            inputs["expert_masks"], inputs["expert_available"], roi,
        ).item()
        + 1.0 * dice_loss(inputs["seg_logit"], inputs["reference"], roi).item()
        + 0.5 * deferral_predictor_loss(inputs["deferral_logit"], inputs["routing_logits"], roi).item()
        + 0.1 * spatial_coherence(torch.sigmoid(inputs["deferral_logit"]), roi).item()
    )
    assert "load_balancing" not in values
    assert total.item() == pytest.approx(separate, rel=1e-6)
    assert values["total"] == pytest.approx(separate, rel=1e-6)


def test_total_requires_bounds() -> None:
    inputs = random_inputs(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="bounds are missing"):
        deferredseg_loss(**inputs, roi=torch.ones(2, 1, 6, 6), weights=LossWeights(load_balancing=0.5))


def test_weights_rejected() -> None:
    with pytest.raises(ValueError, match="dice=-1"):
        LossWeights(dice=-1.0)
    with pytest.raises(ValueError, match="are 0"):
        LossWeights(surrogate=0.0, dice=0.0, deferral=0.0, coherence=0.0)


def test_shape_errors_name_shapes() -> None:
    inputs = random_inputs(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"expert_masks has shape \(2, 1, 6, 6\), expected \(2, 2, 6, 6\)"):
        collaboration_surrogate(
            inputs["seg_logit"], inputs["routing_logits"], inputs["reference"],
            inputs["expert_masks"][:, :1], inputs["expert_available"], torch.ones(2, 1, 6, 6),
        )
    with pytest.raises(ValueError, match="0/255"):
        dice_loss(inputs["seg_logit"], inputs["reference"] * 255, torch.ones(2, 1, 6, 6))


def test_load_balancing_temperature_sharpens():
    # One pixel, expert logit 1 and model logit 0. At temperature 0.5 the expert's probability is
    # e^2 / (e^2 + 1); above an upper bound of 0.5 the hinge is that minus 0.5.
    logits = torch.tensor([[[[1.0]], [[0.0]]]])
    roi = torch.ones(1, 1, 1, 1)
    bound = torch.tensor([0.5])
    expected = math.exp(2) / (math.exp(2) + 1) - 0.5
    got = load_balancing(logits, roi, torch.tensor([0.0]), bound, temperature=0.5)
    assert float(got) == pytest.approx(expected)
    soft = load_balancing(logits, roi, torch.tensor([0.0]), bound, temperature=1.0)
    assert float(soft) == pytest.approx(math.exp(1) / (math.exp(1) + 1) - 0.5)
