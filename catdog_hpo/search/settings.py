"""What one ``catdog-hpo run`` asks for (``RunSettings``, built by the CLI from its flags) and
what it fixes for every trial: the config overrides and the goal a trial returns.

The store (``search.study``), the worker loop (``search.worker``) and the command around them
(``search.run``) all read these; this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catdog_hpo.data import DataSource
from catdog_hpo.search.choices import WARM_START_TOP
from catdog_hpo.search.limits import Limits
from catdog_hpo.search.pareto import ParetoRule
from catdog_hpo.search.trial import Goal

if TYPE_CHECKING:
    from catdog_hpo.search.warm_start import WarmSource


@dataclass(frozen=True)
class RunSettings:
    study: str
    storage: str
    space: str  # built-in name or path
    sampler: str
    pruner: str
    trials: int | None  # None: as many as the time budget allows (needs time_budget)
    data: DataSource
    timeout: float | None = None  # seconds for this process to start new trials
    epochs: int | None = None  # overrides the space's train.epochs
    weights: str | None = None  # run --weights FILE: overrides model.weights_file (transfer families)
    workers: int = 1
    seed: int = 0
    devices: tuple[str, ...] = ("cpu",)  # one per worker (catdog_hpo.engine.device.assign_gpus)
    limits: Limits = field(default_factory=Limits)  # --max-params, --max-flops
    studies_dir: Path = Path("studies")
    heartbeat: int = 10  # seconds between heartbeats; a trial silent for 3x this is stale
    progress: bool = True
    objectives: tuple[str, ...] = ("accuracy",)  # search.objectives.OBJECTIVES keys, accuracy first
    latency_device: str = "cpu"  # where the latency objective is timed
    run_config: dict[str, Any] | None = None  # run --config FILE: {"path": ..., "values": {...}}
    deterministic: bool = False  # --deterministic: reproducible CUDA kernels (engine.runtime)
    time_budget: float | None = None  # run --budget: the study's wall-clock seconds (search.budget)
    baseline: bool = True  # enqueue the space's baseline config as trial 0 of a new study
    enqueue: tuple[dict[str, Any], ...] = ()  # run --enqueue FILE: params to run first (before the baseline)
    enqueue_from: str | None = None  # that FILE, recorded on its trials
    # run --warm-start STUDY[@STORAGE] (search.warm_start.WarmSource), several allowed: the
    # --warm-start-top best configs of each run first; a same-search source's trials are history
    warm_start: tuple[WarmSource, ...] = ()
    warm_start_top: int = WARM_START_TOP  # --warm-start-top K: configs taken from each source
    checkpoint_dir: Path | None = None  # --checkpoint-dir (None: beside a SQLite/journal file; search.checkpoints)
    checkpoint_every: int = 1  # --checkpoint-every: epochs between a trial's saved states (0: none)
    keep_weights: int = 3  # --keep-weights: completed trials whose best-epoch weights are kept
    mlflow: str | None = None  # --mlflow URI or $MLFLOW_TRACKING_URI: where trials are tracked (search.tracking)
    stop_when_flat: bool = False  # --stop-when-flat: end the study on a plateau (search.flat)


def overrides_of(settings: RunSettings) -> dict[str, Any]:
    """Dotted config paths the run fixes on top of the space (export replays these too)."""
    out: dict[str, Any] = {"train.seed": settings.seed}
    if settings.epochs is not None:
        out["train.epochs"] = settings.epochs
    if settings.weights is not None:
        out["model.weights_file"] = settings.weights
    return out


def goal_of(settings: RunSettings) -> Goal:
    """What each trial returns, and the Pareto pruning rule when the study has several objectives."""
    rule = ParetoRule() if len(settings.objectives) > 1 and settings.pruner == "pareto" else None
    return Goal(objectives=settings.objectives, latency_device=settings.latency_device, rule=rule)
