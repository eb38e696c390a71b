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

import tomli_w

from cli.report import format_site_table
from common.config import BUILTIN_SITES, FederationConfig, builtin_federation, load_federation
from server.strategy import federation_means

logger = logging.getLogger(__name__)

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
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last completed round (its ledger, weights and local heads)",
    )
    parser.add_argument(
        "--mode",
        choices=["federated", "local", "pooled"],
        default="federated",
        help=(
            "federated (default); local: each site trains alone; pooled: one model on all sites' data, for "
            "comparison only. All three write the same summary.json shape"
        ),
    )
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
    raw = builtin_federation(site_dirs, BUILTIN_SITES, seed)
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
        if entry.site_dir is None:
            raise ValueError(f"{source}: site {index + 1} has no dir; simulation needs dir = \"path/to/site\"")
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

    if args.resume is not None:
        if args.federation is not None or args.out is not None:
            raise ValueError("--resume takes the run folder alone; drop --federation and --out")
        run_dir = args.resume.resolve()
        federation_file = run_dir / "federation.toml"
        if not federation_file.exists():
            raise ValueError(f"{run_dir} has no federation.toml; --resume needs a folder written by deferredseg simulate")
        federation = load_federation(federation_file)
        if args.rounds is not None:
            federation_file, federation = resolve_federation_file(federation_file, run_dir, args.rounds)
    else:
        run_dir = (args.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")).resolve()
        if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
            raise ValueError(f"{run_dir} already contains a run; choose another --out, or continue it with --resume")
        run_dir.mkdir(parents=True, exist_ok=True)

        source = args.federation
        if source is None:
            source = _builtin_federation(run_dir, args.seed)
            print(f"No --federation given: built-in synthetic federation of {BUILTIN_SITES} sites in {run_dir / 'sites'}")
        federation_file, federation = resolve_federation_file(Path(source), run_dir, args.rounds)

    # Read every site's site.toml now: a missing or broken site folder should stop the run with its own
    # message, not as a failed site query after the simulation engine has started.
    from client.sitedata import open_site

    for entry in federation.sites:
        open_site(entry.site_dir, entry)

    if args.mode != "federated":
        return _run_comparison(args.mode, federation, run_dir)

    options = {"federation": str(federation_file), "run-dir": str(run_dir), "resume": args.resume is not None}
    num_sites = len(federation.sites)
    gpus = args.gpus_per_site
    if gpus is None:
        import torch

        gpus = 1.0 / num_sites if torch.cuda.is_available() else 0.0

    _configure_logging()
    print(f"Simulating {num_sites} sites for {federation.rounds} rounds; run folder {run_dir}")
    with tempfile.TemporaryDirectory(prefix="deferredseg-ray-") as ray_tmp:
        os.environ.setdefault("RAY_TMPDIR", ray_tmp)
        try:
            run_simulation(
                server_app=build_server_app(options),
                client_app=build_client_app(options),
                num_supernodes=num_sites,
                backend_config={
                    "client_resources": {"num_cpus": args.cpus_per_site, "num_gpus": gpus},
                    "init_args": {"include_dashboard": False},
                },
            )
        except KeyboardInterrupt:
            _stop_after_interrupt(run_dir)

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        print(f"deferredseg simulate: the run did not finish; see the log above and {run_dir}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    print()
    print(format_site_table(summary["sites"], summary["federation"]))
    print(f"\nchosen round {summary['chosen_round']} of {summary['rounds']}; run folder {run_dir}")
    return 0


def _run_comparison(mode: str, federation: FederationConfig, run_dir: Path) -> int:
    """Train the federation's sites alone (``local``) or pooled (``pooled``) for the same number of epochs."""
    from dataclasses import replace

    from cli.train import train_sites
    from client.sitedata import open_site
    from common.config import federation_settings

    sites = [open_site(entry.site_dir, entry) for entry in federation.sites]
    settings = federation_settings(federation, sites[0].spec.in_channels)
    # Same epochs and routing data as the federation, whose correctness heads learn from the calibration
    # split alone, so that the comparison measures federating and nothing else.
    train = replace(settings.train, epochs=federation.rounds * federation.local_epochs, cross_fit_folds=0)
    print(f"Mode {mode}: {len(sites)} sites, {train.epochs} epochs; run folder {run_dir}")

    if mode == "pooled":
        results = train_sites(sites, run_dir / "pooled", train, settings.network, settings.loss)["sites"]
    else:
        results = {}
        for site in sites:
            summary = train_sites([site], run_dir / "local" / site.site_id, train, settings.network, settings.loss)
            results.update(summary["sites"])

    summary = {"mode": mode, "sites": results, "federation": federation_means(results)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print()
    print(format_site_table(summary["sites"], summary["federation"]))
    print(f"\nrun folder {run_dir}")
    return 0


def _stop_after_interrupt(run_dir: Path) -> None:
    """End the process after Ctrl-C, which otherwise leaves Flower's server thread waiting for replies."""
    print(
        f"\ndeferredseg simulate: interrupted; completed rounds are kept, continue with "
        f"deferredseg simulate --resume {run_dir}",
        file=sys.stderr,
    )
    try:
        import ray

        ray.shutdown()
    finally:
        sys.stderr.flush()
        sys.stdout.flush()
        # The Flower server thread is not a daemon and blocks on replies that will never come, so a normal
        # exit would hang; 130 is the usual status of a process ended by SIGINT.
        os._exit(130)


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
