"""Local training and evaluation of a DeferredSeg network on one site's cases (or several sites pooled)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld, RandFlipd, RandRotate90d, SpatialPadd

from common.config import TrainSettings
from common.losses import LossWeights, deferredseg_loss
from common.metrics import ImageEvaluation, evaluate_image, expert_accuracy, summarize
from common.model import DeferredSegNet, NetworkConfig
from common.routing import Routing, assign_with_capacity, fit_prices, routing_scores
from common.site import Case

logger = logging.getLogger(__name__)

_SPATIAL_KEYS = ["image", "reference", "roi", "experts"]


def select_device(preference: str = "auto") -> torch.device:
    """Pick CUDA when present (or requested), the CPU otherwise."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was requested but no CUDA device is available; use device = \"auto\"")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class PatchSampler:
    """Random training patches from a list of cases, half centred on foreground and half on background.

    MONAI's ``RandCropByPosNegLabeld`` picks the centres, with foreground and background indices computed
    once per case, then random flips and 90-degree rotations augment each patch.

    Args:
        cases: training cases; their expert masks must all have K channels.
        patch_size: side of the square patches, in pixels.
        seed: seed of the sampling.
    """

    def __init__(self, cases: Sequence[Case], patch_size: int, seed: int) -> None:
        if not cases:
            raise ValueError("no training cases; the train split of the site is empty")

        self.rng = np.random.default_rng(seed)
        self.num_experts = int(cases[0].expert_masks.shape[0])
        pad = SpatialPadd(keys=_SPATIAL_KEYS, spatial_size=(patch_size, patch_size))
        indices = FgBgToIndicesd(keys="reference", image_key="roi", image_threshold=0.5)

        self.items = []
        for case in cases:
            if case.expert_masks.shape[0] != self.num_experts:
                raise ValueError(
                    f"case {case.case_id} has {case.expert_masks.shape[0]} expert masks, expected {self.num_experts}"
                )
            item = pad(
                {
                    "image": case.image.astype(np.float32),
                    "reference": case.reference[None].astype(np.float32),
                    "roi": case.roi[None].astype(np.float32),
                    "experts": case.expert_masks.astype(np.float32)
                    if self.num_experts
                    else np.zeros((1, *case.reference.shape), np.float32),
                }
            )
            item = indices(item)
            item["available"] = case.expert_available.astype(bool)
            self.items.append(item)

        self.transform = Compose(
            [
                RandCropByPosNegLabeld(
                    keys=_SPATIAL_KEYS,
                    label_key="reference",
                    spatial_size=(patch_size, patch_size),
                    pos=1.0,
                    neg=1.0,
                    num_samples=1,
                    fg_indices_key="reference_fg_indices",
                    bg_indices_key="reference_bg_indices",
                ),
                RandFlipd(keys=_SPATIAL_KEYS, prob=0.5, spatial_axis=0),
                RandFlipd(keys=_SPATIAL_KEYS, prob=0.5, spatial_axis=1),
                RandRotate90d(keys=_SPATIAL_KEYS, prob=0.5),
            ]
        )
        self.transform.set_random_state(seed=int(self.rng.integers(2**31)))

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Draw one batch: image ``BCHW``, reference and roi ``B1HW``, experts ``BKHW``, available ``BK``."""
        batch: dict[str, list] = {key: [] for key in (*_SPATIAL_KEYS, "available")}
        for _ in range(batch_size):
            item = self.items[int(self.rng.integers(len(self.items)))]
            patch = self.transform(item)[0]
            for key in _SPATIAL_KEYS:
                batch[key].append(torch.as_tensor(np.asarray(patch[key])))
            batch["available"].append(torch.as_tensor(item["available"]))

        out = {key: torch.stack(values) for key, values in batch.items()}
        if self.num_experts == 0:
            out["experts"] = out["experts"][:, :0]
        return out


@dataclass
class Bounds:
    """Per-expert bounds of the soft load-balancing term, ``K`` tensors (upper = capacity, lower = 0)."""

    lower: torch.Tensor
    upper: torch.Tensor


def train_epochs(
    model: DeferredSegNet,
    sampler: PatchSampler,
    settings: TrainSettings,
    weights: LossWeights,
    epochs: int,
    device: torch.device,
    bounds: Bounds | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``epochs`` epochs of ``settings.steps_per_epoch`` steps; return the last epoch's mean losses.

    Mixed precision is used on CUDA only, selected automatically from ``device``.
    """
    model.to(device).train()
    if optimizer is None:
        optimizer = torch.optim.Adam(
            model.segmentor_parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    lower = bounds.lower.to(device) if bounds is not None else None
    upper = bounds.upper.to(device) if bounds is not None else None

    epoch_losses: dict[str, float] = {}
    for epoch in range(epochs):
        totals: dict[str, float] = {}
        for _ in range(settings.steps_per_epoch):
            batch = {k: v.to(device) for k, v in sampler.sample(settings.batch_size).items()}
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                out = model(batch["image"])
            loss, terms = deferredseg_loss(
                out.seg_logit.float(),
                out.routing_logits.float(),
                out.deferral_logit.float(),
                batch["reference"],
                batch["experts"],
                batch["available"],
                batch["roi"],
                weights,
                lower=lower,
                upper=upper,
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} (terms {terms}); lower learning-rate")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value

        epoch_losses = {name: value / settings.steps_per_epoch for name, value in totals.items()}
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_losses)
    return epoch_losses


