"""Entry point of the `deferredseg` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from common.environment import apply_flower_environment

# Set before flwr is imported anywhere, so no Flower code runs without it.
apply_flower_environment()


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    from cli.certs import add_certs_parser
    from cli.node import add_node_parser
    from cli.predict import add_predict_parser
    from cli.simulate import add_simulate_parser
    from cli.site_cmd import add_site_parser
    from cli.train import add_train_parser

    parser = argparse.ArgumentParser(
        prog="deferredseg",
        description="Federated multi-expert deferral for medical image segmentation (DeferredSeg on Flower).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(subparsers)
    add_train_parser(subparsers)
    add_site_parser(subparsers)
    add_predict_parser(subparsers)
    add_certs_parser(subparsers)
    add_node_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand; return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"deferredseg {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
