"""The pruner registry: name -> factory (the epochs per trial); the names are the CLI's
``--pruner`` choices, declared in ``search.choices`` and checked at import
(``config.check_registry``). Beside it, the rungs each pruner acts at and the epochs a trial
runs on average under it (``EXPECTED_EPOCHS``, which the budget's admission weighs).
"""

from __future__ import annotations

from typing import Callable

import optuna

from catdog_hpo.config import check_registry
from catdog_hpo.search import choices

SHA_KEEP = 3  # reduction_factor of SHA and Hyperband: each rung keeps the best third


def first_rung(epochs: int) -> int:
    """The first epoch a pruner may act on (epochs are 1-based): about a quarter of the way in
    and never epoch 1 when there are more than two (epoch 1's accuracy is mostly noise), never
    the last epoch either (pruning it saves nothing)."""
    if epochs <= 2:
        return 1
    return max(2, min(epochs - 1, round(epochs / 4)))


def sha_first_rung(epochs: int) -> int:
    """ASHA's and Hyperband's minimum resource. From 9 epochs on it is 1 epoch (rungs at 1, 3, 9,
    ...): each rung keeps the best third, so a trial costs about 3 epochs on average, the economy
    a budget of 100 trials in an hour on a CPU needs (bench/budget.py); a rung keeps a third rather
    than pruning below a median, so one noisy epoch drops only the clearly lagging. Shorter
    trials keep first_rung's (a ladder of 1, 3 in 6 epochs would judge half the trial on noise)."""
    return 1 if epochs >= 9 else first_rung(epochs)


PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    # Optuna's n_warmup_steps: "the earliest a trial can be pruned is at step == n_warmup_steps".
    "median": lambda epochs: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=first_rung(epochs)),
    # ASHA / Hyperband rungs at sha_first_rung x 3^k epochs (20 epochs: rungs at 1, 3 and 9).
    "sha": lambda epochs: optuna.pruners.SuccessiveHalvingPruner(min_resource=sha_first_rung(epochs),
                                                                 reduction_factor=SHA_KEEP),
    "hyperband": lambda epochs: optuna.pruners.HyperbandPruner(
        min_resource=sha_first_rung(epochs), max_resource=max(epochs, 2), reduction_factor=SHA_KEEP),
    "patient": lambda epochs: optuna.pruners.PatientPruner(
        optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=first_rung(epochs)), patience=1),
    "none": lambda epochs: optuna.pruners.NopPruner(),
    # Multi-objective studies: Optuna prunes none; the Pareto rule (search.pareto) runs in the
    # objective instead, and the study's own pruner does nothing.
    "pareto": lambda epochs: optuna.pruners.NopPruner(),
}
check_registry("pruners", PRUNERS, choices.PRUNERS)


def all_epochs(epochs: int) -> float:
    """No pruner: a trial runs all of its epochs."""
    return float(epochs)


def sha_expected_epochs(epochs: int, first: int | None = None) -> float:
    """Epochs a trial runs on average under successive halving with rungs at first x 3^k: all up
    to the first rung, then each stretch between rungs by the third kept at the rung before it
    (20 epochs, rungs 1, 3, 9: 1 + 2/3 + 6/9 + 11/27 = 2.74)."""
    rung = sha_first_rung(epochs) if first is None else first
    expected, kept = float(min(rung, epochs)), 1.0
    while rung < epochs:
        kept /= SHA_KEEP
        nxt = min(rung * SHA_KEEP, epochs)
        expected += kept * (nxt - rung)
        rung = nxt
    return expected


def _hyperband_expected_epochs(epochs: int) -> float:
    """Optuna's Hyperband runs one SHA bracket per minimum resource first x 3^i below the maximum;
    the mean of the brackets' expectations (Optuna weighs them by budget: close enough here)."""
    first, brackets = sha_first_rung(epochs), []
    while first < epochs:
        brackets.append(sha_expected_epochs(epochs, first))
        first *= SHA_KEEP
    return sum(brackets) / len(brackets) if brackets else float(epochs)


def _median_expected_epochs(epochs: int) -> float:
    """Median rule: every trial runs to first_rung; about half of them are below the median there
    and stop, the rest mostly run on (an estimate: later steps prune a few more)."""
    w = first_rung(epochs)
    return w + (epochs - w) / 2


# Epochs a trial runs on average under each pruner, from its epochs: the budget guard weighs a
# config's expected cost (its epoch cost x these) against its fair share of the time left.
EXPECTED_EPOCHS: dict[str, Callable[[int], float]] = {
    "median": _median_expected_epochs, "patient": _median_expected_epochs,
    "sha": sha_expected_epochs, "hyperband": _hyperband_expected_epochs,
    "none": all_epochs, "pareto": all_epochs,
}
check_registry("expected epochs", EXPECTED_EPOCHS, choices.PRUNERS)
MULTI_OBJECTIVE_PRUNERS = ("pareto", "none")  # the PRUNERS a multi-objective study may use
