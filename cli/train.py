"""`deferredseg train`: train on one site, or several pooled, and report test-split numbers."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from cli.report import format_site_table
from client.engine import (
    Bounds,
    PatchSampler,
    RoutingSource,
    cross_fitted_sources,
    evaluate_cases,
    expert_priority,
    fit_validation_prices,
    routing_cases,
    select_device,
    train_correctness,
    train_epochs,
)
from client.sitedata import SiteData, open_site, pool_cases
from common.config import TrainSettings, to_plain
from common.losses import LossWeights
from common.model import DeferredSegNet, NetworkConfig

logger = logging.getLogger(__name__)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``deferredseg train``."""
    parser = subparsers.add_parser(
        "train",
        help="train on one site or several pooled, and report test-split numbers",
        description=(
            "Train a DeferredSeg network on one site, or on several sites pooled into one model. The checkpoint "
            "is chosen on the validation split; the test split is scored once, at the end. With no --site, "
            "a built-in synthetic site is generated and used."
        ),
    )
    parser.add_argument("--site", action="append", type=Path, default=[], help="site folder (repeat to pool sites)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/train-<time>)")
    parser.add_argument(
        "--backbone",
        default="unet",
        choices=["unet", "basicunet"],
        help="MONAI backbone (default %(default)s)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=TrainSettings.epochs,
        help="training epochs (default %(default)s)",
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=TrainSettings.steps_per_epoch,
        help="optimizer steps per epoch (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=TrainSettings.batch_size,
        help="patches per step (default %(default)s)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=TrainSettings.patch_size,
        help="patch side, in pixels (default %(default)s)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=TrainSettings.learning_rate,
        help="Adam learning rate (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of initialization and sampling (default %(default)s)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="compute device (default %(default)s)",
    )
    parser.add_argument(
        "--router",
        default=TrainSettings.router,
        choices=["softmax", "benefit"],
        help="routing rule: benefit (per-agent correctness heads) or softmax (DeferredSeg's routing channels); "
        "default %(default)s",
    )
    parser.add_argument(
        "--calibration-epochs",
        type=int,
        default=TrainSettings.calibration_epochs,
        help="epochs of the benefit router's correctness heads on their routing data (default %(default)s)",
    )
    parser.add_argument(
        "--cross-fit-folds",
        type=int,
        default=TrainSettings.cross_fit_folds,
        help="folds of cross-fitting within the train split that add routing data for the benefit router, each "
        "one extra training; 0 uses the calibration split alone (default %(default)s)",
    )
    parser.add_argument(
        "--load-balancing",
        type=float,
        default=0.0,
        help="weight of the soft load-balancing term with upper bounds at capacity (default 0: off)",
    )
    parser.add_argument(
        "--load-balancing-floor",
        type=float,
        default=LossWeights.load_balancing_floor,
        help="share of each capacity used as the lower bound of the load-balancing term (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Handle ``deferredseg train``."""
    settings = TrainSettings(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device=args.device,
        router=args.router,
        calibration_epochs=args.calibration_epochs,
        cross_fit_folds=args.cross_fit_folds,
    )
    out_dir = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    weights = LossWeights(load_balancing=args.load_balancing, load_balancing_floor=args.load_balancing_floor)

    with tempfile.TemporaryDirectory(prefix="deferredseg-synthetic-") as scratch:
        site_dirs = list(args.site)
        if not site_dirs:
            from common.synthetic import write_synthetic_sites

            site_dirs = write_synthetic_sites(Path(scratch), n_sites=1, seed=args.seed)
            print(f"No --site given: training on the built-in synthetic site (seed {args.seed}).")

        sites = [open_site(d) for d in site_dirs]
        summary = train_sites(
            sites, out_dir, settings, NetworkConfig(backbone=args.backbone, in_channels=sites[0].spec.in_channels),
            weights, progress=not args.no_progress,
        )

    print(format_site_table(summary["sites"]))
    print(f"\nsummary: {out_dir / 'summary.json'}")
    return 0


def train_sites(
    sites: Sequence[SiteData],
    out_dir: Path,
    settings: TrainSettings,
    network: NetworkConfig,
    weights: LossWeights,
    progress: bool = True,
) -> dict:
    """Train one network on the pooled train splits of ``sites``; write and return ``summary.json``.

    Each site's experts take their own routing channels. After every epoch the network is scored on the
    validation splits, and the epoch with the best mean validation system Dice is kept (model Dice with the
    benefit router, whose heads are trained only afterwards). Only that network is scored on the test splits.

    With the benefit router, a second stage trains the correctness heads with the segmentor fixed, on the
    routing data of :func:`_routing_sources`: the calibration splits and, with ``cross_fit_folds``, the
    held-out folds of cross-fitting within the pooled train split. Each site result names its routing data
    under ``routing_data``. It then fits each site's capacity prices on its validation split, so that demand
    stays within capacity, and the test split is routed with those prices.
    """
    in_channels = {s.spec.in_channels for s in sites}
    if len(in_channels) != 1:
        raise ValueError(
            f"sites have different in-channels {sorted(in_channels)}; in-channels is one setting for all pooled "
            "sites, so convert the images of the odd site"
        )

    without_calibration = _check_routing_data(sites, settings)
    torch.manual_seed(settings.seed)
    device = select_device(settings.device)
    counts = [len(s.experts) for s in sites]
    offsets = [sum(counts[:i]) for i in range(len(sites))]
    model = DeferredSegNet(network, num_experts=sum(counts)).to(device)

    train_cases = pool_cases([s.split("train") for s in sites], counts)
    sampler = PatchSampler(train_cases, settings.patch_size, settings.seed)
    optimizer = torch.optim.Adam(
        model.segmentor_parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    priorities = [expert_priority(s.split("validation"), len(s.experts)) for s in sites]

    # The soft load-balancing term, when on, bounds each expert's load to [0, capacity], with the lower bound
    # raised to the loss weights' floor.
    capacities = [c for s in sites for c in s.capacity]
    bounds = Bounds(lower=torch.zeros(len(capacities)), upper=torch.tensor(capacities)) if capacities else None

    selection_key = "model_dice" if settings.router == "benefit" else "system_dice"
    selection_settings = replace(settings, router="softmax")

    def validate() -> float:
        scores = []
        for site, offset, priority in zip(sites, offsets, priorities):
            channels = list(range(offset, offset + len(site.experts)))
            result, _ = evaluate_cases(
                model, site.split("validation"), site.expert_ids, site.capacity, selection_settings, device,
                priority, channels=channels,
            )
            scores.append(result[selection_key])
        return sum(scores) / len(scores)

    best_score, best_state, best_epoch = -1.0, None, -1
    # A progress bar only where a person watches a terminal; logs and CI get the per-epoch log lines.
    bar = tqdm(range(settings.epochs), desc="train", unit="epoch", disable=not (progress and sys.stderr.isatty()))
    for epoch in bar:
        losses = train_epochs(model, sampler, settings, weights, 1, device, bounds=bounds, optimizer=optimizer)
        score = validate()
        if score > best_score:
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        bar.set_postfix(loss=f"{losses['total']:.3f}", **{f"val_{selection_key}": f"{score:.3f}"}, best=best_epoch + 1)
        logger.info("epoch %d: losses %s, validation %s %.4f", epoch + 1, losses, selection_key, score)

    model.load_state_dict(best_state)
    prices: list[list[float] | None] = [None] * len(sites)
    routing_note = ""
    if settings.router == "benefit":
        routing, routing_note = _routing_sources(
            sites, without_calibration, model, train_cases, counts, network, settings, weights, device, bounds
        )
        loss = train_correctness(model, routing, settings, settings.calibration_epochs, device)
        logger.info("correctness heads trained on the %s, loss %.4f", routing_note, loss)
        for index, (site, offset) in enumerate(zip(sites, offsets)):
            channels = list(range(offset, offset + len(site.experts)))
            prices[index] = fit_validation_prices(
                model, site.split("validation"), site.capacity, settings, device, channels=channels
            )

    site_results = {}
    for site, offset, priority, site_prices in zip(sites, offsets, priorities, prices):
        channels = list(range(offset, offset + len(site.experts)))
        result, _ = evaluate_cases(
            model, site.split("test"), site.expert_ids, site.capacity, settings, device, priority,
            prices=site_prices, channels=channels,
        )
        result["router"] = settings.router
        if settings.router == "benefit":
            result["routing_data"] = routing_note
        result["prices"] = dict(zip(site.expert_ids, site_prices or [0.0] * len(site.experts)))
        site_results[site.site_id] = result

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    summary = {
        "sites": site_results,
        "checkpoint": {"epoch": best_epoch + 1, "validation_system_dice": best_score},
        "config": {
            "network": to_plain(network),
            "train": to_plain(settings),
            "loss": to_plain(weights),
            "sites": [str(s.spec.root) for s in sites],
            "experts": {s.site_id: s.expert_ids for s in sites},
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _check_routing_data(sites: Sequence[SiteData], settings: TrainSettings) -> list[str]:
    """Return the ids of sites with no calibration split. Raise if the benefit router would have no routing data."""
    without = [s.site_id for s in sites if not s.split("calibration")]
    if settings.router != "benefit" or not without:
        return without
    if settings.cross_fit_folds == 0:
        raise ValueError(
            f"sites {', '.join(without)} have no calibration split and cross-fit-folds is 0, so the benefit "
            "router has no routing data. Add calibration cases to site.toml or set cross-fit-folds to 2"
        )
    train_count = sum(len(s.split("train")) for s in sites)
    if train_count < settings.cross_fit_folds:
        raise ValueError(
            f"sites {', '.join(without)} have no calibration split, and {train_count} training cases are too few "
            f"for {settings.cross_fit_folds} cross-fitting folds. Add calibration cases to site.toml"
        )
    return without


def _routing_sources(
    sites: Sequence[SiteData],
    without: list[str],
    model: DeferredSegNet,
    train_cases: list,
    counts: list[int],
    network: NetworkConfig,
    settings: TrainSettings,
    weights: LossWeights,
    device: torch.device,
    bounds: Bounds | None,
) -> tuple[list[RoutingSource], str]:
    """Return the benefit router's routing data and a note that names it for the site results.

    The routing data are the pooled calibration splits, paired with ``model``, and, when
    ``settings.cross_fit_folds`` is at least 2, the held-out folds of cross-fitting within the pooled train
    split (:func:`client.engine.cross_fitted_sources`), each paired with its fold network. Neither ever
    contains a validation or test case. Where every site has a calibration split but the training cases are
    too few for the folds, the calibration split serves alone.

    ``without`` lists the sites with no calibration split, as :func:`_check_routing_data` returned them
    before training; that check guarantees routing data for those sites.
    """
    folds = settings.cross_fit_folds
    sources: list[RoutingSource] = []
    notes: list[str] = []
    if len(without) < len(sites):
        # Sites without a calibration split add no cases but keep their expert channels in the pooled axis.
        calibration_splits = [
            [] if s.site_id in without else routing_cases(s.split("calibration"), s.split("train")) for s in sites
        ]
        calibration = pool_cases(calibration_splits, counts)
        sources.append(RoutingSource(PatchSampler(calibration, settings.patch_size, settings.seed + 1), model))
        notes.append(f"calibration split ({_cases(len(calibration))})")
    if without:
        # Fallback for sites too small to spare calibration cases.
        logger.warning(
            "sites %s have no calibration split, so their routing data comes from cross-fitting within the train "
            "split alone. A calibration split in site.toml is the better choice.",
            ", ".join(without),
        )
    if folds >= 2 and (without or len(train_cases) >= folds):
        sources += cross_fitted_sources(
            train_cases, network, sum(counts), settings, weights, device, bounds=bounds, folds=folds
        )
        notes.append(f"cross-fitted within the train split ({folds} folds of {_cases(len(train_cases))})")
    elif folds >= 2:
        logger.warning(
            "%d training cases are too few for %d cross-fitting folds, so the correctness heads learn from the "
            "calibration split alone",
            len(train_cases), folds,
        )
    return sources, " and ".join(notes)


def _cases(count: int) -> str:
    """Return ``"1 case"`` or ``"N cases"``."""
    return f"{count} case" if count == 1 else f"{count} cases"
