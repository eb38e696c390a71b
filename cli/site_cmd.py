"""The `deferredseg site` commands: check, import and synthesize site folders."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from common.importers import import_chase_db1, import_drive, import_generic
from common.site import check_site, list_case_ids, load_site_spec

def add_site_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `site` command and its subcommands. Each sets `func` to a handler that returns an exit code."""
    site = subparsers.add_parser("site", help="check, import or synthesize a site data folder")
    commands = site.add_subparsers(dest="site_command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="list every problem of a site folder")
    check.add_argument("dir", type=Path, metavar="DIR", help="the site folder (contains site.toml)")
    check.set_defaults(func=run_check)

    _add_import_parsers(commands)

    synth = commands.add_parser("synth", help="write synthetic site folders for tests and demos")
    synth.add_argument("dst", type=Path, metavar="DST", help="folder that receives one site folder per site")
    synth.add_argument("--sites", type=int, required=True, metavar="N", help="number of sites")
    synth.add_argument("--seed", type=int, required=True, metavar="S", help="random seed")
    synth.add_argument(
        "--image-size",
        type=int,
        default=64,
        metavar="PX",
        help="image height and width in pixels (default 64)",
    )
    synth.add_argument("--cases", type=int, default=24, metavar="N", help="cases per site (default 24)")
    synth.set_defaults(func=run_synth)


def run_check(args: argparse.Namespace) -> int:
    """Print every problem of the site folder `args.dir`, and return 1 if there is any, else 0."""
    problems = check_site(args.dir)
    if problems:
        for problem in problems:
            print(problem)
        print(f"site {args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1

    spec = load_site_spec(args.dir)
    print(f"site {args.dir}: {len(list_case_ids(spec))} cases, no problems")
    if not spec.splits["calibration"]:
        print(
            "note: the calibration split is empty. The benefit router (the default) learns from it: "
            "`deferredseg train` then learns from cross-fitting folds alone, and a federation rejects the site. "
            "Move a few training cases with expert masks to calibration, or set router = \"softmax\"."
        )
    return 0


def run_import_drive(args: argparse.Namespace) -> int:
    """Import DRIVE from `args.src` into `args.dst`."""
    return _run_import(lambda: import_drive(args.src, args.dst, site_id=args.site_id, overwrite=args.overwrite))


def run_import_chase_db1(args: argparse.Namespace) -> int:
    """Import CHASE_DB1 from `args.src` into `args.dst`."""
    return _run_import(lambda: import_chase_db1(args.src, args.dst, site_id=args.site_id, overwrite=args.overwrite))


def run_import_generic(args: argparse.Namespace) -> int:
    """Import the files matched by the glob options into `args.dst`."""
    experts: dict[str, str] = {}
    for item in args.expert:
        expert_id, separator, pattern = item.partition("=")
        if not separator or not expert_id or not pattern:
            print(f"error: --expert {item!r} is invalid; write --expert ID=GLOB", file=sys.stderr)
            return 2
        if expert_id in experts:
            print(f"error: --expert '{expert_id}' is given twice; give each expert once", file=sys.stderr)
            return 2
        experts[expert_id] = pattern

    return _run_import(
        lambda: import_generic(
            args.dst,
            images=args.images,
            reference=args.reference,
            roi=args.roi,
            experts=experts,
            case_pattern=args.case_pattern,
            invert_masks=args.invert_masks,
            site_id=args.site_id or args.dst.name,
            in_channels=args.in_channels,
            seed=args.seed,
            capacity=args.capacity,
            overwrite=args.overwrite,
        )
    )


def run_synth(args: argparse.Namespace) -> int:
    """Write `args.sites` synthetic site folders under `args.dst` and print their paths."""
    # Imported here so the other site commands work in a checkout without the synthetic-data module.
    from common.synthetic import write_synthetic_sites

    if args.sites < 1 or args.cases < 1 or args.image_size < 1:
        print("error: --sites, --cases and --image-size must be >= 1", file=sys.stderr)
        return 2
    try:
        paths = write_synthetic_sites(
            args.dst,
            args.sites,
            args.seed,
            image_size=args.image_size,
            cases_per_site=args.cases,
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _add_import_parsers(commands: argparse._SubParsersAction) -> None:
    importer = commands.add_parser("import", help="copy a dataset into a new site folder")
    sources = importer.add_subparsers(dest="import_source", required=True, metavar="SOURCE")

    for name, handler, default_id, description in (
        ("drive", run_import_drive, "drive", "DRIVE in its official layout (training/, test/)"),
        ("chase_db1", run_import_chase_db1, "chase_db1", "CHASE_DB1 in its official flat layout"),
    ):
        parser = sources.add_parser(name, help=f"import {description}")
        parser.add_argument("src", type=Path, metavar="SRC", help="the unpacked dataset folder")
        parser.add_argument("dst", type=Path, metavar="DST", help="the site folder to create")
        parser.add_argument("--site-id", default=default_id, metavar="ID", help=f"site id (default {default_id})")
        parser.add_argument("--overwrite", action="store_true", help="replace the site files in a non-empty DST")
        parser.set_defaults(func=handler)

    generic = sources.add_parser("generic", help="import images and masks selected by glob patterns")
    generic.add_argument("dst", type=Path, metavar="DST", help="the site folder to create")
    generic.add_argument("--images", required=True, metavar="GLOB", help="glob pattern of the images")
    generic.add_argument(
        "--reference",
        metavar="GLOB",
        help="glob pattern of the reference masks; omit only with 3 or more --expert, whose majority vote is used",
    )
    generic.add_argument("--roi", metavar="GLOB", help="glob pattern of region-of-interest masks")
    generic.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="ID=GLOB",
        help="a real expert and the glob pattern of their masks (repeatable)",
    )
    generic.add_argument(
        "--case-pattern",
        default=r"(?P<case>.+)",
        metavar="REGEX",
        help="regex with a group named 'case', matched against each file name without its extension "
        "(default: the whole name)",
    )
    generic.add_argument("--invert-masks", action="store_true", help="masks store foreground as 0")
    generic.add_argument(
        "--site-id",
        metavar="ID",
        help="site id: letters, digits, '_', '.', '-' (default: the name of DST)",
    )
    generic.add_argument(
        "--in-channels",
        type=int,
        metavar="N",
        help="image channel count (default: read from the first image)",
    )
    generic.add_argument(
        "--capacity",
        type=float,
        default=0.05,
        metavar="C",
        help="capacity of each expert, a fraction of ROI pixels (default 0.05)",
    )
    generic.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    generic.add_argument("--overwrite", action="store_true", help="replace the site files in a non-empty DST")
    generic.set_defaults(func=run_import_generic)


def _run_import(importer: Callable[[], Path]) -> int:
    # SiteError is a ValueError; its message lists every problem of the imported site.
    try:
        site = importer()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"site {site}: imported, no problems")
    return 0
