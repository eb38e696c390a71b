"""FedAvg over the shared DeferredSeg parameters, with reply checks, a run history and per-round checkpoints."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.weights import check_arrays, save_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteInfo:
    """What the coordinator knows of a site: its reply to the site query, with no file names or cases."""

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


class SharedFedAvg(FedAvg):
    """FedAvg over the shared parameters only, weighted by each site's number of training examples.

    Site-local expert heads never travel, so only the shared arrays arrive here. Every reply is checked
    before aggregation: a reply with an error, wrong array names, shapes or dtypes, or non-finite values is
    left out of the round, and the site id and reason are logged. A round updates the weights only when at
    least ``min_sites`` sites reply with usable weights; otherwise the previous weights carry over.

    Args:
        registry: the sites by node id, from the site query.
        expected: shape and dtype of every shared array.
        run_dir: folder of ``history.jsonl`` and ``checkpoints/``.
        min_sites: usable replies a round needs.
    """

    def __init__(
        self,
        registry: dict[int, SiteInfo],
        expected: dict[str, tuple[tuple[int, ...], np.dtype]],
        run_dir: Path,
        min_sites: int,
    ) -> None:
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
        self.best_round = 0
        self.best_score = float("-inf")

    def summary(self) -> None:
        """Log the configuration once at start."""
        logger.info(
            "FedAvg over shared parameters: %d sites (%s), min-sites %d, %d shared arrays",
            len(self.registry),
            ", ".join(s.site_id for s in self.registry.values()),
            self.min_sites,
            len(self.expected),
        )

    def _record(self, server_round: int) -> RoundRecord:
        return self.records.setdefault(server_round, RoundRecord(server_round))

    def _messages(self, record: RecordDict, message_type: str, grid: Grid) -> list[Message]:
        connected = set(grid.get_node_ids())
        missing = [s.site_id for n, s in self.registry.items() if n not in connected]
        if missing:
            logger.warning("sites not connected, left out of this round: %s", ", ".join(missing))
        return [
            Message(content=record, message_type=message_type, dst_node_id=node_id)
            for node_id in self.registry
            if node_id in connected
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the shared weights and the run settings to every registered, connected site."""
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._messages(record, MessageType.TRAIN, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every registered, connected site to score the aggregated weights on its validation split."""
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._messages(record, MessageType.EVALUATE, grid)

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
        """Aggregate the usable replies when at least ``min_sites`` sent them; record each site's numbers."""
        usable = self.usable_replies(server_round, list(replies), with_arrays=True)
        record = self._record(server_round)
        for reply in usable:
            summary = json.loads(str(reply.content.config_records["site"]["summary"]))
            summary["num_examples"] = int(reply.content.metric_records["metrics"]["num-examples"])
            record.sites[self.site_of(reply)] = summary

        if len(usable) < self.min_sites:
            logger.warning(
                "round %d: %d usable replies, fewer than min-sites %d; keeping the previous weights",
                server_round, len(usable), self.min_sites,
            )
            return None, None
        return super().aggregate_train(server_round, usable)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each site's validation numbers of the aggregated weights."""
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

        record = self._record(server_round)
        state = arrays.to_torch_state_dict()
        save_weights(self.run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors", state)
        save_weights(self.run_dir / "model-last.safetensors", state)

        federation = federation_means(record.evaluation)
        line = {
            "round": server_round,
            "sites": {
                site_id: _history_entry(summary, record.evaluation.get(site_id))
                for site_id, summary in record.sites.items()
            },
            "federation": federation,
            "excluded": record.excluded,
        }
        with open(self.run_dir / "history.jsonl", "a", encoding="utf-8") as history:
            history.write(json.dumps(line) + "\n")

        score = federation.get("system_dice")
        if score is not None and score > self.best_score:
            self.best_score, self.best_round = score, server_round
            save_weights(self.run_dir / "model-final.safetensors", state)

        logger.info(
            "round %d: %d sites, validation model Dice %.4f, system Dice %.4f, deferral rate %.4f%s",
            server_round, len(record.sites), federation.get("model_dice", float("nan")),
            federation.get("system_dice", float("nan")), federation.get("deferral_rate", float("nan")),
            f", left out: {', '.join(record.excluded)}" if record.excluded else "",
        )
        return None


def _history_entry(train_summary: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    entry = {
        "num_examples": train_summary["num_examples"],
        "model_dice": train_summary["model_dice"],
        "system_dice": train_summary["system_dice"],
        "deferral_rate": train_summary["deferral_rate"],
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
