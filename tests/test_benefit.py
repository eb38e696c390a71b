"""Tests of the benefit router: scores, capacity-limited assignment, price fitting, routing data."""

import math

import pytest
import torch

from client.engine import (
    _platt_scaling,
    correctness_loss,
    cross_fitted_sources,
    fit_correctness_anchors,
    routing_cases,
)
from common.config import TrainSettings
from common.model import CorrectnessHeads, DeferredSegNet, NetworkConfig
from common.routing import assign_with_capacity, benefit_scores, fit_prices


def logit(p):
    return math.log(p / (1 - p))


def correctness(probabilities):
    """(K+1)HW logits from a nested list of probabilities, model last."""
    return torch.tensor([[[logit(p) for p in row] for row in channel] for channel in probabilities])


def test_benefit_is_expert_minus_model_probability():
    logits = correctness([[[0.9, 0.6]], [[0.7, 0.95]], [[0.8, 0.5]]])  # expert 0, expert 1, model
    scores = benefit_scores(logits, torch.tensor([0.05, 0.0]))
    assert scores[0, 0].tolist() == pytest.approx([0.9 - 0.8 - 0.05, 0.6 - 0.5 - 0.05])
    assert scores[1, 0].tolist() == pytest.approx([0.7 - 0.8, 0.95 - 0.5])
    assert scores[2].abs().sum() == 0


def test_highest_benefit_first_then_overflow():
    # Expert 0 helps on all four pixels (benefits 0.4, 0.3, 0.2, 0.1) but has room for 2 of 4 ROI pixels;
    # expert 1 helps less on pixels 2 and 3 (0.15, 0.05) and has room for 1.
    model = [[0.5, 0.5, 0.5, 0.5]]
    logits = correctness([[[0.9, 0.8, 0.7, 0.6]], [[0.4, 0.4, 0.65, 0.55]], model])
    routing = assign_with_capacity(
        benefit_scores(logits), torch.ones(1, 4, dtype=torch.bool), torch.tensor([0.5, 0.25])
    )
    assert routing.owner.tolist() == [[0, 0, 1, -1]]
    assert routing.demand_owner.tolist() == [[0, 0, 0, 0]]


def test_expert_never_positive_stays_idle():
    # Expert 1 is never more likely right than the model, so it gets nothing though it has capacity.
    logits = correctness([[[0.9, 0.9]], [[0.6, 0.7]], [[0.8, 0.8]]])
    routing = assign_with_capacity(benefit_scores(logits), torch.ones(1, 2, dtype=torch.bool), torch.tensor([0.5, 1.0]))
    assert routing.owner.tolist() == [[0, -1]]
    assert int((routing.owner == 1).sum()) == 0


def test_fit_prices_keeps_demand_within_capacity():
    # One expert, 10 ROI pixels with benefits 0.1 .. 1.0; capacity 0.3 allows 3 pixels, so the price must
    # push all but the 3 largest benefits (0.8, 0.9, 1.0) to 0 or below: a price just above 0.7.
    benefits = torch.linspace(0.1, 1.0, 10).view(1, 1, 10)
    scores = torch.cat([benefits, torch.zeros(1, 1, 10)])
    prices = fit_prices([scores], [torch.ones(1, 10, dtype=torch.bool)], torch.tensor([0.3]), [torch.tensor([True])])
    assert 0.7 <= float(prices[0]) <= 0.7 + 1e-3
    shifted = benefit_free_demand(scores, prices)
    assert shifted == 3


def benefit_free_demand(scores, prices):
    adjusted = scores.clone()
    adjusted[:-1] -= prices.view(-1, 1, 1)
    return int((adjusted.argmax(dim=0) == 0).sum())


def test_fit_prices_zero_when_demand_fits():
    scores = torch.tensor([[[0.2, -0.1, -0.3, -0.2]], [[0.0, 0.0, 0.0, 0.0]]])
    prices = fit_prices([scores], [torch.ones(1, 4, dtype=torch.bool)], torch.tensor([0.5]), [torch.tensor([True])])
    assert float(prices[0]) == 0.0


def test_fit_prices_correlated_experts():
    # Expert 1's benefit is expert 0's plus 0.05 on every pixel, as with untrained corrections. Raising prices
    # from zero hands the pixels back and forth and, after 20 sweeps, still leaves expert 1 far over capacity.
    # Alone, expert 0 fits its 2 pixels (benefits 0.9, 1.0) at a price just above 0.8 and expert 1 (0.95,
    # 1.05) at one just above 0.85. With both prices the two experts tie on every pixel, so the top 2 pixels
    # go to one of them; lowering either price would take the pixel at 0.8 as well (3 > 2).
    benefits = torch.linspace(0.1, 1.0, 10).view(1, 1, 10)
    scores = torch.cat([benefits, benefits + 0.05, torch.zeros(1, 1, 10)])
    roi = torch.ones(1, 10, dtype=torch.bool)
    prices = fit_prices([scores], [roi], torch.tensor([0.2, 0.2]), [torch.tensor([True, True])])
    assert 0.8 <= float(prices[0]) <= 0.8 + 1e-3
    assert 0.85 <= float(prices[1]) <= 0.85 + 1e-3
    adjusted = scores.clone()
    adjusted[:-1] -= prices.view(-1, 1, 1)
    owner = adjusted.argmax(dim=0)[0].tolist()
    assert owner[:8] == [2] * 8
    assert owner[8] == owner[9] != 2


