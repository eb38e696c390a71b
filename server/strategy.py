"""FedAvg over the shared DeferredSeg parameters, with reply checks, a run history and per-round checkpoints."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_arrayrecords,
    aggregate_metricrecords,
    validate_message_reply_consistency,
)

from common.weights import check_arrays, save_weights
from server.ledger import CapacityLedger, workload_weight
from server.plots import write_plots

AGGREGATIONS = ("fedavg", "workload-aware")
_WEIGHT_KEY = "aggregation-weight"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteInfo:
    """The coordinator's record of a site: its reply to the site query, with no file names or cases."""

    node_id: int
    site_id: str
    in_channels: int
    experts: list[dict[str, Any]]
    splits: dict[str, int]


@dataclass
class RoundRecord:
    """Numbers of one round, written as one line of ``history.jsonl``."""

    server_round: int
    sites: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    bytes_sent: int = 0
    bytes_received: int = 0


class SharedFedAvg(FedAvg):
    """FedAvg over the shared parameters only, with a capacity ledger that prices expert workload.

    Site-local expert heads never travel, so only the shared arrays arrive here. Every reply is checked
    before aggregation: a reply with an error, wrong array names, shapes or dtypes, or non-finite values is
    left out of the round, and the site id and reason are logged. A round updates the weights only when at
    least ``min_sites`` sites reply with usable weights; otherwise the previous weights carry over.

    Each site gets its own train config with its experts' capacity prices and soft load-balancing bounds.
    With ``aggregation="fedavg"`` sites are weighted by their training examples; with ``"workload-aware"``
    by ``n * (1 + beta * max(0, P - 1))``, where P is the site's largest expert pressure this round.

    Args:
        registry: the sites by node id, from the site query.
        expected: shape and dtype of every shared array.
        run_dir: folder of ``history.jsonl`` and ``checkpoints/``.
        min_sites: usable replies a round needs.
        ledger: the capacity ledger; a resumed run passes the one saved with its last round.
        aggregation: ``"fedavg"`` or ``"workload-aware"``.
        round_offset: rounds already completed before this start (a resumed run).
        best: ``(round, federation validation system Dice)`` of the best round so far, when resuming.
    """

    def __init__(
        self,
        registry: dict[int, SiteInfo],
        expected: dict[str, tuple[tuple[int, ...], np.dtype]],
        run_dir: Path,
        min_sites: int,
        ledger: CapacityLedger | None = None,
        aggregation: str = "fedavg",
        round_offset: int = 0,
        best: tuple[int, float] = (0, float("-inf")),
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
        self.registry = registry
        self.expected = expected
        self.run_dir = Path(run_dir)
        self.min_sites = min_sites
        self.records: dict[int, RoundRecord] = {}
        self.best_round, self.best_score = best
        self.ledger = ledger or CapacityLedger()
        self.aggregation = aggregation
        self.round_offset = round_offset
        for info in registry.values():
            self.ledger.register(info.site_id, {e["id"]: float(e["capacity"]) for e in info.experts})

    def summary(self) -> None:
        """Log the configuration once at start."""
        logger.info(
            "%s aggregation over shared parameters: %d sites (%s), min-sites %d, %d shared arrays, "
            "price step %.3g, workload beta %.3g",
            self.aggregation,
            len(self.registry),
            ", ".join(s.site_id for s in self.registry.values()),
            self.min_sites,
            len(self.expected),
            self.ledger.config.price_step,
            self.ledger.config.workload_beta,
        )
        if self.round_offset:
            logger.info("resuming after round %d", self.round_offset)

    def _record(self, server_round: int) -> RoundRecord:
        return self.records.setdefault(server_round, RoundRecord(server_round))

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, message_type: str, grid: Grid
    ) -> list[Message]:
        connected = set(grid.get_node_ids())
        missing = [s.site_id for n, s in self.registry.items() if n not in connected]
        if missing:
            logger.warning("sites not connected, left out of round %d: %s", server_round, ", ".join(missing))

        messages = []
        for node_id, info in self.registry.items():
            if node_id not in connected:
                continue
            site_config = ConfigRecord(dict(config))
            site_config["server-round"] = server_round
            site_config["prices"] = json.dumps(self.ledger.prices_for(info.site_id))
            bounds = self.ledger.bounds_for(info.site_id)
            site_config["bounds"] = json.dumps(bounds)
            if message_type == MessageType.TRAIN:
                self._record(server_round).bounds[info.site_id] = bounds
                self._record(server_round).bytes_sent += arrays.count_bytes()
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: site_config})
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node_id))
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the shared weights, the run settings and each site's own prices and bounds."""
        return self._messages(server_round + self.round_offset, arrays, config, MessageType.TRAIN, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every registered, connected site to score the aggregated weights on its validation split."""
        return self._messages(server_round + self.round_offset, arrays, config, MessageType.EVALUATE, grid)

    def site_of(self, message: Message) -> str:
        """Return the site id of a reply's sender (``node-<id>`` for an unregistered node)."""
        info = self.registry.get(message.metadata.src_node_id)
        return info.site_id if info else f"node-{message.metadata.src_node_id}"

    def usable_replies(self, server_round: int, replies: Iterable[Message], with_arrays: bool) -> list[Message]:
        """Return the replies that can be aggregated; log and record the reason for each one left out."""
        record = self._record(server_round)
        usable = []
        for reply in replies:
            site_id = self.site_of(reply)
            if reply.has_error():
                reason = f"site failed: {reply.error.reason}"
            elif reply.metadata.src_node_id not in self.registry:
                reason = "reply from a node that is not in the site registry"
            elif with_arrays:
                arrays = reply.content.array_records.get(self.arrayrecord_key)
                reason = (
                    "no weights in the reply"
                    if arrays is None
                    else check_arrays({k: v.numpy() for k, v in arrays.items()}, self.expected)
                )
            else:
                reason = None
            if reason is not None:
                logger.warning("round %d: site %s left out: %s", server_round, site_id, reason)
                record.excluded[site_id] = reason
                continue
            usable.append(reply)
        return usable

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the usable replies when at least ``min_sites`` sent them; update the ledger from all of them."""
        server_round += self.round_offset
        usable = self.usable_replies(server_round, list(replies), with_arrays=True)
        record = self._record(server_round)
        for reply in usable:
            site_id = self.site_of(reply)
            summary = json.loads(str(reply.content.config_records["site"]["summary"]))
            num_examples = int(reply.content.metric_records["metrics"]["num-examples"])
            summary["num_examples"] = num_examples
            summary["train_seconds"] = float(reply.content.config_records["site"].get("train-seconds", 0.0))
            summary["experts"] = self.ledger.record(server_round, site_id, summary["experts"])
            record.bytes_received += reply.content.array_records[self.arrayrecord_key].count_bytes()
            record.sites[site_id] = summary

            weight = float(num_examples)
            if self.aggregation == "workload-aware":
                pressure = self.ledger.max_pressure(server_round, site_id)
                weight = workload_weight(num_examples, pressure, self.ledger.config.workload_beta)
            record.weights[site_id] = weight
            reply.content.metric_records["metrics"][_WEIGHT_KEY] = weight

        if len(usable) < self.min_sites:
            logger.warning(
                "round %d: %d usable replies, fewer than min-sites %d; keeping the previous weights",
                server_round, len(usable), self.min_sites,
            )
            return None, None

        total = sum(record.weights.values())
        record.weights = {site_id: w / total for site_id, w in record.weights.items()}
        contents = [reply.content for reply in usable]
        validate_message_reply_consistency(contents, _WEIGHT_KEY, check_arrayrecord=True)
        return aggregate_arrayrecords(contents, _WEIGHT_KEY), aggregate_metricrecords(contents, _WEIGHT_KEY)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each site's validation numbers of the aggregated weights."""
        server_round += self.round_offset
        usable = self.usable_replies(server_round, list(replies), with_arrays=False)
        record = self._record(server_round)
        for reply in usable:
            record.evaluation[self.site_of(reply)] = json.loads(str(reply.content.config_records["site"]["summary"]))
        if not usable:
            return None
        return super().aggregate_evaluate(server_round, usable)

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint the round's shared weights, write its history line and track the best round.

        Called by ``Strategy.start`` after each round's evaluation, in the place of a central evaluation.
        """
        if server_round == 0:
            return None
        server_round += self.round_offset

        record = self._record(server_round)
        state = arrays.to_torch_state_dict()
        federation = federation_means(record.evaluation)
        score = federation.get("system_dice")
        if score is not None and score > self.best_score:
            self.best_score, self.best_round = score, server_round
            save_weights(self.run_dir / "model-final.safetensors", state)

        line = {
            "round": server_round,
            "sites": {
                site_id: _history_entry(
                    summary, record.evaluation.get(site_id), record.weights.get(site_id), record.bounds.get(site_id, {})
                )
                for site_id, summary in record.sites.items()
            },
            "federation": federation,
            "excluded": record.excluded,
            "timing": {
                "round_seconds": time.perf_counter() - record.started,
                "max_train_seconds": max((s.get("train_seconds", 0.0) for s in record.sites.values()), default=0.0),
            },
            "bytes": {"sent": record.bytes_sent, "received": record.bytes_received},
        }
        with open(self.run_dir / "history.jsonl", "a", encoding="utf-8") as history:
            history.write(json.dumps(line) + "\n")

        # The round's checkpoint: shared weights, then the ledger and the best round, written last so that a
        # state file marks a round as complete.
        checkpoints = self.run_dir / "checkpoints"
        save_weights(checkpoints / f"round-{server_round:04d}.safetensors", state)
        save_weights(self.run_dir / "model-last.safetensors", state)
        checkpoint_state = {
            "round": server_round,
            "best_round": self.best_round,
            "best_score": self.best_score if self.best_round else None,
            "ledger": json.loads(self.ledger.to_json()),
        }
        tmp = checkpoints / f"round-{server_round:04d}.json.tmp"
        tmp.write_text(json.dumps(checkpoint_state, indent=2), encoding="utf-8")
        tmp.replace(checkpoints / f"round-{server_round:04d}.json")
        write_plots(self.run_dir)

        logger.info(
            "round %d: %d sites, validation model Dice %.4f, system Dice %.4f, deferral rate %.4f%s",
            server_round, len(record.sites), federation.get("model_dice", float("nan")),
            federation.get("system_dice", float("nan")), federation.get("deferral_rate", float("nan")),
            f", left out: {', '.join(record.excluded)}" if record.excluded else "",
        )
        return None



def _history_entry(
    train_summary: dict[str, Any],
    evaluation: dict[str, Any] | None,
    weight: float | None,
    bounds: dict[str, list[float]],
) -> dict[str, Any]:
    entry = {
        "num_examples": train_summary["num_examples"],
        "model_dice": train_summary["model_dice"],
        "system_dice": train_summary["system_dice"],
        "deferral_rate": train_summary["deferral_rate"],
        "train_seconds": train_summary.get("train_seconds"),
        "aggregation_weight": weight,
        "bounds": bounds,
        "experts": train_summary["experts"],
    }
    if evaluation is not None:
        entry["aggregated"] = {
            k: evaluation[k] for k in ("model_dice", "system_dice", "deferral_rate", "capacity_violations")
        }
    return entry


SUMMARY_KEYS = ("model_dice", "system_dice", "oracle_system_dice", "confidence_system_dice", "deferral_rate")


def federation_means(sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean of the Dice values and deferral rate over sites, and the sum of capacity violations."""
    if not sites:
        return {}
    out: dict[str, Any] = {k: float(np.mean([s[k] for s in sites.values()])) for k in SUMMARY_KEYS}
    out["capacity_violations"] = int(sum(s["capacity_violations"] for s in sites.values()))
    return out
