"""Run configuration: training settings and the federation file."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.experts import ExpertSpec, parse_expert
from common.losses import LossWeights
from common.model import NetworkConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings, identical at every site of a federation.

    Args:
        epochs: epochs of ``deferredseg train``; in a federation, ``local_epochs`` per round replaces it.
        steps_per_epoch: optimizer steps per epoch, each on ``batch_size`` random patches.
        batch_size: patches per step.
        patch_size: side of the square training patches, in pixels; a multiple of the network's
            downsampling factor.
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.
        inference_window: side of the sliding window at inference, in pixels.
        seed: seed of weight initialization and patch sampling.
        device: ``"auto"`` (CUDA with mixed precision when present, CPU otherwise), ``"cpu"`` or ``"cuda"``.
        router: ``"benefit"`` (per-agent correctness heads, scored by P(expert right) - P(model right)) or
            ``"softmax"`` (DeferredSeg's routing channels, scored by their probabilities). ``benefit`` is the
            default because, at the training defaults, it beat confidence deferral on both retina sites, and
            it is far ahead of ``softmax`` in every measured setup (``docs/routing.md``). It needs a
            calibration split in a federation. ``softmax`` reproduces DeferredSeg.
        calibration_epochs: epochs of the benefit router's second stage, on its routing data.
        cross_fit_folds: ``deferredseg train`` only: folds of cross-fitting within the train split whose
            held-out predictions join the calibration split as routing data for the benefit router's heads.
            Each fold costs one extra training. 0 uses the calibration split alone. More routing data keeps the
            heads from fitting the few calibration cases: on CHASE_DB1, whose calibration split is one child,
            the heads trained on it alone lost to confidence deferral (``docs/routing.md``). A federation
            uses the calibration split alone, because the fold networks would have to retrain every round.
    """

    epochs: int = 20
    steps_per_epoch: int = 40
    batch_size: int = 8
    patch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    inference_window: int = 128
    seed: int = 0
    device: str = "auto"
    router: str = "benefit"
    calibration_epochs: int = 5
    cross_fit_folds: int = 2

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size", "patch_size", "inference_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning-rate must be positive, got {self.learning_rate}")
        if self.router not in ("softmax", "benefit"):
            raise ValueError(f"router must be softmax or benefit, got {self.router!r}")
        if self.calibration_epochs < 0:
            raise ValueError(f"calibration-epochs must be >= 0, got {self.calibration_epochs}")
        if self.cross_fit_folds < 0 or self.cross_fit_folds == 1:
            raise ValueError(
                f"cross-fit-folds must be 0 (calibration split alone) or at least 2, got {self.cross_fit_folds}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class SiteEntry:
    """One site of a federation file.

    Attributes:
        site_dir: the site's data folder; ``None`` in a coordinator's file for a deployed federation, where
            each site names its own folder in its node config.
        site_id: the site id expected to join; ``None`` accepts whichever site the node serves.
        state_dir: where the site keeps its local heads and its expert pseudonyms; ``None`` lets the caller
            choose (``deferredseg simulate`` uses ``<run-dir>/state/<index>``).
        capacity: capacity overrides by expert id; they do not edit ``site.toml``.
        extra_experts: simulated experts added for this run.
    """

    site_dir: Path | None
    state_dir: Path | None = None
    site_id: str | None = None
    capacity: Mapping[str, float] = field(default_factory=dict)
    extra_experts: tuple[ExpertSpec, ...] = ()


@dataclass(frozen=True)
class FederationConfig:
    """A federation file: the sites and the run options.

    Args:
        sites: the sites in node order; virtual node i serves ``sites[i]``.
        rounds: federated rounds.
        local_epochs: local epochs per round.
        backbone: MONAI backbone name (``unet`` or ``basicunet``).
        features: backbone output channels.
        channels: backbone encoder widths.
        train: local training settings (``epochs`` is ignored; ``local_epochs`` applies).
        min_sites: replies needed for a round to proceed; ``None`` means the number of sites minus one,
            at least 1.
        in_channels: image channels of every site; ``None`` takes the value the sites report, which must
            then agree.
        aggregation: ``"fedavg"`` (weights by training examples) or ``"workload-aware"`` (sites whose experts
            are under pressure count more).
        price_step: step size of the capacity-price update.
        workload_beta: strength of the workload-aware weighting.
        load_balancing: weight of DeferredSeg's soft load-balancing term (0 turns it off).
        load_balancing_floor: share of each expert's upper bound that becomes its lower bound in that term.
    """

    sites: tuple[SiteEntry, ...]
    rounds: int = 3
    local_epochs: int = 2
    backbone: str = "unet"
    features: int = 16
    channels: tuple[int, ...] = (16, 32, 64, 128)
    train: TrainSettings = field(default_factory=TrainSettings)
    min_sites: int | None = None
    in_channels: int | None = None
    aggregation: str = "fedavg"
    price_step: float = 0.1
    workload_beta: float = 1.0
    load_balancing: float = 0.0
    load_balancing_floor: float = LossWeights.load_balancing_floor

    @property
    def resolved_min_sites(self) -> int:
        """Replies a round needs: ``min_sites``, or the number of sites minus one, at least 1."""
        if self.min_sites is not None:
            return self.min_sites
        return max(1, len(self.sites) - 1)


_TRAIN_KEYS = {f.name.replace("_", "-"): f.name for f in fields(TrainSettings) if f.name != "epochs"}
_TOP_KEYS = {
    "rounds",
    "local-epochs",
    "backbone",
    "features",
    "channels",
    "min-sites",
    "in-channels",
    "aggregation",
    "price-step",
    "workload-beta",
    "load-balancing",
    "load-balancing-floor",
    "sites",
    "seed",
} | set(_TRAIN_KEYS)
_SITE_KEYS = {"dir", "id", "state-dir", "capacity", "experts"}


def load_federation(path: Path) -> FederationConfig:
    """Read a federation TOML file; relative site paths are resolved against the file's folder.

    Raises:
        ValueError: naming the file, the key and the fix, for unknown keys, missing sites and bad values.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"federation file {path} not found; pass an existing TOML file to --federation") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"federation file {path} is not valid TOML: {error}") from None
    return parse_federation(raw, base_dir=path.parent, source=str(path))


def parse_federation(raw: Mapping[str, Any], base_dir: Path, source: str = "federation file") -> FederationConfig:
    """Build a :class:`FederationConfig` from parsed TOML."""
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {sorted(_TOP_KEYS)}")

    site_tables = raw.get("sites")
    if not isinstance(site_tables, list) or not site_tables:
        raise ValueError(
            f"{source}: no [[sites]] tables; add one [[sites]] table per site, with dir = \"...\" in simulation "
            "or id = \"...\" in deployment"
        )

    sites = tuple(_parse_site(table, base_dir, f"{source} site {i + 1}") for i, table in enumerate(site_tables))

    train_values = {_TRAIN_KEYS[k]: raw[k] for k in _TRAIN_KEYS if k in raw}
    try:
        train = TrainSettings(**train_values)
        config = FederationConfig(
            sites=sites,
            rounds=int(raw.get("rounds", 3)),
            local_epochs=int(raw.get("local-epochs", 2)),
            backbone=str(raw.get("backbone", "unet")),
            features=int(raw.get("features", 16)),
            channels=tuple(int(c) for c in raw.get("channels", (16, 32, 64, 128))),
            train=train,
            min_sites=int(raw["min-sites"]) if "min-sites" in raw else None,
            in_channels=int(raw["in-channels"]) if "in-channels" in raw else None,
            aggregation=str(raw.get("aggregation", "fedavg")),
            price_step=float(raw.get("price-step", 0.1)),
            workload_beta=float(raw.get("workload-beta", 1.0)),
            load_balancing=float(raw.get("load-balancing", 0.0)),
            load_balancing_floor=float(raw.get("load-balancing-floor", LossWeights.load_balancing_floor)),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None

    if config.rounds < 1 or config.local_epochs < 1:
        raise ValueError(f"{source}: rounds and local-epochs must be at least 1")
    if config.aggregation not in ("fedavg", "workload-aware"):
        raise ValueError(f"{source}: aggregation must be \"fedavg\" or \"workload-aware\", got {config.aggregation!r}")
    if config.price_step < 0 or config.workload_beta < 0 or config.load_balancing < 0:
        raise ValueError(f"{source}: price-step, workload-beta and load-balancing must be >= 0")
    if not 1 <= config.resolved_min_sites <= len(sites):
        raise ValueError(f"{source}: min-sites must be between 1 and the number of sites ({len(sites)})")
    return config


def _parse_site(table: Mapping[str, Any], base_dir: Path, source: str) -> SiteEntry:
    if not isinstance(table, Mapping) or ("dir" not in table and "id" not in table):
        raise ValueError(
            f"{source}: give the site folder as dir = \"path/to/site\" (simulation) or the site id as "
            "id = \"...\" (deployment)"
        )
    unknown = sorted(set(table) - _SITE_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; valid keys are {sorted(_SITE_KEYS)}")

    site_dir = (base_dir / str(table["dir"])).resolve() if "dir" in table else None
    site_id = str(table["id"]) if "id" in table else None
    state_dir = (base_dir / str(table["state-dir"])).resolve() if "state-dir" in table else None

    capacity: dict[str, float] = {}
    for expert_id, value in dict(table.get("capacity", {})).items():
        if not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
            raise ValueError(f"{source}: capacity of {expert_id!r} is {value!r}; it must be in (0, 1]")
        capacity[str(expert_id)] = float(value)

    extra = []
    for i, expert in enumerate(table.get("experts", [])):
        spec = parse_expert(expert, f"{source} expert {i + 1}")
        if not spec.simulated:
            raise ValueError(
                f"{source} expert {spec.id!r}: a federation file may add simulated experts only; "
                "declare real experts in the site's site.toml"
            )
        extra.append(spec)
    return SiteEntry(site_dir, state_dir, site_id, capacity, tuple(extra))


def resolve_experts(
    declared: list[ExpertSpec], entry: SiteEntry | None, source: str = "federation file"
) -> list[ExpertSpec]:
    """Apply a federation file's capacity overrides and extra simulated experts to a site's expert list.

    Raises:
        ValueError: when an override names an expert the site does not have, or an extra expert reuses an id.
    """
    if entry is None:
        return list(declared)

    known = {e.id for e in declared}
    unknown = sorted(set(entry.capacity) - known - {e.id for e in entry.extra_experts})
    if unknown:
        raise ValueError(
            f"{source}: capacity override for unknown experts {unknown} at {entry.site_dir}; "
            f"the site declares {sorted(known)}"
        )
    clash = sorted(known & {e.id for e in entry.extra_experts})
    if clash:
        raise ValueError(f"{source}: extra experts {clash} reuse ids of {entry.site_dir}; choose new ids")

    experts = list(declared) + list(entry.extra_experts)
    return [replace(e, capacity=entry.capacity[e.id]) if e.id in entry.capacity else e for e in experts]


def to_plain(value: Any) -> Any:
    """Convert dataclasses and paths to JSON- and TOML-friendly values."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: to_plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class RunSettings:
    """Everything a site needs from the coordinator to train: architecture, training and loss settings.

    The coordinator sends it as JSON in every message, so all sites train the same network the same way.
    """

    network: NetworkConfig
    train: TrainSettings
    loss: LossWeights
    local_epochs: int = 1

    def to_json(self) -> str:
        """Serialize for a ``ConfigRecord`` (which accepts no nested structures)."""
        return json.dumps(to_plain(self))

    @classmethod
    def from_json(cls, text: str) -> RunSettings:
        """Parse the JSON written by :meth:`to_json`."""
        raw = json.loads(text)
        network = dict(raw["network"])
        network["channels"] = tuple(network["channels"])
        return cls(
            network=NetworkConfig(**network),
            train=TrainSettings(**raw["train"]),
            loss=LossWeights(**raw["loss"]),
            local_epochs=int(raw["local_epochs"]),
        )


def federation_settings(config: FederationConfig, in_channels: int) -> RunSettings:
    """Build the settings that the coordinator sends to every site of ``config``."""
    return RunSettings(
        network=NetworkConfig(
            backbone=config.backbone, in_channels=in_channels, features=config.features, channels=config.channels
        ),
        train=config.train,
        loss=LossWeights(load_balancing=config.load_balancing, load_balancing_floor=config.load_balancing_floor),
        local_epochs=config.local_epochs,
    )


# The built-in federation: 3 synthetic sites, sized to finish in minutes on two CPU cores.
BUILTIN_SITES = 3
BUILTIN_OPTIONS: dict[str, Any] = {
    "rounds": 3,
    "local-epochs": 4,
    "steps-per-epoch": 25,
    "batch-size": 8,
    "patch-size": 48,
    "inference-window": 64,
}


def builtin_federation(site_dirs: list[Path] | None, num_sites: int, seed: int) -> dict[str, Any]:
    """Return the built-in federation as raw TOML values: site folders when given, site ids otherwise."""
    if site_dirs is not None:
        sites = [{"dir": str(Path(d).resolve())} for d in site_dirs]
    else:
        sites = [{"id": f"site-{index + 1}"} for index in range(num_sites)]
    return {**BUILTIN_OPTIONS, "seed": seed, "sites": sites}