def test_untrained_heads_rank_by_confidence():
    torch.manual_seed(0)
    heads = CorrectnessHeads(in_channels=1, num_experts=2)
    with torch.no_grad():
        heads.confidence_scale.fill_(1.5)
        heads.confidence_shift.fill_(-0.25)
        heads.expert_heads.bias.copy_(torch.tensor([logit(0.9), logit(0.97)]))
    seg_logit = torch.randn(1, 1, 6, 6) * 3
    logits = heads(torch.rand(1, 1, 6, 6), seg_logit)[0]
    assert torch.allclose(logits[0], torch.full((6, 6), logit(0.9)), atol=1e-6)
    assert torch.allclose(logits[1], torch.full((6, 6), logit(0.97)), atol=1e-6)
    assert torch.allclose(logits[2], 1.5 * seg_logit[0, 0].abs() - 0.25, atol=1e-6)
    # The best expert is the more accurate one everywhere, and benefit falls as the model's margin grows.
    scores = benefit_scores(logits)
    assert bool((scores[1] > scores[0]).all())
    order_by_benefit = torch.argsort(scores[1].flatten(), descending=True, stable=True)
    order_by_margin = torch.argsort(seg_logit.abs().flatten(), stable=True)
    assert torch.equal(order_by_benefit, order_by_margin)


def test_platt_scaling_recovers_parameters():
    generator = torch.Generator().manual_seed(0)
    margin = torch.rand(200_000, generator=generator) * 6
    right = torch.bernoulli(torch.sigmoid(0.8 * margin - 0.5), generator=generator)
    scale, shift = _platt_scaling(margin, right)
    assert scale == pytest.approx(0.8, abs=0.03)
    assert shift == pytest.approx(-0.5, abs=0.03)


class FixedSampler:
    """Returns the same batch every time."""

    def __init__(self, batch):
        self.batch = batch

    def sample(self, batch_size):
        return self.batch


def test_anchors_take_expert_accuracy():
    # 4 x 4 ROI pixels, reference foreground on the left half. Expert 0 is wrong on 4 of 16 pixels (accuracy
    # 0.75), expert 1 on 1 of 16 (0.9375) but is unavailable in the second image, which must not count.
    reference = torch.zeros(2, 1, 4, 4)
    reference[..., :2] = 1
    experts = reference.repeat(1, 2, 1, 1)
    experts[:, 0, 0, :] = 1 - experts[:, 0, 0, :]
    experts[0, 1, 3, 3] = 1
    experts[1, 1] = 1 - reference[1, 0]
    batch = {
        "image": torch.rand(2, 1, 4, 4),
        "reference": reference,
        "roi": torch.ones(2, 1, 4, 4),
        "experts": experts,
        "available": torch.tensor([[True, True], [True, False]]),
    }
    model = DeferredSegNet(NetworkConfig(in_channels=1, channels=(4, 8), features=4), num_experts=2)
    fit_correctness_anchors(model, FixedSampler(batch), TrainSettings(batch_size=2), torch.device("cpu"), batches=2)
    assert model.correctness.expert_heads.bias.tolist() == pytest.approx([logit(0.75), logit(15 / 16)], abs=1e-5)
    assert model.correctness.confidence_scale.item() >= 0


def test_routing_data_is_the_calibration_split():
    calibration, train = ["c1", "c2"], ["t1"]
    assert routing_cases(calibration, train) == ["c1", "c2"]
    with pytest.raises(ValueError, match="calibration split"):
        routing_cases([], train)


def test_cross_fitting_needs_two_training_cases():
    with pytest.raises(ValueError, match="add a calibration split"):
        cross_fitted_sources(["only-one"], NetworkConfig(), 1, TrainSettings(), None, torch.device("cpu"))


def test_correctness_loss_targets():
    # One pixel with a foreground reference. The model predicts foreground (logit 2), so it is right, and
    # expert 0 labels it background, so it is wrong. All logits 0, so each BCE term is log 2 and the mean is log 2.
    batch = {
        "reference": torch.ones(1, 1, 1, 1),
        "roi": torch.ones(1, 1, 1, 1),
        "experts": torch.zeros(1, 1, 1, 1),
        "available": torch.tensor([[True]]),
    }
    loss = correctness_loss(torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 2, 1, 1), batch)
    assert float(loss) == pytest.approx(math.log(2))

    # Logits pointing the right way: expert wrong (target 0), model right (target 1).
    logits = torch.tensor([[[[-3.0]], [[3.0]]]])
    expected = (math.log(1 + math.exp(-3.0)) * 2) / 2
    assert float(correctness_loss(torch.full((1, 1, 1, 1), 2.0), logits, batch)) == pytest.approx(expected)

    # An unavailable expert does not count: only the model term remains.
    batch["available"] = torch.tensor([[False]])
    logits = torch.tensor([[[[5.0]], [[0.0]]]])
    assert float(correctness_loss(torch.full((1, 1, 1, 1), 2.0), logits, batch)) == pytest.approx(math.log(2))
