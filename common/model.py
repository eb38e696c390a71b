"""DeferredSeg network: a MONAI 2D backbone with segmentation, routing and deferral heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

BACKBONES = ("unet", "basicunet")

# Parameter-name prefixes of the two groups. Everything not under a local prefix is shared, so a new
# shared layer cannot be left out of aggregation by accident.
LOCAL_PREFIXES = ("expert_heads.", "correctness.expert_heads.")


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture settings, identical at every site of a federation.

    Args:
        backbone: ``"unet"`` (``monai.networks.nets.UNet``) or ``"basicunet"`` (``monai.networks.nets.BasicUNet``).
        in_channels: image channels; one value for the whole federation.
        features: backbone output channels that feed the 1x1 heads.
        channels: encoder widths of the backbone. For ``basicunet`` the first five are used, padded with the
            last value when fewer are given.
        dropout: dropout inside the backbone.
    """

    backbone: str = "unet"
    in_channels: int = 1
    features: int = 16
    channels: Sequence[int] = field(default=(16, 32, 64, 128))
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.in_channels < 1:
            raise ValueError(f"in-channels must be at least 1, got {self.in_channels}")
        if self.features < 1 or len(self.channels) < 2:
            raise ValueError(
                f"features must be >= 1 and channels must list at least two widths, got "
                f"features={self.features}, channels={tuple(self.channels)}"
            )

    @property
    def downsampling_factor(self) -> int:
        """Factor that input sizes must be divisible by."""
        if self.backbone == "basicunet":
            return 16
        return 2 ** (len(self.channels) - 1)


@dataclass
class DeferredSegOutput:
    """Outputs of one forward pass, all logits.

    Attributes:
        seg_logit: segmentation logit ``B1HW``.
        routing_logits: ``B(K+1)HW``; channels ``0..K-1`` are the experts, channel ``K`` (the last) is the model.
        deferral_logit: deferral-predictor logit ``B1HW``.
        correctness_logits: ``B(K+1)HW`` logits of "this agent is right on this pixel", experts first and the
            model last (the benefit router's heads).
    """

    seg_logit: torch.Tensor
    routing_logits: torch.Tensor
    deferral_logit: torch.Tensor
    correctness_logits: torch.Tensor


def _build_backbone(config: NetworkConfig) -> nn.Module:
    if config.backbone == "unet":
        strides = (2,) * (len(config.channels) - 1)
        return UNet(
            spatial_dims=2,
            in_channels=config.in_channels,
            out_channels=config.features,
            channels=tuple(config.channels),
            strides=strides,
            num_res_units=1,
            norm="instance",
            dropout=config.dropout,
        )

    widths = list(config.channels)[:5]
    widths += [widths[-1]] * (5 - len(widths))
    return BasicUNet(
        spatial_dims=2,
        in_channels=config.in_channels,
        out_channels=config.features,
        features=(*widths, config.features),
        norm=("instance", {"affine": True}),
        dropout=config.dropout,
    )


class CorrectnessHeads(nn.Module):
    """One sigmoid per agent estimating whether that agent is right on each pixel (one-vs-all).

    Verma and Nalisnick (2022) calibrate learning to defer this way. The inputs are the image and the
    segmentor's own confidence: the foreground probability p, |p - 0.5| and the logit, all detached, so
    training these heads never changes the segmentor. A small dilated trunk gives each pixel about 15 pixels
    of context.

    Each head is anchored on a simple estimate and learns a correction from the trunk:

    - model: ``confidence_scale * |logit| + confidence_shift + correction``, which is Platt scaling of the
      segmentor's own confidence when the correction is zero;
    - expert k: ``bias_k + correction_k``, the expert's accuracy on the routing data when the correction
      is zero.

    The corrections start at zero, so an untrained correction ranks pixels exactly as confidence deferral
    does. The ranking moves away from it only where the routing data shows a difference. The trunk, the
    model head and its two scalars are shared, and the expert heads are site-local.

    Args:
        in_channels: image channels.
        num_experts: K.
        width: channels of the trunk.
    """

    def __init__(self, in_channels: int, num_experts: int, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels + 3, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, kernel_size=3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, width, kernel_size=3, padding=4, dilation=4),
            nn.ReLU(),
        )
        self.confidence_scale = nn.Parameter(torch.ones(1))
        self.confidence_shift = nn.Parameter(torch.zeros(1))
        self.model_head = nn.Conv2d(width, 1, kernel_size=1)
        self.expert_heads = nn.Conv2d(width, num_experts, kernel_size=1) if num_experts else None
        for head in (self.model_head, self.expert_heads):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def forward(self, image: torch.Tensor, seg_logit: torch.Tensor) -> torch.Tensor:
        """Return ``B(K+1)HW`` correctness logits, experts first and the model last."""
        logit = seg_logit.detach()
        prob = torch.sigmoid(logit)
        features = self.trunk(torch.cat([image, prob, (prob - 0.5).abs(), logit], dim=1))
        model = self.confidence_scale * logit.abs() + self.confidence_shift + self.model_head(features)
        if self.expert_heads is None:
            return model
        return torch.cat([self.expert_heads(features), model], dim=1)


