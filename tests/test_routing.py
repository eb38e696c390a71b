"""Tests of the capacity-constrained routing."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.routing import assign_with_capacity, softmax_scores


def test_overflow_falls_back_to_next_best_channel():
    # Four ROI pixels all prefer expert 0 (capacity 2 pixels); their second choice is expert 1 or the model.
    scores = torch.tensor(
        [
            [[0.9, 0.8, 0.7, 0.6]],  # expert 0
            [[0.05, 0.15, 0.2, 0.1]],  # expert 1
            [[0.05, 0.05, 0.1, 0.3]],  # model
        ]
    )
    roi = torch.ones(1, 4, dtype=torch.bool)
    routing = assign_with_capacity(scores, roi, torch.tensor([0.5, 0.5]))

    # Expert 0 keeps its two highest-scoring pixels; pixel 2 falls to expert 1, pixel 3 to the model.
    assert routing.owner.tolist() == [[0, 0, 1, -1]]
    assert routing.demand_owner.tolist() == [[0, 0, 0, 0]]


def test_expert_below_model_stays_idle():
    scores = torch.tensor([[[0.1, 0.2]], [[0.9, 0.8]]])
    routing = assign_with_capacity(scores, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]))
    assert routing.owner.tolist() == [[-1, -1]]


def test_outside_roi_and_unavailable_expert_get_nothing():
    scores = torch.tensor([[[0.9, 0.9]], [[0.9, 0.9]], [[0.0, 0.0]]])
    roi = torch.tensor([[True, False]])
    routing = assign_with_capacity(scores, roi, torch.tensor([1.0, 1.0]), available=torch.tensor([False, True]))
    assert routing.owner.tolist() == [[1, -1]]
    assert routing.demand_owner.tolist() == [[1, -1]]


def test_nan_scores_never_defer():
    scores = torch.tensor([[[float("nan")]], [[0.2]]])
    routing = assign_with_capacity(scores, torch.ones(1, 1, dtype=torch.bool), torch.tensor([1.0]))
    assert routing.owner.tolist() == [[-1]]


def test_prices_shift_expert_scores_only():
    logits = torch.zeros(3, 1, 1)
    scores = softmax_scores(logits, torch.tensor([0.1, 0.0]))
    assert torch.allclose(scores[:, 0, 0], torch.tensor([1 / 3 - 0.1, 1 / 3, 1 / 3]))


@settings(max_examples=200, deadline=None)
@given(
    num_experts=st.integers(0, 4),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_capacity_guarantee_on_random_inputs(num_experts, height, width, seed, data):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_experts + 1, height, width, generator=generator)
    roi = torch.rand(height, width, generator=generator) < data.draw(st.floats(0.0, 1.0))
    capacity = torch.tensor(
        data.draw(st.lists(st.floats(0.001, 1.0), min_size=num_experts, max_size=num_experts)), dtype=torch.float32
    )
    available = torch.rand(num_experts, generator=generator) < 0.8

    routing = assign_with_capacity(scores, roi, capacity, available)
    n_roi = int(roi.sum())

    assert (routing.owner[~roi] == -1).all()
    for k in range(num_experts):
        load = int((routing.owner == k).sum())
        assert load <= math.floor(float(capacity[k]) * n_roi)
        if not available[k]:
            assert load == 0
        # Every pixel an expert receives scores above the model for that expert.
        chosen = routing.owner == k
        assert (scores[k][chosen] > scores[-1][chosen]).all()

    # A pixel stays with the model while it prefers some expert that still has room: never.
    for k in range(num_experts):
        room = math.floor(float(capacity[k]) * n_roi) - int((routing.owner == k).sum())
        if room > 0 and available[k]:
            stuck = (routing.owner == -1) & roi & (scores[k] > scores[-1])
            assert not stuck.any()
