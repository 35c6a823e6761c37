"""``run --max-params`` / ``--max-flops``: the limits a sampled config must meet before training.

A config over them is turned away (a rejected trial, ``search.trial.reject``) without training;
its cost is counted on the meta device (``engine.models.model_cost``), so this takes no time.
The study's time budget (``run --budget``) is another thing: ``search.budget``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from catdog_hpo.errors import ConfigError
from catdog_hpo.search.record import TrialKey

if TYPE_CHECKING:
    from catdog_hpo.config import TrialConfig


@dataclass(frozen=True)
class Limits:
    """The cost guard: a sampled config over these is turned away before any training."""

    max_params: int | None = None
    max_flops: int | None = None  # forward FLOPs per image


def check_cost(cfg: TrialConfig, num_classes: int, limits: Limits) -> dict[str, int]:
    """Params and FLOPs of ``cfg``; ConfigError with the reason if it cannot be built or is over the limits."""
    from catdog_hpo.engine.models import model_cost

    cost = model_cost(cfg.model, num_classes, cfg.image_size)  # raises ConfigError if infeasible
    if limits.max_params is not None and cost.params > limits.max_params:
        raise ConfigError(f"{cost.params:,} parameters > --max-params {limits.max_params:,}")
    if limits.max_flops is not None and cost.flops > limits.max_flops:
        raise ConfigError(f"{cost.flops:,} FLOPs per image > --max-flops {limits.max_flops:,}")
    return {TrialKey.N_PARAMS: cost.params, TrialKey.FLOPS: cost.flops}