class DeferredSegNet(nn.Module):
    """Segmentation network that also learns, per pixel, whether to defer to one of K experts.

    DeferredSeg (Tian et al., "DeferredSeg: A Multi-Expert Deferral Framework for Trustworthy Medical Image
    Segmentation", arXiv 2604.12411). The backbone's feature map feeds 1x1 convolution heads:

    - ``seg_head`` (1 channel), ``model_route_head`` (1) and ``deferral_head`` (1) are shared across sites;
    - ``expert_heads`` (K channels, one per local expert) are site-local, because they describe named clinicians
      and are trained only by their own site;
    - ``correctness`` (:class:`CorrectnessHeads`) estimates, per agent, whether it is right; its expert heads
      are site-local and the rest is shared. It is trained in a second stage, with the segmentor fixed.

    Args:
        config: architecture shared by the federation.
        num_experts: K, the number of experts at this site (0 allowed).
    """

    def __init__(self, config: NetworkConfig, num_experts: int) -> None:
        super().__init__()
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {num_experts}")

        self.config = config
        self.num_experts = num_experts
        self.backbone = _build_backbone(config)
        self.seg_head = nn.Conv2d(config.features, 1, kernel_size=1)
        self.model_route_head = nn.Conv2d(config.features, 1, kernel_size=1)
        self.deferral_head = nn.Conv2d(config.features, 1, kernel_size=1)
        self.expert_heads = nn.Conv2d(config.features, num_experts, kernel_size=1) if num_experts else None
        self.correctness = CorrectnessHeads(config.in_channels, num_experts)

    def segmentor_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the DeferredSeg losses: everything but the correctness heads."""
        return [p for name, p in self.named_parameters() if not name.startswith("correctness.")]

    def forward(self, image: torch.Tensor) -> DeferredSegOutput:
        """Run the network on a ``BCHW`` image batch whose H and W are multiples of the downsampling factor."""
        features = self.backbone(image)
        seg_logit = self.seg_head(features)
        model_route = self.model_route_head(features)
        if self.expert_heads is not None:
            routing_logits = torch.cat([self.expert_heads(features), model_route], dim=1)
        else:
            routing_logits = model_route
        correctness_logits = self.correctness(image, seg_logit)
        return DeferredSegOutput(seg_logit, routing_logits, self.deferral_head(features), correctness_logits)


def is_local_parameter(name: str) -> bool:
    """Return whether a state-dict entry is site-local (never sent to the coordinator)."""
    return name.startswith(LOCAL_PREFIXES)


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Return the state-dict names of each group: ``{"shared": [...], "local": [...]}``.

    The federation sends and aggregates only the shared group.
    """
    groups: dict[str, list[str]] = {"shared": [], "local": []}
    for name in model.state_dict():
        groups["local" if is_local_parameter(name) else "shared"].append(name)
    return groups


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the shared entries of the state dict, detached and on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not is_local_parameter(k)}


def local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the site-local entries of the state dict, detached and on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if is_local_parameter(k)}


def load_partial_state(model: nn.Module, state: dict[str, torch.Tensor], group: str) -> None:
    """Load one parameter group into ``model``, checking names and shapes.

    Raises:
        ValueError: when ``state`` lacks a name of the group, has an extra name, or a shape differs. The
            message names the entries, so a caller can tell a site running another architecture.
    """
    expected = {n for n in parameter_groups(model)[group]}
    missing = sorted(expected - state.keys())
    extra = sorted(state.keys() - expected)
    if missing or extra:
        raise ValueError(
            f"{group} weights do not match the network: missing {missing[:5]}, unexpected {extra[:5]}. "
            "Check that every site uses the same backbone, channels and in-channels."
        )

    current = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(current[name].shape):
            raise ValueError(
                f"{group} weight {name!r} has shape {tuple(tensor.shape)}, the network expects "
                f"{tuple(current[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
