"""Flower ClientApp of a site: replies to the site query, trains locally and evaluates.

The site folder and the state folder come from the node config (``--node-config "site-dir=... state-dir=..."``).
In simulation, virtual node i serves the i-th site of the federation file named by the run config key
``federation``, or the i-th built-in synthetic site when that key is empty. Nothing is kept in memory between messages, because in deployment every message starts a new
ClientApp process: the site-local heads and the expert pseudonyms live in the state folder.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.engine import (
    Bounds,
    PatchSampler,
    evaluate_cases,
    expert_priority,
    routing_cases,
    select_device,
    train_correctness,
    train_epochs,
)
from client.overlays import write_overlay
from client.sitedata import SiteData, open_site
from common.config import BUILTIN_SITES, RunSettings, load_federation
from common.metrics import FOREGROUND_THRESHOLD
from common.model import DeferredSegNet, load_partial_state, local_state, shared_state
from common.routing import Routing
from common.site import Case
from common.synthetic import builtin_sites
from common.weights import load_weights, save_weights

logger = logging.getLogger(__name__)

# Cases per evaluation drawn as overlays into the site's state folder; they never leave the site.
SAMPLE_OVERLAYS = 2

# Keys of the MetricRecord of every train and evaluate reply; the same at every site, as FedAvg requires.
METRIC_KEYS = ("num-examples", "model-dice", "system-dice", "deferral-rate")
_RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SiteState:
    """A site's durable state for one run: local heads per round and the map from expert ids to pseudonyms.

    Layout: ``<state-dir>/<run-name>/pseudonyms.json`` and ``<state-dir>/<run-name>/heads/round-<r>.safetensors``.
    A new run name starts empty, so a run never loads another run's heads.
    """

    def __init__(self, state_dir: Path, run_name: str) -> None:
        if not _RUN_NAME.match(run_name):
            raise ValueError(f"invalid run name {run_name!r}; use letters, digits, '.', '_' and '-' only")
        self.root = Path(state_dir) / run_name

    def pseudonyms(self, expert_ids: list[str]) -> dict[str, str]:
        """Return ``{expert id: "expert-N"}``, assigning new numbers to experts seen for the first time.

        The map is stored, so pseudonyms stay stable for the whole run even when experts are added later.
        """
        path = self.root / "pseudonyms.json"
        mapping: dict[str, str] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        changed = False
        for expert_id in expert_ids:
            if expert_id not in mapping:
                mapping[expert_id] = f"expert-{len(mapping) + 1}"
                changed = True
        if changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(mapping, indent=2), encoding="utf-8")
            tmp.replace(path)
        return {expert_id: mapping[expert_id] for expert_id in expert_ids}

    def heads_path(self, server_round: int) -> Path:
        """Return the file of the local heads saved after ``server_round``."""
        return self.root / "heads" / f"round-{server_round:04d}.safetensors"

    def latest_heads(self, before_round: int) -> Path | None:
        """Return the newest heads file saved before ``before_round``, or ``None``."""
        for r in range(before_round - 1, 0, -1):
            if self.heads_path(r).exists():
                return self.heads_path(r)
        return None


def _setting(context: Context, defaults: Mapping[str, Any], key: str) -> Any:
    for source in (context.node_config, context.run_config, defaults):
        value = source.get(key)
        if value not in (None, ""):
            return value
    return None


def resolve_site(context: Context, defaults: Mapping[str, Any]) -> tuple[SiteData, Path]:
    """Find this node's site folder and state folder.

    A deployed node names them in its node config. A simulated node takes the site at its ``partition-id`` in
    the federation file, with the state folder from that file or ``<run-dir>/state/site-<i>``.
    """
    site_dir = _setting(context, defaults, "site-dir")
    if site_dir:
        state_dir = _setting(context, defaults, "state-dir")
        if not state_dir:
            raise ValueError(f"node config names site-dir={site_dir} but no state-dir; add state-dir=PATH")
        return open_site(Path(site_dir)), Path(state_dir)

    federation_file = _setting(context, defaults, "federation")
    partition = context.node_config.get("partition-id")
    if partition is None:
        raise ValueError(
            "this node has no site: give --node-config \"site-dir=PATH state-dir=PATH\", or run it as a "
            "simulated node"
        )
    index = int(partition)

    if not federation_file:
        # A Flower-native simulation without a federation file trains the built-in synthetic federation.
        num_sites = int(context.node_config.get("num-partitions", BUILTIN_SITES))
        site_dirs = builtin_sites(num_sites, int(_setting(context, defaults, "seed") or 0))
        return open_site(site_dirs[index]), site_dirs[index].parent / "state" / f"site-{index + 1}"

    config = load_federation(Path(str(federation_file)))
    if index >= len(config.sites):
        raise ValueError(
            f"virtual node {index} has no site: {federation_file} lists {len(config.sites)} sites; "
            "set num-supernodes to the number of sites"
        )
    entry = config.sites[index]
    if entry.site_dir is None:
        raise ValueError(f"site {index + 1} of {federation_file} has no dir; simulation needs dir = \"path/to/site\"")
    state_dir = entry.state_dir
    if state_dir is None:
        run_dir = _setting(context, defaults, "run-dir")
        if not run_dir:
            raise ValueError(f"site {index + 1} of {federation_file} has no state-dir and the run has no run-dir")
        state_dir = Path(str(run_dir)) / "state" / f"site-{index + 1}"
    return open_site(entry.site_dir, entry), Path(state_dir)


def _descriptor(site: SiteData, pseudonyms: dict[str, str]) -> dict[str, Any]:
    return {
        "site-id": site.site_id,
        "in-channels": site.spec.in_channels,
        "experts": [{"id": pseudonyms[e.id], "capacity": e.capacity} for e in site.experts],
        "splits": site.split_sizes(),
    }


def _build_model(site: SiteData, settings: RunSettings, message: Message, heads: Path | None) -> DeferredSegNet:
    if site.spec.in_channels != settings.network.in_channels:
        raise ValueError(
            f"site {site.site_id} has in-channels {site.spec.in_channels}, the federation uses "
            f"{settings.network.in_channels}; convert the site's images or set in-channels in the federation file"
        )
    torch.manual_seed(settings.train.seed)
    model = DeferredSegNet(settings.network, num_experts=len(site.experts))
    load_partial_state(model, message.content["arrays"].to_torch_state_dict(), "shared")
    if heads is not None:
        load_partial_state(model, load_weights(heads), "local")
    return model


def _metrics(summary: dict[str, Any], num_examples: int) -> MetricRecord:
    return MetricRecord(
        {
            "num-examples": num_examples,
            "model-dice": float(summary["model_dice"]),
            "system-dice": float(summary["system_dice"]),
            "deferral-rate": float(summary["deferral_rate"]),
        }
    )


def _public_summary(summary: dict[str, Any], pseudonyms: dict[str, str]) -> dict[str, Any]:
    """Rename experts to pseudonyms and drop what stays at the site (deferral precision)."""
    public = {k: v for k, v in summary.items() if k != "experts"}
    public["experts"] = {
        pseudonyms[expert_id]: {k: v for k, v in values.items() if k != "deferral_precision"}
        for expert_id, values in summary["experts"].items()
    }
    return public


def _bounds(config: ConfigRecord, pseudonyms: dict[str, str]) -> Bounds | None:
    """Return the soft load-balancing bounds the coordinator sent, in expert order (default ``[0, 1]``)."""
    if "bounds" not in config or not pseudonyms:
        return None
    by_pseudonym = json.loads(str(config["bounds"]))
    pairs = [by_pseudonym.get(p, [0.0, 1.0]) for p in pseudonyms.values()]
    return Bounds(
        lower=torch.tensor([float(lo) for lo, _ in pairs]), upper=torch.tensor([float(hi) for _, hi in pairs])
    )


def _prices(config: ConfigRecord, pseudonyms: dict[str, str]) -> list[float] | None:
    if "prices" not in config:
        return None
    by_pseudonym = json.loads(str(config["prices"]))
    return [float(by_pseudonym.get(p, 0.0)) for p in pseudonyms.values()]


def build_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the site's ClientApp; ``defaults`` fill run-config keys that the run does not set."""
    defaults = dict(defaults or {})
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        site, state_dir = resolve_site(context, defaults)
        state = SiteState(state_dir, str(message.content["config"]["run-name"]))
        descriptor = _descriptor(site, state.pseudonyms(site.expert_ids))
        return Message(RecordDict({"site": ConfigRecord({"descriptor": json.dumps(descriptor)})}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = message.content["config"]
        server_round = int(config["server-round"])
        settings = RunSettings.from_json(str(config["settings"]))
        site, state_dir = resolve_site(context, defaults)
        state = SiteState(state_dir, str(config["run-name"]))
        pseudonyms = state.pseudonyms(site.expert_ids)
        device = select_device(settings.train.device)

        model = _build_model(site, settings, message, state.latest_heads(server_round))
        sampler = PatchSampler(site.split("train"), settings.train.patch_size, settings.train.seed * 1000 + server_round)
        bounds = _bounds(config, pseudonyms) if settings.loss.load_balancing > 0 else None
        started = time.perf_counter()
        losses = train_epochs(
            model, sampler, settings.train, settings.loss, settings.local_epochs, device, bounds=bounds
        )
        if settings.train.router == "benefit":
            # Second stage: the correctness heads learn where each agent is right on routing data that the
            # segmentor never trained on.
            routing_data = routing_cases(site.split("calibration"), site.split("train"))
            calibration_seed = settings.train.seed * 1000 + 500 + server_round
            calibration = PatchSampler(routing_data, settings.train.patch_size, calibration_seed)
            train_correctness(model, calibration, settings.train, settings.train.calibration_epochs, device)
        train_seconds = time.perf_counter() - started
        save_weights(state.heads_path(server_round), local_state(model))

        priority = expert_priority(site.split("validation"), len(site.experts))
        summary, _ = evaluate_cases(
            model, site.split("validation"), site.expert_ids, site.capacity, settings.train, device, priority,
            prices=_prices(config, pseudonyms),
        )
        logger.info(
            "site %s round %d: loss %.4f, validation model Dice %.4f, system Dice %.4f, deferral rate %.4f",
            site.site_id, server_round, losses["total"], summary["model_dice"], summary["system_dice"],
            summary["deferral_rate"],
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(shared_state(model)),
                "metrics": _metrics(summary, len(site.split("train"))),
                "site": ConfigRecord(
                    {
                        "site-id": site.site_id,
                        "summary": json.dumps(_public_summary(summary, pseudonyms)),
                        "train-seconds": train_seconds,
                    }
                ),
            }
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        config = message.content["config"]
        server_round = int(config["server-round"])
        split = str(config.get("split", "validation"))
        if split not in ("validation", "test"):
            raise ValueError(f"evaluate split must be validation or test, got {split!r}")
        heads_round = int(config.get("heads-round", server_round))
        settings = RunSettings.from_json(str(config["settings"]))
        site, state_dir = resolve_site(context, defaults)
        state = SiteState(state_dir, str(config["run-name"]))
        pseudonyms = state.pseudonyms(site.expert_ids)
        device = select_device(settings.train.device)

        heads = state.heads_path(heads_round)
        if not heads.exists():
            heads = state.latest_heads(heads_round + 1)
        model = _build_model(site, settings, message, heads)
        priority = expert_priority(site.split("validation"), len(site.experts))
        overlay_dir = state.root / "overlays" / f"{split}-round-{server_round:04d}"
        sample_ids = {case.case_id for case in site.split(split)[:SAMPLE_OVERLAYS]}

        def write_sample_overlay(case: Case, prob: torch.Tensor, routing: Routing) -> None:
            if case.case_id in sample_ids:
                model_pred = ((prob > FOREGROUND_THRESHOLD) & torch.as_tensor(case.roi)).numpy()
                write_overlay(
                    overlay_dir / f"{case.case_id}.png", case.image, case.reference, model_pred,
                    routing.owner.numpy(), site.expert_ids,
                )

        summary, _ = evaluate_cases(
            model, site.split(split), site.expert_ids, site.capacity, settings.train, device, priority,
            prices=_prices(config, pseudonyms), on_case=write_sample_overlay,
        )
        content = RecordDict(
            {
                "metrics": _metrics(summary, len(site.split(split))),
                "site": ConfigRecord(
                    {"site-id": site.site_id, "summary": json.dumps(_public_summary(summary, pseudonyms))}
                ),
            }
        )
        return Message(content, reply_to=message)

    return app


app = build_client_app()
