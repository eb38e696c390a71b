"""`deferredseg simulate`: run a federation on one machine with Flower's simulation engine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from cli.report import format_site_table
from common.config import FederationConfig, load_federation

logger = logging.getLogger(__name__)

# The built-in federation is sized to finish in minutes on two CPU cores.
BUILTIN_SITES = 3
BUILTIN_OPTIONS: dict[str, Any] = {
    "rounds": 3,
    "local-epochs": 4,
    "steps-per-epoch": 25,
    "batch-size": 8,
    "patch-size": 48,
    "inference-window": 64,
}


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``deferredseg simulate``."""
    parser = subparsers.add_parser(
        "simulate",
        help="run a federation on this machine with Flower's simulation engine",
        description=(
            "Run a federated DeferredSeg training with Flower's simulation engine, one virtual node per site. "
            "With no --federation, a built-in synthetic federation of 3 sites is generated in the run folder."
        ),
    )
    parser.add_argument("--federation", type=Path, default=None, help="federation TOML file (site folders, options)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/sim-<time>)")
    parser.add_argument("--rounds", type=int, default=None, help="override the federation file's rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in synthetic federation")
    parser.add_argument(
        "--cpus-per-site", type=float, default=1.0, help="CPU cores reserved for each virtual node (default 1)"
    )
    parser.add_argument(
        "--gpus-per-site",
        type=float,
        default=None,
        help="GPU share of each virtual node (default: 1/number of sites when CUDA is present, else 0)",
    )
    parser.set_defaults(func=run_simulate)


def _builtin_federation(run_dir: Path, seed: int) -> Path:
    from common.synthetic import write_synthetic_sites

    site_dirs = write_synthetic_sites(run_dir / "sites", n_sites=BUILTIN_SITES, seed=seed)
    raw = {**BUILTIN_OPTIONS, "seed": seed, "sites": [{"dir": str(Path(d).resolve())} for d in site_dirs]}
    path = run_dir / "builtin-federation.toml"
    path.write_bytes(tomli_w.dumps(raw).encode("utf-8"))
    return path


def resolve_federation_file(source: Path, run_dir: Path, rounds: int | None) -> tuple[Path, FederationConfig]:
    """Write ``<run-dir>/federation.toml``: the source file with absolute paths and a state folder per site.

    The clients and the server read this copy, so a run can be resumed from its folder alone.
    """
    import tomllib

    raw = tomllib.loads(source.read_text(encoding="utf-8"))
    config = load_federation(source)
    for index, (table, entry) in enumerate(zip(raw["sites"], config.sites)):
        table["dir"] = str(entry.site_dir)
        table["state-dir"] = str(entry.state_dir or (run_dir / "state" / f"site-{index + 1}").resolve())
    if rounds is not None:
        raw["rounds"] = rounds

    resolved = run_dir / "federation.toml"
    resolved.write_bytes(tomli_w.dumps(raw).encode("utf-8"))
    return resolved, load_federation(resolved)


def run_simulate(args: argparse.Namespace) -> int:
    """Handle ``deferredseg simulate``."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    run_dir = (args.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")).resolve()
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir} already holds a finished run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)

    source = args.federation
    if source is None:
        source = _builtin_federation(run_dir, args.seed)
        print(f"No --federation given: built-in synthetic federation of {BUILTIN_SITES} sites in {run_dir / 'sites'}")
    federation_file, federation = resolve_federation_file(Path(source), run_dir, args.rounds)

    options = {"federation": str(federation_file), "run-dir": str(run_dir)}
    num_sites = len(federation.sites)
    gpus = args.gpus_per_site
    if gpus is None:
        import torch

        gpus = 1.0 / num_sites if torch.cuda.is_available() else 0.0

    _configure_logging()
    print(f"Simulating {num_sites} sites for {federation.rounds} rounds; run folder {run_dir}")
    with tempfile.TemporaryDirectory(prefix="deferredseg-ray-") as ray_tmp:
        os.environ.setdefault("RAY_TMPDIR", ray_tmp)
        run_simulation(
            server_app=build_server_app(options),
            client_app=build_client_app(options),
            num_supernodes=num_sites,
            backend_config={
                "client_resources": {"num_cpus": args.cpus_per_site, "num_gpus": gpus},
                "init_args": {"include_dashboard": False},
            },
        )

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        print(f"deferredseg simulate: the run did not finish; see the log above and {run_dir}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    print()
    print(format_site_table(summary["sites"], summary["federation"]))
    print(f"\nchosen round {summary['chosen_round']} of {summary['rounds']}; run folder {run_dir}")
    return 0


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("server", "client"):
        package_logger = logging.getLogger(name)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False
        if not package_logger.handlers:
            package_logger.addHandler(handler)

    # Flower logs through its own console handler; passing its records on to the root logger too would print
    # every line twice.
    logging.getLogger("flwr").propagate = False
