"""Tests of the evaluation metrics, the oracle routing and the confidence baseline."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from common.metrics import (
    MODEL_OWNER,
    ImageEvaluation,
    capacity_budget,
    capacity_violations,
    confidence_assignment,
    count_regions,
    evaluate_image,
    expert_accuracy,
    oracle_assignment,
    owner_counts,
    segmentation_scores,
    summarize,
    system_prediction,
)

M = MODEL_OWNER


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _owner(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def _corrected(owner: torch.Tensor, model_pred: torch.Tensor, reference: torch.Tensor, experts: torch.Tensor) -> int:
    """Count deferred pixels where the model is wrong and the chosen expert right, pixel by pixel."""
    total = 0
    for (row, col), expert in zip(itertools.product(range(owner.shape[0]), range(owner.shape[1])), owner.flatten()):
        expert = int(expert)
        if expert == M:
            continue
        if model_pred[row, col] != reference[row, col] and experts[expert, row, col] == reference[row, col]:
            total += 1
    return total


def _brute_force_two_experts(
    model_pred: torch.Tensor,
    reference: torch.Tensor,
    experts: torch.Tensor,
    available: torch.Tensor,
    roi: torch.Tensor,
    budget: list[int],
) -> int:
    """Maximum corrected pixels for K=2: try every set expert 0 could take, expert 1 then fills greedily."""
    wrong = (model_pred != reference) & roi
    fixable = [
        set(torch.nonzero((wrong & (experts[k] == reference)).flatten()).flatten().tolist()) if available[k] else set()
        for k in range(2)
    ]
    best = 0
    pixels0 = sorted(fixable[0])
    for size in range(min(budget[0], len(pixels0)) + 1):
        for expert0_pixels in itertools.combinations(pixels0, size):
            best = max(best, size + min(budget[1], len(fixable[1] - set(expert0_pixels))))
    return best


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation scores
# ---------------------------------------------------------------------------------------------------------------------


def test_scores_hand_computed() -> None:
    reference = _mask([[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    pred = _mask([[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    roi = torch.ones(3, 3, dtype=torch.bool)

    # TP = 2, FP = 1, FN = 1.
    scores = segmentation_scores(pred, reference, roi)
    assert scores["dice"] == pytest.approx(4 / 6)
    assert scores["iou"] == pytest.approx(2 / 4)
    assert scores["sensitivity"] == pytest.approx(2 / 3)


def test_scores_roi_exclusion() -> None:
    reference = _mask([[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    pred = _mask([[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    roi = torch.ones(3, 3, dtype=torch.bool)
    roi[1, 0] = False

    # The false positive lies outside the ROI: TP = 2, FP = 0, FN = 1.
    scores = segmentation_scores(pred, reference, roi)
    assert scores["dice"] == pytest.approx(4 / 5)
    assert scores["iou"] == pytest.approx(2 / 3)
    assert scores["sensitivity"] == pytest.approx(2 / 3)


def test_scores_both_empty_in_roi() -> None:
    # Foreground only outside the ROI, where it does not count.
    reference = _mask([[1, 0], [0, 0]])
    pred = _mask([[1, 0], [0, 0]])
    roi = _mask([[0, 1], [1, 1]])

    assert segmentation_scores(pred, reference, roi) == {"dice": 1.0, "iou": 1.0, "sensitivity": 1.0}


def test_scores_empty_reference() -> None:
    reference = _mask([[0, 0], [0, 0]])
    pred = _mask([[0, 1], [0, 0]])
    roi = torch.ones(2, 2, dtype=torch.bool)

    assert segmentation_scores(pred, reference, roi) == {"dice": 0.0, "iou": 0.0, "sensitivity": 0.0}


def test_scores_empty_prediction() -> None:
    reference = _mask([[0, 1], [0, 0]])
    pred = _mask([[0, 0], [0, 0]])
    roi = torch.ones(2, 2, dtype=torch.bool)

    assert segmentation_scores(pred, reference, roi) == {"dice": 0.0, "iou": 0.0, "sensitivity": 0.0}


def test_scores_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="reference has shape"):
        segmentation_scores(torch.zeros(2, 2), torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# System prediction, counts, budget, violations, regions
# ---------------------------------------------------------------------------------------------------------------------


def test_system_prediction_substitution() -> None:
    model_pred = _mask([[1, 1, 0], [0, 0, 0]])
    experts = torch.stack([_mask([[0, 0, 0], [1, 1, 1]]), _mask([[1, 0, 1], [1, 1, 1]])])
    owner = _owner([[0, M, 1], [0, 1, M]])

    # Expert labels: (0,0) 0 from expert 0, (0,2) 1 from expert 1, (1,0) 1 from expert 0, (1,1) 1 from expert 1.
    expected = _mask([[0, 1, 1], [1, 1, 0]])
    result = system_prediction(model_pred, owner, experts)
    assert result.dtype == torch.bool
    assert torch.equal(result, expected)


def test_system_prediction_invalid_owner() -> None:
    with pytest.raises(ValueError, match="expert indices 0..0"):
        system_prediction(torch.zeros(1, 2), _owner([[1, M]]), torch.zeros(1, 1, 2))


def test_owner_counts_per_expert() -> None:
    owner = _owner([[M, 0, 2], [2, 2, M]])

    assert owner_counts(owner, 4).tolist() == [1, 0, 3, 0]


def test_budget_floor() -> None:
    capacity = torch.tensor([0.05, 0.29, 1.0, 0.333], dtype=torch.float64)

    # 0.05 * 99 = 4.95 gives 4. The float64 product 0.29 * 100 rounds below 29, but the budget is still 29.
    assert capacity_budget(capacity, 99).tolist() == [4, 28, 99, 32]
    assert capacity_budget(capacity, 100).tolist() == [5, 29, 100, 33]
    assert capacity_budget(capacity, 0).tolist() == [0, 0, 0, 0]


def test_budget_invalid_capacity() -> None:
    with pytest.raises(ValueError, match=r"capacity must lie in \(0, 1\]"):
        capacity_budget(torch.tensor([0.1, 0.0]), 10)
    with pytest.raises(ValueError, match=r"capacity must lie in \(0, 1\]"):
        capacity_budget(torch.tensor([1.5]), 10)


def test_violations_overloaded_map() -> None:
    roi = torch.ones(2, 5, dtype=torch.bool)
    # Expert 0 has 3 of 10 pixels against capacity 0.2 (over). Expert 1 has 2 of 10 against 0.2 (exactly full).
    # Expert 2 has 1 of 10 against 0.05 (over).
    owner = _owner([[0, 0, 0, 1, 1], [2, M, M, M, M]])
    capacity = torch.tensor([0.2, 0.2, 0.05], dtype=torch.float64)

    assert capacity_violations(owner, roi, capacity) == 2


def test_violations_none_at_capacity() -> None:
    roi = torch.ones(2, 5, dtype=torch.bool)
    owner = _owner([[0, 0, 1, M, M], [M, M, M, M, M]])

    assert capacity_violations(owner, roi, torch.tensor([0.2, 0.1], dtype=torch.float64)) == 0


def test_violations_owner_outside_roi() -> None:
    roi = _mask([[1, 0]])
    with pytest.raises(ValueError, match="outside the ROI"):
        capacity_violations(_owner([[M, 0]]), roi, torch.tensor([1.0]))


def test_count_regions_diagonal() -> None:
    # The two diagonal pixels touch at a corner: one region with 8-connectivity. The right column is another.
    mask = _mask([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]])

    assert count_regions(mask) == 2
    assert count_regions(torch.zeros(3, 3, dtype=torch.bool)) == 0


def test_expert_accuracy_counts() -> None:
    reference = _mask([[1, 0, 1], [0, 0, 0]])
    roi = _mask([[1, 1, 1], [1, 1, 0]])
    experts = torch.stack([_mask([[1, 1, 1], [0, 0, 1]]), _mask([[0, 0, 0], [0, 0, 0]]), reference])
    available = torch.tensor([True, True, False])

    # Inside the ROI expert 0 is wrong only at (0,1), because (1,2) lies outside it. Expert 1 misses 2 foreground pixels.
    correct, total = expert_accuracy(experts, reference, roi, available)
    assert correct.tolist() == [4, 3, 0]
    assert total.tolist() == [5, 5, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Oracle routing
# ---------------------------------------------------------------------------------------------------------------------


def test_oracle_single_fixer_first() -> None:
    # The model is wrong on pixels 0..2. Both experts can fix pixel 0, but only expert 1 can fix pixels 1 and 2.
    reference = _mask([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    model_pred = torch.zeros_like(reference)
    expert0 = _mask([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    expert1 = reference.clone()
    experts = torch.stack([expert0, expert1])
    roi = torch.ones_like(reference)
    # Budgets: expert 0 gets 1 pixel, expert 1 gets 2. Going by pixel index with the most-budget rule would
    # give pixel 0 to expert 1 and leave pixel 2 uncorrected.
    capacity = torch.tensor([0.1, 0.2], dtype=torch.float64)

    owner = oracle_assignment(model_pred, reference, experts, torch.tensor([True, True]), roi, capacity)
    assert owner.tolist() == [[0, 1, 1, M, M, M, M, M, M, M]]


def test_oracle_capacity_binding() -> None:
    reference = _mask([[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    model_pred = torch.zeros_like(reference)
    experts = reference[None].clone()
    roi = torch.ones_like(reference)

    # Five fixable pixels, budget floor(0.25 * 10) = 2: the first two in pixel order.
    owner = oracle_assignment(model_pred, reference, experts, torch.tensor([True]), roi, torch.tensor([0.25]))
    assert owner.tolist() == [[0, 0, M, M, M, M, M, M, M, M]]


def test_oracle_most_budget_wins() -> None:
    # Both experts can fix both wrong pixels. Expert 1 has more budget left, so it takes the first pixel.
    # Then each expert has one pixel left, and the tie goes to expert 0.
    reference = _mask([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    model_pred = torch.zeros_like(reference)
    experts = torch.stack([reference, reference])
    roi = torch.ones_like(reference)
    capacity = torch.tensor([0.1, 0.2], dtype=torch.float64)

    owner = oracle_assignment(model_pred, reference, experts, torch.tensor([True, True]), roi, capacity)
    assert owner.tolist() == [[1, 0, M, M, M, M, M, M, M, M]]


def test_oracle_unavailable_expert() -> None:
    reference = _mask([[1, 1, 0, 0]])
    model_pred = torch.zeros_like(reference)
    experts = torch.stack([reference, reference])
    roi = torch.ones_like(reference)

    owner = oracle_assignment(
        model_pred, reference, experts, torch.tensor([False, True]), roi, torch.tensor([1.0, 0.25])
    )
    assert owner.tolist() == [[1, M, M, M]]


def test_oracle_no_experts() -> None:
    reference = _mask([[1, 0], [0, 1]])
    model_pred = ~reference
    no_experts = torch.zeros(0, 2, 2, dtype=torch.bool)

    owner = oracle_assignment(
        model_pred, reference, no_experts, torch.zeros(0, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool),
        torch.zeros(0),
    )
    assert owner.tolist() == [[M, M], [M, M]]


def test_oracle_defers_only_fixes() -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(50):
        shape = (6, 7)
        reference = torch.rand(shape, generator=generator) < 0.4
        model_pred = torch.rand(shape, generator=generator) < 0.4
        experts = torch.rand((3, *shape), generator=generator) < 0.4
        available = torch.rand(3, generator=generator) < 0.8
        roi = torch.rand(shape, generator=generator) < 0.8
        capacity = torch.rand(3, generator=generator, dtype=torch.float64) * 0.5 + 0.01

        owner = oracle_assignment(model_pred, reference, experts, available, roi, capacity)
        budget = capacity_budget(capacity, int(roi.sum()))
        for row, col in torch.nonzero(owner != M).tolist():
            expert = int(owner[row, col])
            assert roi[row, col]
            assert model_pred[row, col] != reference[row, col]
            assert experts[expert, row, col] == reference[row, col]
            assert available[expert]
        assert (owner_counts(owner, 3) <= budget).all()


def test_oracle_optimal_two_experts() -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(200):
        shape = (3, 4)
        reference = torch.rand(shape, generator=generator) < 0.5
        model_pred = torch.rand(shape, generator=generator) < 0.5
        experts = torch.rand((2, *shape), generator=generator) < 0.5
        available = torch.rand(2, generator=generator) < 0.9
        roi = torch.rand(shape, generator=generator) < 0.9
        # Small capacities so that budgets bind and the order of the greedy pass matters.
        capacity = torch.randint(1, 5, (2,), generator=generator).double() / 10

        owner = oracle_assignment(model_pred, reference, experts, available, roi, capacity)
        budget = capacity_budget(capacity, int(roi.sum())).tolist()
        expected = _brute_force_two_experts(model_pred, reference, experts, available, roi, budget)
        assert _corrected(owner, model_pred, reference, experts) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Confidence baseline
# ---------------------------------------------------------------------------------------------------------------------


def test_confidence_order_and_counts() -> None:
    prob = torch.tensor([[0.9, 0.5, 0.45, 0.0], [0.6, 0.55, 0.3, 0.52]])
    roi = torch.ones(2, 4, dtype=torch.bool)
    roi[1, 3] = False  # the second least confident pixel lies outside the ROI
    # Expert 1 is the most accurate, so it gets the 2 least confident ROI pixels. Expert 0 gets the next one.
    counts = torch.tensor([1, 2], dtype=torch.int64)

    # Confidence |p - 0.5| is 0.0 at (0,1), then 0.05 at (0,2) and (1,1) (a tie broken by pixel index), then 0.1.
    owner = confidence_assignment(prob, roi, counts, [1, 0], torch.tensor([True, True]))
    assert owner.tolist() == [[M, 1, 1, M], [M, 0, M, M]]
    assert owner_counts(owner, 2).tolist() == [1, 2]


def test_confidence_unavailable_skipped() -> None:
    prob = torch.tensor([[0.5, 0.45, 0.3, 0.9]])
    roi = torch.ones(1, 4, dtype=torch.bool)
    counts = torch.tensor([1, 2], dtype=torch.int64)

    # Expert 1 is first in priority but unavailable: its count is dropped, expert 0 takes the least confident.
    owner = confidence_assignment(prob, roi, counts, [1, 0], torch.tensor([True, False]))
    assert owner.tolist() == [[0, M, M, M]]


def test_confidence_invalid_priority() -> None:
    with pytest.raises(ValueError, match="expert_priority must list every expert"):
        confidence_assignment(
            torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1, 0]), [0, 0], torch.ones(2)
        )


# ---------------------------------------------------------------------------------------------------------------------
# Per-image evaluation and summary
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluate_image_hand_case() -> None:
    prob = torch.tensor([[0.9, 0.2, 0.6, 0.4, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1]])
    reference = _mask([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    roi = torch.ones(2, 5, dtype=torch.bool)
    # The model prediction is [[1, 0, 1, 0, 0], [0, ...]], which misses pixel (0,1).
    expert0 = reference.clone()
    expert1 = _mask([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    experts = torch.stack([expert0, expert1])
    available = torch.tensor([True, True])
    capacity = torch.tensor([0.2, 0.2], dtype=torch.float64)
    # Routing sends (0,3) to expert 1 (who breaks it) and (1,0) to expert 0 (model already right).
    owner = _owner([[M, M, M, 1, M], [0, M, M, M, M]])
    demand_owner = _owner([[M, 0, 0, 1, M], [0, M, M, M, M]])

    result = evaluate_image(prob, reference, roi, experts, available, capacity, owner, demand_owner, [0, 1])

    # Model: TP 2, FP 0, FN 1. System adds a false positive at (0,3): TP 2, FP 1, FN 1.
    assert result.model_scores["dice"] == pytest.approx(4 / 5)
    assert result.model_scores["iou"] == pytest.approx(2 / 3)
    assert result.model_scores["sensitivity"] == pytest.approx(2 / 3)
    assert result.system_scores["dice"] == pytest.approx(4 / 6)
    # The oracle sends (0,1) to expert 0: perfect.
    assert result.oracle_system_dice == pytest.approx(1.0)
    # Confidence baseline, 1 pixel each, expert 0 first: (0,3) p=0.4 goes to expert 0 (right, no change),
    # then (0,2) p=0.6 to expert 1 (right, no change), so it equals the model.
    assert result.confidence_system_dice == pytest.approx(4 / 5)
    assert result.deferral_rate == pytest.approx(2 / 10)
    assert result.deferral_regions == 2
    assert result.demand == pytest.approx([0.3, 0.1])
    assert result.load == pytest.approx([0.1, 0.1])
    assert result.expert_violations == [0, 0]
    assert result.capacity_violations == 0
    assert result.n_roi == 10
    assert result.expert_available == [True, True]
    assert result.corrected_pixels == [0, 0]
    assert result.deferred_pixels == [1, 1]


def test_evaluate_image_rejects_unavailable() -> None:
    reference = _mask([[1, 0]])
    with pytest.raises(ValueError, match="did not annotate this case"):
        evaluate_image(
            torch.tensor([[0.9, 0.1]]),
            reference,
            torch.ones(1, 2, dtype=torch.bool),
            reference[None],
            torch.tensor([False]),
            torch.tensor([1.0]),
            _owner([[0, M]]),
            _owner([[0, M]]),
            [0],
        )


def test_evaluate_image_rejects_logits() -> None:
    reference = _mask([[1, 0]])
    with pytest.raises(ValueError, match="Apply a sigmoid"):
        evaluate_image(
            torch.tensor([[2.0, -1.0]]),
            reference,
            torch.ones(1, 2, dtype=torch.bool),
            reference[None],
            torch.tensor([True]),
            torch.tensor([1.0]),
            _owner([[M, M]]),
            _owner([[M, M]]),
            [0],
        )


def _evaluation(
    model: float,
    system: float,
    oracle: float,
    demand: list[float],
    load: list[float],
    available: list[bool],
    corrected: list[int],
    deferred: list[int],
    violations: list[int],
) -> ImageEvaluation:
    return ImageEvaluation(
        model_scores={"dice": model, "iou": model / 2, "sensitivity": model / 4},
        system_scores={"dice": system, "iou": system / 2, "sensitivity": system / 4},
        oracle_system_dice=oracle,
        confidence_system_dice=(model + system) / 2,
        deferral_rate=sum(load),
        deferral_regions=len(corrected) + sum(deferred),
        demand=demand,
        load=load,
        expert_violations=violations,
        capacity_violations=sum(violations),
        n_roi=100,
        expert_available=available,
        corrected_pixels=corrected,
        deferred_pixels=deferred,
    )


def test_summarize_hand_means() -> None:
    evaluations = [
        _evaluation(0.6, 0.7, 0.9, [0.1, 0.4], [0.1, 0.2], [True, True], [3, 1], [10, 20], [0, 0]),
        _evaluation(0.8, 0.8, 1.0, [0.3, 0.0], [0.05, 0.0], [True, False], [2, 0], [5, 0], [0, 0]),
    ]

    summary = summarize(evaluations, ["expert-1", "expert-2"], [0.1, 0.2])

    assert set(summary) == {
        "num_images", "model_dice", "model_iou", "model_sensitivity", "system_dice", "system_iou",
        "system_sensitivity", "oracle_system_dice", "oracle_gain_share", "confidence_system_dice",
        "deferral_rate", "deferral_regions", "capacity_violations", "experts",
    }
    assert summary["num_images"] == 2
    assert summary["model_dice"] == pytest.approx(0.7)
    assert summary["model_iou"] == pytest.approx(0.35)
    assert summary["system_dice"] == pytest.approx(0.75)
    assert summary["system_sensitivity"] == pytest.approx(0.1875)
    assert summary["oracle_system_dice"] == pytest.approx(0.95)
    # (0.75 - 0.7) / (0.95 - 0.7)
    assert summary["oracle_gain_share"] == pytest.approx(0.2)
    assert summary["confidence_system_dice"] == pytest.approx(0.725)
    assert summary["deferral_rate"] == pytest.approx((0.3 + 0.05) / 2)
    assert summary["deferral_regions"] == pytest.approx((32 + 7) / 2)
    assert summary["capacity_violations"] == 0

    first = summary["experts"]["expert-1"]
    assert first["capacity"] == pytest.approx(0.1)
    assert first["demand"] == pytest.approx(0.2)
    assert first["load"] == pytest.approx(0.075)
    assert first["utilization"] == pytest.approx(0.75)
    assert first["pressure"] == pytest.approx(2.0)
    assert first["violations"] == 0
    assert first["deferral_precision"] == pytest.approx(5 / 15)

    # Expert 2 annotated only the first image, so its means use that image alone.
    second = summary["experts"]["expert-2"]
    assert second["demand"] == pytest.approx(0.4)
    assert second["load"] == pytest.approx(0.2)
    assert second["utilization"] == pytest.approx(1.0)
    assert second["pressure"] == pytest.approx(2.0)
    assert second["deferral_precision"] == pytest.approx(1 / 20)

    assert json.loads(json.dumps(summary)) == summary


def test_summarize_no_oracle_gain() -> None:
    evaluations = [_evaluation(0.9, 0.8, 0.9, [0.0], [0.0], [False], [0], [0], [0])]

    summary = summarize(evaluations, ["expert-1"], [0.05])

    assert summary["oracle_gain_share"] == 0.0
    assert summary["experts"]["expert-1"]["demand"] == 0.0
    assert summary["experts"]["expert-1"]["deferral_precision"] == 0.0


def test_summarize_sums_violations() -> None:
    evaluations = [
        _evaluation(0.5, 0.6, 0.7, [0.2, 0.2], [0.2, 0.2], [True, True], [0, 0], [20, 20], [1, 1]),
        _evaluation(0.5, 0.6, 0.7, [0.2, 0.0], [0.2, 0.0], [True, True], [0, 0], [20, 0], [1, 0]),
    ]

    summary = summarize(evaluations, ["a", "b"], [0.1, 0.5])

    assert summary["capacity_violations"] == 3
    assert summary["experts"]["a"]["violations"] == 2
    assert summary["experts"]["b"]["violations"] == 1


def test_summarize_mismatched_experts() -> None:
    evaluations = [_evaluation(0.9, 0.8, 0.9, [0.0], [0.0], [True], [0], [0], [0])]

    with pytest.raises(ValueError, match="capacity lists 1 values for 2 expert_ids"):
        summarize(evaluations, ["a", "b"], [0.1])
    with pytest.raises(ValueError, match="evaluation 0 has 1 experts"):
        summarize(evaluations, ["a", "b"], [0.1, 0.1])
