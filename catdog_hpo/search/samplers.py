"""The sampler registry: name -> factory; the names are the CLI's ``--sampler`` choices.

The names are declared in ``search.choices`` (so ``--help`` needs no Optuna); the registry is
checked against them at import (``config.check_registry``). A factory takes (seed, n_trials).
The pruners are ``search.pruners``.
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
