"""Environment variables that every Flower process of this project runs with."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# No telemetry, no update check, and no `uv sync` of the app's dependencies by the SuperLink; Ray, which
# the simulation engine uses, sends no usage statistics either.
FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_flower_environment(environment: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set each Flower variable that ``environment`` (default ``os.environ``) does not set yet; return it."""
    target = os.environ if environment is None else environment
    for name, value in FLOWER_ENVIRONMENT.items():
        target.setdefault(name, value)
    return target
