"""The glue between Optuna and the engine: trial -> TrialConfig -> fit -> reported accuracy.

Everything Optuna-specific about one trial lives here (suggest, report, prune, user attributes);
the engine (``train.fit``) knows nothing of Optuna and only calls ``on_epoch_end``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from catdog_hpo.search import interrupts
from catdog_hpo.config import TrialConfig, to_dict
from catdog_hpo.data import DataSource, ImageSet, load_images
from catdog_hpo.errors import ConfigError
from catdog_hpo.search.spaces import Space, resolve


class TrialFailed(Exception):
    """A trial that ran but cannot give a value (non-finite loss, out of memory): state FAIL."""


@dataclass(frozen=True)
class Budget:
    """The cost guard: a sampled config over these is turned away before any training."""

    max_params: int | None = None
    max_flops: int | None = None  # forward FLOPs per image


class ImageProvider:
    """Decoded images, one ImageSet per image size, resident on the training device.

    Images are decoded once per study (the on-disk cache) and loaded once per worker process
    (this memo), so trials never decode.
    """

    def __init__(self, source: DataSource, cache_dir: Path, device: torch.device) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.device = device
        self._sets: dict[int, ImageSet] = {}

    def get(self, image_size: int) -> ImageSet:
        if image_size not in self._sets:
            images = load_images(self.source, image_size, self.cache_dir)
            # Keep the uint8 tensors on the device for every trial of this worker.
            images.train_x, images.train_y = images.train_x.to(self.device), images.train_y.to(self.device)
            images.val_x, images.val_y = images.val_x.to(self.device), images.val_y.to(self.device)
            self._sets[image_size] = images
        return self._sets[image_size]


def check_cost(cfg: TrialConfig, num_classes: int, budget: Budget) -> dict[str, int]:
    """Params and FLOPs of ``cfg``; ConfigError with the reason if it cannot be built or is over budget."""
    from catdog_hpo.engine.models import model_cost

    cost = model_cost(cfg.model, num_classes, cfg.image_size)  # raises ConfigError if infeasible
    if budget.max_params is not None and cost.params > budget.max_params:
        raise ConfigError(f"{cost.params:,} parameters > --max-params {budget.max_params:,}")
    if budget.max_flops is not None and cost.flops > budget.max_flops:
        raise ConfigError(f"{cost.flops:,} FLOPs per image > --max-flops {budget.max_flops:,}")
    return {"n_params": cost.params, "flops": cost.flops}


def run_trial(
    trial: optuna.Trial,
    space: Space,
    overrides: dict[str, Any],
    images: ImageProvider,
    budget: Budget,
    artifact_store: Any | None = None,
) -> float:
    """Train one trial and return its final validation accuracy.

    Raises optuna.TrialPruned when the pruner stops it or the cost guard turns it away (the
    reason is in the ``rejected`` user attribute), TrialFailed for a run without a value.
    """
    from catdog_hpo.engine.train import EpochStats, check_optim, fit

    try:
        cfg = resolve(space, trial, overrides)
        check_optim(cfg.optim)  # e.g. nesterov without momentum: turned away, not failed
        num_classes = len(images.get(cfg.image_size).classes)
        cost = check_cost(cfg, num_classes, budget)
    except ConfigError as exc:
        trial.set_user_attr("rejected", str(exc))
        raise optuna.TrialPruned(f"rejected: {exc}") from None
    trial.set_user_attr("config", to_dict(cfg))
    for key, value in cost.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("device", str(images.device))
    data = images.get(cfg.image_size)
    history: list[dict[str, float]] = []

    def on_epoch_end(stats: EpochStats) -> None:
        history.append(asdict(stats))
        with interrupts.deferred():  # Ctrl-C waits for the store writes, then stops the trial
            trial.report(stats.val_acc, stats.epoch)
            prune = trial.should_prune()
            if prune:
                _record_history(trial, history)
        if prune:
            raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")

    with interrupts.allowed():  # training: a signal stops it at once
        result = fit(cfg, data, images.device, on_epoch_end=on_epoch_end)
    _record_history(trial, history)
    trial.set_user_attr("best_epoch", result.best_epoch)
    if result.status != "completed":
        raise TrialFailed(result.reason or result.status)
    if artifact_store is not None:
        from catdog_hpo.search.artifacts import upload_training_curves

        upload_training_curves(trial.study, trial, history, artifact_store)
    assert result.history, "a completed fit has at least one epoch"
    return result.history[-1].val_acc


def _record_history(trial: optuna.Trial, history: list[dict[str, float]]) -> None:
    trial.set_user_attr("history", history)
    trial.set_user_attr("epochs_run", len(history))
    if history:
        trial.set_user_attr("sec_per_epoch", round(sum(h["seconds"] for h in history) / len(history), 4))
