"""The sampler and pruner registries: name -> factory; the names are the CLI's choices.

The names are declared in ``search.choices`` (so ``--help`` needs no Optuna); each registry is
checked against them at import (``config.check_registry``). A sampler factory takes (seed,
n_trials), a pruner factory the epochs per trial.
"""

from __future__ import annotations

from typing import Callable

import optuna

from catdog_hpo.config import check_registry
from catdog_hpo.search import choices


def _tpe(seed: int | None, n_trials: int) -> optuna.samplers.BaseSampler:
    # Written out rather than left to the 5.0 defaults, so a seed means the same thing across
    # versions: multivariate TPE with groups (conditional spaces), constant liar for workers.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=_startup(n_trials), multivariate=True, group=True,
        constant_liar=True,
    )


def _startup(n_trials: int) -> int:
    """Random trials before a model-based sampler (TPE, GP, CMA-ES) models the space: 5-10."""
    return max(5, min(10, n_trials // 4))


def _gp(seed: int | None, n_trials: int) -> optuna.samplers.BaseSampler:
    # Optuna's Gaussian-process sampler (needs scipy and torch, both dependencies). Parameters
    # outside the space every trial shares (a conditional block's) are drawn by the seeded random
    # sampler; that is by design here, so Optuna's per-parameter warning about it is off.
    return optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=_startup(n_trials),
        independent_sampler=optuna.samplers.RandomSampler(seed=seed), warn_independent_sampling=False,
    )


def _cmaes(seed: int | None, n_trials: int) -> optuna.samplers.BaseSampler:
    # CMA-ES (the `cmaes` package) models int and float parameters only: categorical ones
    # (activation, optimizer, ...) and conditional ones go to the seeded random sampler, without
    # a warning per parameter. Pruned trials count with their last reported accuracy, so a study
    # with a pruner still feeds CMA-ES most of its trials.
    return optuna.samplers.CmaEsSampler(
        seed=seed, n_startup_trials=_startup(n_trials), consider_pruned_trials=True,
        independent_sampler=optuna.samplers.RandomSampler(seed=seed), warn_independent_sampling=False,
    )


def _qmc(seed: int | None, n_trials: int) -> optuna.samplers.BaseSampler:
    # A Sobol sequence, unscrambled: every worker, machine and resumed run draws from one shared
    # sequence (Optuna counts the points handed out in the study), so together they fill the
    # space evenly. Scrambling would give each of our per-stream seeds its own sequence. The seed
    # drives the random sampler that draws parameters outside the shared space (conditional ones).
    return optuna.samplers.QMCSampler(
        qmc_type="sobol", scramble=False, seed=seed,
        independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        warn_independent_sampling=False, warn_asynchronous_seeding=False,
    )


SAMPLERS: dict[str, Callable[[int | None, int], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "gp": _gp,
    "cmaes": _cmaes,
    "qmc": _qmc,
    "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
    # The grid's points are enqueued trials (fixed params); this sampler never picks one.
    "grid": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
    # NSGA-II for --objectives: a generation of a quarter of the trials (2..50), so a short
    # study still breeds a few generations instead of sampling 50 random parents first.
    "nsga2": lambda seed, n: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, min(50, n // 4))),
}
check_registry("samplers", SAMPLERS, choices.SAMPLERS)
# Samplers that refuse several objectives (--objectives accuracy,params): a one-line error. TPE,
# random and NSGA-II handle them (TPE multi-objective: Optuna's MOTPE). The grid is refused as a
# product choice (enumerate first, compare costs after); CMA-ES optimises one value only.
SINGLE_OBJECTIVE_SAMPLERS: dict[str, str] = {
    "grid": "the grid sampler runs single-objective studies only",
    "cmaes": "CMA-ES optimises a single objective",
}

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
