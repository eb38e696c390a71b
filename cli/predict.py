"""`deferredseg predict`: model masks, deferral maps and a review list for a site's images, from a finished run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``deferredseg predict``."""
    parser = subparsers.add_parser(
        "predict",
        help="predict a site's images with a finished run: model masks, deferral maps and a review list",
        description=(
            "Load a run's shared weights and this site's local heads, then write for each image the model mask "
            "(<case>_model.png), a deferral map within every expert's capacity (<case>_deferral.png, a palette "
            "PNG explained by deferral_legend.json) and review.csv, the pixels each expert should review. "
            "review.csv and the legend name the real experts, so keep them at the site."
        ),
    )
    parser.add_argument("--run", type=Path, required=True, help="run folder written by `deferredseg simulate --out`")
    parser.add_argument("--site", type=Path, required=True, help="this site's data folder (with site.toml)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="this site's state folder (local heads); default: state-dir of the site in the run's federation.toml",
    )
    parser.add_argument(
        "--images",
        default=None,
        help="glob of new images to predict, quoted (e.g. 'new/*.png'); their ROI is the whole image. "
        "Default: the site's test split",
    )
    parser.add_argument(
        "--round",
        type=int,
        default=None,
        help="use the shared weights and local heads of this round; default: the run's chosen round",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overlays", action="store_true", help="also write one overlay PNG per image to OUT/overlays")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="device for inference; default: the run's device setting",
    )
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Handle ``deferredseg predict``."""
    from client.engine import select_device
    from client.predict import REVIEW_FILE, load_site_predictor, read_new_images, split_inputs, write_predictions

    if args.round is not None and args.round < 1:
        raise ValueError(f"--round must be at least 1, got {args.round}")

    device = select_device(args.device) if args.device else None
    predictor = load_site_predictor(args.run, args.site, args.state_dir, args.round, device)
    if args.images is not None:
        inputs = read_new_images(
            args.images, predictor.settings.network.in_channels, predictor.site.spec.slice_axis
        )
    else:
        inputs = split_inputs(predictor.site, "test")
        if not inputs:
            raise ValueError(f"the test split of {args.site} is empty; pass images with --images GLOB")

    rows = write_predictions(predictor, inputs, args.out, overlays=args.overlays)
    experts = sorted({row.expert for row in rows})
    print(
        f"Predicted {len(inputs)} images of site {predictor.site.site_id} with round {predictor.round}: "
        f"{len(rows)} review entries for {len(experts)} experts in {Path(args.out) / REVIEW_FILE}"
    )
    return 0
