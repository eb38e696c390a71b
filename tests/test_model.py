"""Tests of the DeferredSeg network and its shared/local parameter split."""

import pytest
import torch

from common.model import DeferredSegNet, NetworkConfig, load_partial_state, local_state, parameter_groups, shared_state


@pytest.mark.parametrize("backbone", ["unet", "basicunet"])
def test_output_channels_per_head(backbone):
    model = DeferredSegNet(NetworkConfig(backbone=backbone, in_channels=3, channels=(8, 16, 32)), num_experts=2)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.seg_logit.shape == (2, 1, 32, 32)
    assert out.routing_logits.shape == (2, 3, 32, 32)
    assert out.deferral_logit.shape == (2, 1, 32, 32)
    assert out.correctness_logits.shape == (2, 3, 32, 32)


def test_local_group_holds_expert_heads_only():
    model = DeferredSegNet(NetworkConfig(channels=(8, 16)), num_experts=3)
    groups = parameter_groups(model)
    assert groups["local"] == [
        "expert_heads.weight",
        "expert_heads.bias",
        "correctness.expert_heads.weight",
        "correctness.expert_heads.bias",
    ]
    assert "correctness.model_head.weight" in groups["shared"]
    assert set(groups["shared"]) | set(groups["local"]) == set(model.state_dict())
    assert "seg_head.weight" in groups["shared"]
    assert "model_route_head.weight" in groups["shared"]
    assert "deferral_head.weight" in groups["shared"]


def test_shared_state_fits_sites_with_other_expert_counts():
    one = DeferredSegNet(NetworkConfig(channels=(8, 16)), num_experts=1)
    three = DeferredSegNet(NetworkConfig(channels=(8, 16)), num_experts=3)
    load_partial_state(three, shared_state(one), "shared")
    for name, tensor in shared_state(one).items():
        assert torch.equal(three.state_dict()[name], tensor)
    assert local_state(three)["expert_heads.weight"].shape[0] == 3


def test_mismatched_architecture_names_the_fix():
    small = DeferredSegNet(NetworkConfig(channels=(8, 16)), num_experts=1)
    wide = DeferredSegNet(NetworkConfig(channels=(8, 32)), num_experts=1)
    with pytest.raises(ValueError, match="shape"):
        load_partial_state(wide, shared_state(small), "shared")


def test_unknown_backbone_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        NetworkConfig(backbone="resnet")
