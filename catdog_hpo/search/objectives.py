"""What a study optimises: the objectives registry, its keys the choices of ``run --objectives``.

``accuracy`` (the final epoch's validation accuracy, maximised) is the default and always the
first objective; the others are costs, minimised, and all of them are known before training:
``params`` and ``flops`` from the meta-device forward (``engine.models.model_cost``), ``latency``
from timed batch-1 forwards (``engine.latency``) on ``--latency-device``. Each objective reads its
value from the trial user attribute named here, which ``search.trial`` records.
"""

from __future__ import annotations

from dataclasses import dataclass

from catdog_hpo.errors import UserError
from catdog_hpo.search.record import TrialKey


@dataclass(frozen=True)
class Objective:
    direction: str  # "maximize" | "minimize" (optuna.study.StudyDirection names)
    attr: str  # where the value is read: a trial user attribute (accuracy: the history's last val_acc)
    unit: str
    how: str  # how it is measured, in words (README, report, model card)


OBJECTIVES: dict[str, Objective] = {
    "accuracy": Objective("maximize", "val_acc", "share of val images",
                          "validation accuracy of the trial's best epoch (the weights retrain keeps)"),
    "params": Objective("minimize", TrialKey.N_PARAMS, "parameters",
                        "all parameters of the model (trainable or frozen), counted before training"),
    # The costs are of the model as shipped: with augment.tta it runs the network twice per image
    # (engine.tta), and a config that looked half as costly as what it ships would win the front.
    "flops": Objective("minimize", TrialKey.INFERENCE_FLOPS, "FLOPs per image",
                       "forward FLOPs per image of the model as shipped (2 per multiply-add of convs and linears; "
                       "both forwards with test-time flip averaging), counted before training"),
    "latency": Objective("minimize", TrialKey.LATENCY_MS, "ms",
                         "batch-1 forward time of the model as shipped (flip averaging included) on "
                         "--latency-device, median of repeated runs, measured before training on the trial's "
                         "architecture"),
}
PRIMARY = "accuracy"  # the objective pruning curves, show's ranking and export's default pick use
COSTS = tuple(name for name, o in OBJECTIVES.items() if o.direction == "minimize")


def parse_objectives(text: str) -> tuple[str, ...]:
    """``"accuracy,params"`` -> ("accuracy", "params"); one-line UserError for a bad list."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise UserError(f"--objectives {text!r}: name at least one of {', '.join(OBJECTIVES)}")
    for name in names:
        if name not in OBJECTIVES:
            raise UserError(f"--objectives {text!r}: unknown objective {name!r} "
                            f"(choose from {', '.join(OBJECTIVES)})")
    if len(set(names)) != len(names):
        raise UserError(f"--objectives {text!r}: an objective is named twice")
    if names[0] != PRIMARY:
        raise UserError(f"--objectives {text!r}: the first objective must be {PRIMARY} "
                        f"(the costs {', '.join(COSTS)} are traded against it)")
    return names


def directions(names: tuple[str, ...]) -> list[str]:
    return [OBJECTIVES[n].direction for n in names]
