"""Flower ServerApp of the coordinator: site registry, FedAvg over shared weights, history and final report.

Run config keys: ``federation`` (the federation TOML file; empty trains the built-in synthetic federation of
``num-sites`` sites, which only a simulation can serve) and ``run-dir`` (the run folder, by default
``~/.deferredseg/runs/run-<run id>``; its name is the run name that sites use for their local state). ``connect-timeout`` (seconds, default 300) bounds the wait
for every site of the federation to connect at the start, and ``round-timeout`` (seconds, default 3600)
bounds each round. ``resume`` (true/false) continues a run folder from its last completed round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.config import (
    BUILTIN_SITES,
    FederationConfig,
    builtin_federation,
    federation_settings,
    load_federation,
    parse_federation,
)
from common.model import DeferredSegNet, shared_state
from common.weights import load_weights
from server.checkpoints import latest_checkpoint, truncate_history
from server.ledger import CapacityLedger, LedgerConfig
from server.strategy import SharedFedAvg, SiteInfo, federation_means

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 300.0
DEFAULT_ROUND_TIMEOUT = 3600.0


def _option(context: Context, defaults: Mapping[str, Any], key: str, fallback: Any = None) -> Any:
    value = context.run_config.get(key)
    if value in (None, ""):
        value = defaults.get(key, fallback)
    return fallback if value in (None, "") else value


def wait_for_sites(grid: Grid, expected: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Wait until ``expected`` nodes are connected or ``timeout`` seconds pass; return the connected node ids."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)


def query_sites(
    grid: Grid, node_ids: list[int], run_name: str, timeout: float, expected_ids: set[str] | None = None
) -> dict[int, SiteInfo]:
    """Send the site query to every node and build the site registry from the replies.

    A node that fails to reply, or serves a site that ``expected_ids`` does not list, is logged and left out.
    Two nodes that claim the same site id are an error, because their local state and their numbers would mix.
    """
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord({"run-name": run_name})}),
            message_type=MessageType.QUERY,
            dst_node_id=node_id,
        )
        for node_id in node_ids
    ]
    registry: dict[int, SiteInfo] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("node %d did not reply to the site query: %s", node_id, reply.error.reason)
            continue
        descriptor = json.loads(str(reply.content.config_records["site"]["descriptor"]))
        info = SiteInfo(
            node_id=node_id,
            site_id=str(descriptor["site-id"]),
            in_channels=int(descriptor["in-channels"]),
            experts=list(descriptor["experts"]),
            splits=dict(descriptor["splits"]),
        )
        if expected_ids and info.site_id not in expected_ids:
            logger.warning(
                "node %d serves site %r, which the federation file does not list; left out", node_id, info.site_id
            )
            continue
        clash = [s.site_id for s in registry.values() if s.site_id == info.site_id]
        if clash:
            raise RuntimeError(f"two nodes serve site {info.site_id!r}; give every site its own site-id in site.toml")
        registry[node_id] = info
        logger.info(
            "site %s joined: experts %s, cases %s",
            info.site_id, ", ".join(f"{e['id']} (capacity {e['capacity']})" for e in info.experts), info.splits,
        )
    return registry


def _in_channels(federation: FederationConfig, registry: dict[int, SiteInfo]) -> int:
    values = {s.in_channels for s in registry.values()}
    wanted = federation.in_channels or (values.pop() if len(values) == 1 else None)
    if wanted is None:
        raise RuntimeError(
            f"sites report different in-channels {sorted({s.in_channels for s in registry.values()})}; set "
            "in-channels in the federation file and convert the odd sites' images"
        )
    odd = [s.site_id for s in registry.values() if s.in_channels != wanted]
    if odd:
        raise RuntimeError(
            f"sites {odd} have images with another channel count than the federation's in-channels {wanted}; "
            "convert their images or change in-channels"
        )
    return wanted


def run_federation(grid: Grid, federation: FederationConfig, run_dir: Path, options: Mapping[str, Any]) -> dict:
    """Run the whole federation: registry, rounds, final test evaluation; write and return ``summary.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_name = run_dir.name
    connect_timeout = float(options.get("connect-timeout", DEFAULT_CONNECT_TIMEOUT))
    round_timeout = float(options.get("round-timeout", DEFAULT_ROUND_TIMEOUT))
    min_sites = federation.resolved_min_sites

    expected = len(federation.sites)
    node_ids = wait_for_sites(grid, expected, connect_timeout)
    if len(node_ids) < expected:
        logger.warning("%d of %d sites connected within %.0f s", len(node_ids), expected, connect_timeout)
    expected_ids = {entry.site_id for entry in federation.sites if entry.site_id}
    registry = query_sites(grid, node_ids, run_name, round_timeout, expected_ids)
    if len(registry) < min_sites:
        raise RuntimeError(
            f"only {len(registry)} sites replied to the site query, min-sites is {min_sites}; check the site nodes' logs"
        )

    settings = federation_settings(federation, _in_channels(federation, registry))
    (run_dir / "settings.json").write_text(settings.to_json() + "\n", encoding="utf-8")
    torch.manual_seed(settings.train.seed)
    initial = shared_state(DeferredSegNet(settings.network, num_experts=0))
    expected_arrays = {k: (tuple(v.shape), np.dtype(str(v.numpy().dtype))) for k, v in initial.items()}

    ledger_config = LedgerConfig(price_step=federation.price_step, workload_beta=federation.workload_beta)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and not options.get("resume"):
        raise RuntimeError(
            f"{run_dir} already contains rounds up to {checkpoint.round}; resume it with --resume or choose a new run folder"
        )
    if checkpoint is not None:
        initial = load_weights(checkpoint.weights)
        ledger = CapacityLedger.from_json(json.dumps(checkpoint.state["ledger"]), ledger_config)
        best = (int(checkpoint.state["best_round"]), float(checkpoint.state["best_score"] or float("-inf")))
        truncate_history(run_dir / "history.jsonl", checkpoint.round)
        logger.info("resuming %s after round %d of %d", run_name, checkpoint.round, federation.rounds)
    else:
        ledger, best = CapacityLedger(ledger_config), (0, float("-inf"))
    done = checkpoint.round if checkpoint is not None else 0

    strategy = SharedFedAvg(
        registry, expected_arrays, run_dir, min_sites, ledger=ledger, aggregation=federation.aggregation,
        round_offset=done, best=best,
    )
    base_config = {"run-name": run_name, "settings": settings.to_json()}
    if done < federation.rounds:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=federation.rounds - done,
            timeout=round_timeout,
            train_config=ConfigRecord(dict(base_config)),
            evaluate_config=ConfigRecord({**base_config, "split": "validation"}),
            evaluate_fn=strategy.end_round,
        )

    best_round = strategy.best_round or federation.rounds
    final_path = run_dir / "model-final.safetensors"
    if not final_path.exists():
        raise RuntimeError("no round produced aggregated weights; see the warnings above for the sites left out")
    final = ArrayRecord(load_weights(final_path))

    test_config = ConfigRecord({**base_config, "split": "test", "heads-round": best_round})
    messages = strategy.configure_evaluate(federation.rounds + 1, final, test_config, grid)
    sites: dict[str, Any] = {}
    for reply in grid.send_and_receive(list(messages), timeout=round_timeout):
        site_id = strategy.site_of(reply)
        if reply.has_error():
            logger.warning("site %s failed the test evaluation: %s", site_id, reply.error.reason)
            continue
        sites[site_id] = json.loads(str(reply.content.config_records["site"]["summary"]))

    summary = {
        "mode": "federated",
        "sites": sites,
        "federation": federation_means(sites),
        "chosen_round": best_round,
        "rounds": federation.rounds,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("run %s finished: chosen round %d, summary in %s", run_name, best_round, run_dir / "summary.json")
    return summary


def build_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """Build the coordinator's ServerApp; ``defaults`` fill run-config keys that the run does not set."""
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federation_file = _option(context, defaults, "federation")
        run_dir = _option(context, defaults, "run-dir") or Path.home() / ".deferredseg" / "runs" / f"run-{context.run_id}"
        if federation_file:
            federation = load_federation(Path(str(federation_file)))
        else:
            num_sites = int(_option(context, defaults, "num-sites", BUILTIN_SITES))
            raw = builtin_federation(None, num_sites, int(_option(context, defaults, "seed", 0)))
            federation = parse_federation(raw, base_dir=Path.cwd(), source="built-in federation")
            logger.info("no federation file: training the built-in synthetic federation of %d sites", num_sites)
        logger.info("run folder %s", run_dir)
        options = {
            key: _option(context, defaults, key)
            for key in ("connect-timeout", "round-timeout", "resume")
            if _option(context, defaults, key) is not None
        }
        run_federation(grid, federation, Path(str(run_dir)), options)

    return app


app = build_server_app()
