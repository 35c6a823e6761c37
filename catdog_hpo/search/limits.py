"""``run --max-params`` / ``--max-flops``: the limits a sampled config must meet before training.

A config over them is turned away (a rejected trial, ``search.trial.reject``) without training;
its cost is counted on the meta device (``engine.models.model_cost``), so this takes no time.
``--max-flops`` limits the model as shipped: with ``augment.tta`` both forwards (``engine.tta``).
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
    max_flops: int | None = None  # FLOPs per image of the model as shipped (both forwards with augment.tta)


def check_cost(cfg: TrialConfig, num_classes: int, limits: Limits) -> dict[str, int]:
    """Params, FLOPs (one forward of the network) and inference FLOPs (the model as shipped) of
    ``cfg``; ConfigError with the reason if it cannot be built or is over the limits."""
    from catdog_hpo.engine.models import model_cost
    from catdog_hpo.engine.tta import forwards_note, inference_flops

    cost = model_cost(cfg.model, num_classes, cfg.image_size)  # raises ConfigError if infeasible
    shipped = inference_flops(cfg, cost.flops)  # what --max-flops limits: a TTA model runs the network twice
    if limits.max_params is not None and cost.params > limits.max_params:
        raise ConfigError(f"{cost.params:,} parameters > --max-params {limits.max_params:,}")
    if limits.max_flops is not None and shipped > limits.max_flops:
        how = forwards_note(cfg, f"{cost.flops:,}")
        raise ConfigError(f"{shipped:,} FLOPs per image{how} > --max-flops {limits.max_flops:,}")
    return {TrialKey.N_PARAMS: cost.params, TrialKey.FLOPS: cost.flops, TrialKey.INFERENCE_FLOPS: shipped}
