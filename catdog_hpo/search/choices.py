"""The names of the search's registries: the CLI's ``--sampler``/``--pruner`` choices.

They live apart from the registries (``search.samplers.SAMPLERS``/``PRUNERS``, name -> factory)
so the CLI builds its parser without importing Optuna (``--help`` stays instant); the study
module checks at import that its registries build exactly these names
(``config.check_registry``).
"""

from __future__ import annotations

SAMPLERS = ("tpe", "random", "grid", "gp", "cmaes", "qmc", "nsga2")
PRUNERS = ("median", "sha", "hyperband", "patient", "none", "pareto")
