"""The names of the search's registries: the CLI's ``--sampler``/``--pruner`` choices.

They live apart from the registries (``search.samplers.SAMPLERS``, ``search.pruners.PRUNERS``:
name -> factory) so the CLI builds its parser without importing Optuna (``--help`` stays
instant); each registry checks at import that it builds exactly these names
(``config.check_registry``).
"""

from __future__ import annotations

SAMPLERS = ("tpe", "random", "grid", "gp", "cmaes", "qmc", "nsga2")
PRUNERS = ("median", "sha", "hyperband", "patient", "none", "pareto")
# run --warm-start-top's default (here, beside the choices, so --help needs no Optuna either): a
# few of a source's best configs, not so many that they crowd out the sampler's own proposals.
WARM_START_TOP = 3
