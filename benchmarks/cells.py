"""Benchmark cells: named measurements saved one by one to a JSON file, so an interrupted suite resumes."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.stats import all_finite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One measurement: ``key`` names it in the results file and ``run`` returns its numbers (nested dicts)."""

    key: str
    run: Callable[[], dict[str, Any]]


class CellStore:
    """The results file of one suite: ``{"suite", "meta", "cells": {key: {...}}}``.

    Every finished cell is written at once (to a temporary file, then renamed), so a killed suite loses at
    most the cell it was running.

    Args:
        path: the JSON file; read when it exists.
        suite: the suite name; a file written by another suite is rejected.
        fresh: start empty even when the file exists (the quick suite always starts fresh).
    """

    def __init__(self, path: Path, suite: str, fresh: bool = False) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"suite": suite, "meta": {}, "cells": {}}
        if self.path.exists() and not fresh:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if loaded.get("suite") != suite:
                raise ValueError(
                    f"{self.path} contains results of suite {loaded.get('suite')!r}, not {suite!r}; "
                    "pass another --results folder or delete the file"
                )
            self.data = loaded
            self.data.setdefault("cells", {})
            self.data.setdefault("meta", {})

    @property
    def cells(self) -> dict[str, Any]:
        """Finished cells by key."""
        return self.data["cells"]

    def save_cell(self, key: str, result: dict[str, Any]) -> None:
        """Store one finished cell and write the file."""
        self.cells[key] = result
        self.write()

    def write(self) -> None:
        """Write the whole file atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def machine_description() -> str:
    """Describe this machine: processor, core count, memory, Python and torch versions."""
    import torch

    memory = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            total_kib = int(meminfo.readline().split()[1])
        memory = f", {total_kib / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    processor = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {processor}, {os.cpu_count()} CPU cores{memory}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'not used'}"
    )


def run_cells(cells: Sequence[Cell], store: CellStore) -> list[str]:
    """Run the cells that ``store`` does not hold yet, saving each as it finishes.

    A cell whose result contains a missing, NaN or infinite number is still saved (for inspection) under
    ``invalid``, and its key is returned.

    Returns:
        The keys of invalid cells; empty when every number was produced and finite.
    """
    keys = [cell.key for cell in cells]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"cell keys {duplicates} appear more than once; every cell needs its own key")

    invalid = []
    for index, cell in enumerate(cells, start=1):
        if cell.key in store.cells:
            logger.info("cell %d/%d %s: finished earlier, skipped", index, len(cells), cell.key)
            bad = all_finite(store.cells[cell.key])
        else:
            started = time.perf_counter()
            result = cell.run()
            seconds = time.perf_counter() - started
            bad = all_finite(result)
            store.save_cell(cell.key, {**result, "cell_seconds": seconds})
            logger.info("cell %d/%d %s: %.1f s", index, len(cells), cell.key, seconds)
        if bad:
            logger.error("cell %s has missing or non-finite numbers at %s", cell.key, ", ".join(bad))
            invalid.append(cell.key)
    return invalid