def correctness_loss(out_seg_logit: torch.Tensor, correctness_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean one-vs-all BCE of the correctness heads over the ROI; an expert counts only where available.

    Targets: the model is right where ``(seg_logit > 0) == reference``; expert k where its mask equals the
    reference.
    """
    reference = batch["reference"]
    roi = batch["roi"]
    model_right = ((out_seg_logit > 0).float() == reference).float()
    expert_right = (batch["experts"] == reference).float()
    targets = torch.cat([expert_right, model_right], dim=1)

    num_experts = batch["experts"].shape[1]
    weight = roi.expand_as(targets).clone()
    if num_experts:
        weight[:, :num_experts] *= batch["available"].float()[:, :, None, None]
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(correctness_logits, targets, reduction="none")
    return (per_pixel * weight).sum() / weight.sum().clamp(min=1.0)


class RoutingSource(NamedTuple):
    """Routing data for the correctness heads: patches, and the segmentor whose errors the heads learn.

    Attributes:
        sampler: draws patches of routing cases.
        segmentor: network whose segmentation logits the heads see on those patches. It has not trained on
            them, so it errs there as on new images: the final network on the calibration split, or a
            cross-fitting fold network on the fold it left out.
    """

    sampler: PatchSampler
    segmentor: DeferredSegNet


def _prepare_sources(
    model: DeferredSegNet, routing: PatchSampler | Sequence[RoutingSource], device: torch.device
) -> list[RoutingSource]:
    """Return ``routing`` as a list of sources, a bare sampler paired with ``model``, segmentors on ``device``."""
    if isinstance(routing, (list, tuple)):
        if not routing:
            raise ValueError(
                "no routing data for the correctness heads: pass a sampler or at least one RoutingSource"
            )
        sources = list(routing)
    else:
        sources = [RoutingSource(routing, model)]
    for source in sources:
        source.segmentor.to(device).eval()
    return sources


def _routing_batch(source: RoutingSource, batch_size: int, device: torch.device):
    batch = {k: v.to(device) for k, v in source.sampler.sample(batch_size).items()}
    with torch.no_grad():
        seg_logit = source.segmentor.seg_head(source.segmentor.backbone(batch["image"]))
    return batch, seg_logit


@torch.no_grad()
def fit_correctness_anchors(
    model: DeferredSegNet,
    routing: PatchSampler | Sequence[RoutingSource],
    settings: TrainSettings,
    device: torch.device,
    batches: int = 8,
) -> None:
    """Set the anchors of the correctness heads from routing data, before their corrections train.

    The model head's scale and shift are fitted by logistic regression of "the model is right" on |logit|
    (Platt scaling). Each expert head's bias becomes the logit of that expert's pixel accuracy. Both use the
    ROI pixels of ``batches`` batches drawn from the routing sources in turn, where a bare sampler pairs with
    ``model``. An expert counts only where available.
    """
    sources = _prepare_sources(model, routing, device)
    model.to(device)
    heads = model.correctness
    margins, model_right = [], []
    correct = torch.zeros(model.num_experts, dtype=torch.float64)
    total = torch.zeros(model.num_experts, dtype=torch.float64)
    for step in range(batches):
        batch, seg_logit = _routing_batch(sources[step % len(sources)], settings.batch_size, device)
        inside = batch["roi"] > 0.5
        margins.append(seg_logit.abs()[inside].float().cpu())
        model_right.append(((seg_logit > 0).float() == batch["reference"])[inside].float().cpu())
        if not model.num_experts:
            continue
        for index in range(batch["image"].shape[0]):
            image_correct, image_total = expert_accuracy(
                batch["experts"][index], batch["reference"][index, 0], inside[index, 0], batch["available"][index]
            )
            correct += image_correct.double().cpu()
            total += image_total.double().cpu()

    x, y = torch.cat(margins), torch.cat(model_right)
    if x.numel() and 0 < float(y.mean()) < 1:
        scale, shift = _platt_scaling(x, y)
        heads.confidence_scale.fill_(scale)
        heads.confidence_shift.fill_(shift)
    if heads.expert_heads is not None:
        accuracy = torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, 0.5))
        heads.expert_heads.bias.copy_(torch.logit(accuracy.clamp(1e-3, 1 - 1e-3)).to(heads.expert_heads.bias))


def _platt_scaling(margin: torch.Tensor, right: torch.Tensor) -> tuple[float, float]:
    """Fit ``P(right) = sigmoid(a * margin + b)`` by maximum likelihood and return ``(max(a, 0), b)``."""
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    margin, right = margin.double(), right.double()
    optimizer = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * margin + params[1], right)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    scale, shift = params.detach().tolist()
    return max(scale, 0.0), shift


def train_correctness(
    model: DeferredSegNet,
    routing: PatchSampler | Sequence[RoutingSource],
    settings: TrainSettings,
    epochs: int,
    device: torch.device,
) -> float:
    """Fit the anchors of the correctness heads, then train their corrections with the segmentor fixed.

    Returns the last epoch's mean loss (NaN when ``epochs`` is 0). ``routing`` is a sampler of the
    calibration split, whose patches pair with ``model``'s own logits, or a list of :class:`RoutingSource`
    used in turn (the calibration split and cross-fitting folds). The routing data must be cases the segmentor never trained on: on its own
    training patches the model is almost always right, so the heads would learn that.
    """
    sources = _prepare_sources(model, routing, device)
    fit_correctness_anchors(model, sources, settings, device)
    model.correctness.train()
    optimizer = torch.optim.Adam(model.correctness.parameters(), lr=settings.learning_rate)
    mean_loss = float("nan")
    step = 0
    for _ in range(epochs):
        total = 0.0
        for _ in range(settings.steps_per_epoch):
            batch, seg_logit = _routing_batch(sources[step % len(sources)], settings.batch_size, device)
            step += 1
            optimizer.zero_grad(set_to_none=True)
            logits = model.correctness(batch["image"], seg_logit)
            loss = correctness_loss(seg_logit, logits, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"correctness loss became {loss.item()}; lower learning-rate")
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        mean_loss = total / settings.steps_per_epoch
    return mean_loss


def routing_cases(calibration: Sequence[Case], train: Sequence[Case]) -> list[Case]:
    """Return the calibration routing data of the benefit router: the calibration split, never validation or test.

    Raises:
        ValueError: when the site has no calibration split. ``deferredseg train`` then learns from
            cross-fitting within the training split alone (:func:`cross_fitted_sources`); the federation cannot.
    """
    if not calibration:
        raise ValueError(
            "the benefit router trains its correctness heads on the calibration split, which is empty; move a "
            "few training cases to calibration in site.toml, or use router = \"softmax\""
        )
    return list(calibration)


def cross_fitted_sources(
    train_cases: Sequence[Case],
    network: NetworkConfig,
    num_experts: int,
    settings: TrainSettings,
    weights: LossWeights,
    device: torch.device,
    bounds: Bounds | None = None,
    folds: int = 2,
) -> list[RoutingSource]:
    """Build routing data by cross-fitting within the training split.

    ``deferredseg train`` adds these sources to the calibration split, whose few cases alone let the heads
    overfit, and uses them alone at sites with no calibration split. The training cases are dealt in turn into
    ``folds`` folds. For each fold a fresh network trains for ``settings.epochs`` epochs on the other folds,
    and the heads later learn from its errors on the fold it left out. This costs ``folds`` extra trainings.
    The fold networks see less data than the final one, so they err somewhat more often than it does, which
    is why the calibration split, where the final network itself errs, stays in the routing data. Cases of
    one patient (two eyes, say) may land in different folds, so a fold network can have seen the patient.

    Raises:
        ValueError: when there are fewer training cases than folds.
    """
    if folds < 2 or len(train_cases) < folds:
        raise ValueError(
            f"cross-fitting needs at least {max(folds, 2)} training cases and 2 folds, got {len(train_cases)} "
            f"cases and {folds} folds; add a calibration split to site.toml"
        )
    sources = []
    for fold in range(folds):
        held_out = [case for i, case in enumerate(train_cases) if i % folds == fold]
        rest = [case for i, case in enumerate(train_cases) if i % folds != fold]
        fold_seed = settings.seed + 1000 * (fold + 1)
        torch.manual_seed(fold_seed)
        segmentor = DeferredSegNet(network, num_experts=num_experts).to(device)
        sampler = PatchSampler(rest, settings.patch_size, fold_seed)
        train_epochs(segmentor, sampler, settings, weights, settings.epochs, device, bounds=bounds)
        held_out_sampler = PatchSampler(held_out, settings.patch_size, fold_seed + 1)
        sources.append(RoutingSource(held_out_sampler, segmentor))
        logger.info(
            "cross-fitting fold %d of %d: trained on %d cases, routing data from the other %d",
            fold + 1, folds, len(rest), len(held_out),
        )
    return sources


def _window_size(height: int, width: int, settings: TrainSettings, factor: int) -> tuple[int, int]:
    def fit(size: int) -> int:
        return min(settings.inference_window, int(math.ceil(size / factor) * factor))

    return fit(height), fit(width)


class Prediction(NamedTuple):
    """Network outputs for one image, on the CPU.

    Attributes:
        prob: foreground probability ``HW``.
        routing_logits: ``(K+1)HW``, model channel last.
        deferral_prob: deferral-predictor probability ``HW``.
        correctness_logits: ``(K+1)HW`` logits of "this agent is right", model channel last.
    """

    prob: torch.Tensor
    routing_logits: torch.Tensor
    deferral_prob: torch.Tensor
    correctness_logits: torch.Tensor


@torch.no_grad()
def predict(model: DeferredSegNet, image: np.ndarray, settings: TrainSettings, device: torch.device) -> Prediction:
    """Run sliding-window inference on one ``CHW`` image."""
    model.to(device).eval()
    tensor = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    window = _window_size(tensor.shape[-2], tensor.shape[-1], settings, model.config.downsampling_factor)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            out = model(x)
        channels = [out.seg_logit, out.routing_logits, out.deferral_logit, out.correctness_logits]
        return torch.cat(channels, dim=1).float()

    stacked = sliding_window_inference(tensor, window, sw_batch_size=4, predictor=predictor, overlap=0.25)[0].cpu()
    agents = model.num_experts + 1
    return Prediction(
        prob=torch.sigmoid(stacked[0]),
        routing_logits=stacked[1 : 1 + agents],
        deferral_prob=torch.sigmoid(stacked[1 + agents]),
        correctness_logits=stacked[2 + agents :],
    )


def _select_channels(channels: Sequence[int] | None, *agent_maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the given expert channels and the model channel (the last) of each ``(K+1)HW`` map."""
    if channels is None:
        return agent_maps
    return tuple(agent_map[[*channels, agent_map.shape[0] - 1]] for agent_map in agent_maps)


def expert_priority(cases: Sequence[Case], num_experts: int) -> list[int]:
    """Order experts by pixel accuracy against the reference on ``cases`` (usually validation), best first."""
    correct = torch.zeros(num_experts, dtype=torch.float64)
    total = torch.zeros(num_experts, dtype=torch.float64)
    for case in cases:
        c, n = expert_accuracy(
            torch.as_tensor(case.expert_masks),
            torch.as_tensor(case.reference),
            torch.as_tensor(case.roi),
            torch.as_tensor(case.expert_available),
        )
        correct += c.double()
        total += n.double()
    accuracy = torch.where(total > 0, correct / total.clamp(min=1), torch.zeros_like(total))
    return sorted(range(num_experts), key=lambda k: (-float(accuracy[k]), k))


def evaluate_cases(
    model: DeferredSegNet,
    cases: Sequence[Case],
    expert_ids: Sequence[str],
    capacity: Sequence[float],
    settings: TrainSettings,
    device: torch.device,
    priority: Sequence[int],
    prices: Sequence[float] | None = None,
    channels: Sequence[int] | None = None,
    on_case: Callable[[Case, torch.Tensor, Routing], None] | None = None,
) -> tuple[dict, list[ImageEvaluation]]:
    """Route and score every case; return the summary of :func:`common.metrics.summarize` and the per-image results.

    Args:
        expert_ids: ids of the case's experts, in the order of their masks.
        capacity: capacities of those experts.
        priority: expert indices by validation accuracy, best first (for the confidence baseline).
        prices: capacity prices subtracted from the experts' routing scores; ``None`` means zero.
        channels: the network's expert channels that serve these experts, when the network has more
            (pooled training over several sites); ``None`` means channel k serves expert k.
        on_case: called with each case, its foreground probability ``HW`` and its routing, for example to
            draw overlays without a second forward pass.
    """
    capacity_tensor = torch.tensor(list(capacity), dtype=torch.float64)
    price_tensor = torch.tensor(list(prices), dtype=torch.float32) if prices is not None else None
    evaluations = []
    for case in cases:
        prob, routing_logits, _, correctness_logits = predict(model, case.image, settings, device)
        routing_logits, correctness_logits = _select_channels(channels, routing_logits, correctness_logits)
        scores = routing_scores(settings.router, routing_logits, correctness_logits, price_tensor)
        available = torch.as_tensor(case.expert_available)
        roi = torch.as_tensor(case.roi)
        routing = assign_with_capacity(scores, roi, capacity_tensor, available)
        if on_case is not None:
            on_case(case, prob, routing)
        evaluations.append(
            evaluate_image(
                prob,
                torch.as_tensor(case.reference),
                roi,
                torch.as_tensor(case.expert_masks),
                available,
                capacity_tensor,
                routing.owner,
                routing.demand_owner,
                priority,
            )
        )
    return summarize(evaluations, list(expert_ids), list(capacity)), evaluations


def fit_validation_prices(
    model: DeferredSegNet,
    cases: Sequence[Case],
    capacity: Sequence[float],
    settings: TrainSettings,
    device: torch.device,
    channels: Sequence[int] | None = None,
) -> list[float]:
    """Fit capacity prices on ``cases`` (the validation split) so each expert's demand stays within capacity."""
    scores, rois, available = [], [], []
    for case in cases:
        _, routing_logits, _, correctness_logits = predict(model, case.image, settings, device)
        routing_logits, correctness_logits = _select_channels(channels, routing_logits, correctness_logits)
        scores.append(routing_scores(settings.router, routing_logits, correctness_logits))
        rois.append(torch.as_tensor(case.roi))
        available.append(torch.as_tensor(case.expert_available))
    prices = fit_prices(scores, rois, torch.tensor(list(capacity), dtype=torch.float64), available)
    return [float(p) for p in prices]
