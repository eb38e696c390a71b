"""Command line of the benchmarks: ``python -m benchmarks.run --suite quick|full``."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.cells import CellStore, machine_description, run_cells
from benchmarks.report import markdown_tables, summarize_cells
from benchmarks.stats import all_finite
from benchmarks.suites import SUITES, SuiteConfig, plan_cells, scale_points

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_FULL_WORK = REPO_ROOT / "runs" / "benchmarks-full"
# Dataset folders under --data and the importer of each; the site folder takes the importer's site id.
REAL_DATASETS = {"DRIVE": "drive", "CHASE_DB1": "chase_db1"}
# Seed of the built-in synthetic sites; the training seeds are the suite's own.
SYNTHETIC_SEED = 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=(
            "Measure deferral quality, the cost of federation, workload balance and speed, and write "
            "<results>/<suite>.json and <results>/<suite>.md. The full suite resumes from the cells saved in "
            "its JSON file."
        ),
    )
    parser.add_argument("--suite", choices=sorted(SUITES), required=True, help="quick (synthetic, minutes) or full")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of the JSON and markdown results")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder holding DRIVE/ and CHASE_DB1/ (full suite only)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder for site folders and simulation runs (default: a temporary folder for quick, "
        "runs/benchmarks-full for full)",
    )
    parser.add_argument("--fresh", action="store_true", help="discard the saved cells of the full suite and start over")
    return parser


def prepare_synthetic(config: SuiteConfig, work_dir: Path) -> dict[tuple[int, int], list[Path]]:
    """Write (or reuse) the synthetic sites of every scaling point, by (sites, image size)."""
    from common.synthetic import write_synthetic_sites

    sites = {}
    for count, size in scale_points(config):
        root = work_dir / f"synthetic-{count}-sites-{size}px"
        dirs = [root / f"site-{index}" for index in range(1, count + 1)]
        if not all((d / "site.toml").exists() for d in dirs):
            dirs = write_synthetic_sites(
                root, n_sites=count, seed=SYNTHETIC_SEED, image_size=size, cases_per_site=config.synthetic_cases,
                overwrite=True,
            )
        sites[(count, size)] = dirs
    return sites


def prepare_real(data_dir: Path, work_dir: Path) -> list[Path] | None:
    """Import DRIVE and CHASE_DB1 from ``data_dir`` into ``work_dir/real`` once; ``None`` when a dataset is absent."""
    from common.importers import import_chase_db1, import_drive

    importers = {"DRIVE": import_drive, "CHASE_DB1": import_chase_db1}
    if not all((data_dir / name).is_dir() for name in REAL_DATASETS):
        return None

    site_dirs = []
    for name, site_id in REAL_DATASETS.items():
        dst = work_dir / "real" / site_id
        if not (dst / "site.toml").exists():
            logger.info("importing %s from %s into %s", name, data_dir / name, dst)
            importers[name](data_dir / name, dst, overwrite=True)
        site_dirs.append(dst)
    return site_dirs


def run_suite(
    config: SuiteConfig, results_dir: Path, work_dir: Path, data_dir: Path, fresh: bool, command: str
) -> int:
    """Run ``config``'s cells, then write its JSON and markdown; return the exit status (0 when all is finite)."""
    started = time.perf_counter()
    if config.name == "full":
        real = prepare_real(data_dir, work_dir)
        if real is None:
            print(
                f"full suite skipped: {data_dir} lacks {' or '.join(REAL_DATASETS)}; place the datasets there or "
                "pass --data"
            )
            return 0
        deferral_sites = federation_sites = real
    else:
        federation_sites = prepare_synthetic_federation(config, work_dir)
        deferral_sites = federation_sites[:1]
    scale_sites = prepare_synthetic(config, work_dir)

    store = CellStore(results_dir / f"{config.name}.json", config.name, fresh=fresh or config.name == "quick")
    cells = plan_cells(config, deferral_sites, federation_sites, scale_sites, work_dir)
    invalid = run_cells(cells, store)

    summary = summarize_cells(config, store.cells, [d.name for d in deferral_sites])
    bad_summary = all_finite(summary, allow_none=True)
    elapsed = time.perf_counter() - started
    # A resumed full suite adds this attempt's time to the earlier attempts'.
    earlier = float(store.data["meta"].get("wall_seconds", 0.0))
    store.data["meta"] = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "load_average_at_end": os.getloadavg()[0],
        "wall_seconds": earlier + elapsed,
        "cells": len(cells),
    }
    store.data["summary"] = summary
    store.write()
    (results_dir / f"{config.name}.md").write_text(markdown_tables(config, summary, store.data["meta"]) + "\n")

    print(f"{config.name} suite: {len(cells)} cells in {elapsed:.0f} s; results in {results_dir}")
    if invalid or bad_summary:
        print(
            f"{config.name} suite failed: missing or non-finite numbers in cells {invalid} and tables {bad_summary}",
            file=sys.stderr,
        )
        return 1
    return 0


def prepare_synthetic_federation(config: SuiteConfig, work_dir: Path) -> list[Path]:
    """Write the 2 synthetic sites that the quick suite's deferral and federation cells share."""
    from common.synthetic import write_synthetic_sites

    return write_synthetic_sites(
        work_dir / "federation-sites", n_sites=2, seed=SYNTHETIC_SEED, image_size=config.synthetic_image_size,
        cases_per_site=config.synthetic_cases, overwrite=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the suite and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
    ):
        os.environ.setdefault(name, value)

    config = SUITES[args.suite]
    arguments = argv if argv is not None else sys.argv[1:]
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in arguments)
    if args.work is not None:
        return run_suite(config, args.results, args.work, args.data, args.fresh, command)
    if config.name == "full":
        return run_suite(config, args.results, DEFAULT_FULL_WORK, args.data, args.fresh, command)
    with tempfile.TemporaryDirectory(prefix="deferredseg-bench-") as scratch:
        return run_suite(config, args.results, Path(scratch), args.data, args.fresh, command)


if __name__ == "__main__":
    sys.exit(main())
