"""Per-round checkpoints of a run folder: shared weights plus the ledger state saved with them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATE = re.compile(r"^round-(\d{4})\.json$")


@dataclass(frozen=True)
class Checkpoint:
    """A completed round: its shared weights file and its saved state (ledger, best round)."""

    round: int
    weights: Path
    state: dict[str, Any]


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Return the last completed round of ``run_dir``, or ``None`` when it has none.

    A round counts as completed when its state file exists, because the server writes it after the weights.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    rounds = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STATE.match(p.name)))
    for server_round in reversed(rounds):
        weights = folder / f"round-{server_round:04d}.safetensors"
        if weights.exists():
            state = json.loads((folder / f"round-{server_round:04d}.json").read_text(encoding="utf-8"))
            return Checkpoint(server_round, weights, state)
    return None


def truncate_history(path: Path, last_round: int) -> None:
    """Drop history lines of rounds after ``last_round`` (written by an interrupted round)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["round"] <= last_round]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
