"""A recorded config compared with another: read through today's ``TrialConfig``, then the first
key where the two differ. Below ``ship.trialfile`` (the export's replay check) and
``ship.searched`` (the searched weights' config check), which both compare this way.
"""

from __future__ import annotations

from typing import Any

from catdog_hpo.config import TrialConfig, from_dict, to_dict
from catdog_hpo.errors import ConfigError, UserError


def normalised_config(recorded: Any, where: str) -> dict[str, Any]:
    """A recorded config dict read through ``TrialConfig`` and written back: keys added since it
    was recorded get their defaults (off), so a study run before them still replays and compares.
    UserError (one line) when it no longer reads (a key since removed, a value now refused)."""
    try:
        return to_dict(from_dict(TrialConfig, recorded, where=where))
    except ConfigError as exc:
        raise UserError(f"{exc}; this catdog-hpo cannot replay it") from None


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted path where nested data ``a`` and ``b`` differ, with both values; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return path, a.get(key, "(missing)"), b.get(key, "(missing)")
            found = first_difference(a[key], b[key], path)
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return prefix, a, b
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{prefix}[{i}]")
            if found is not None:
                return found
        return None
    if a != b or isinstance(a, bool) != isinstance(b, bool):  # True == 1 in Python; not in a config
        return prefix, a, b
    return None
