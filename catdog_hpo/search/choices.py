"""The names of the search's registries: the CLI's ``--sampler``/``--pruner`` choices.

They live apart from the registries (``search.samplers.SAMPLERS``, ``search.pruners.PRUNERS``:
name -> factory) so the CLI builds its parser without importing Optuna (``--help`` stays
instant); each registry checks at import that it builds exactly these names
(``config.check_registry``).
"""

from __future__ import annotations

SAMPLERS = ("tpe", "random", "grid", "gp", "cmaes", "qmc", "nsga2")
PRUNERS = ("median", "sha", "hyperband", "patient", "none", "pareto")
