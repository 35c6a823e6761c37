"""Every trial of a study as one CSV row (``show --csv``, and beside each HTML report): Optuna's
trials dataframe plus the user attributes, nested ones as dotted columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catdog_hpo.errors import UserError
from catdog_hpo.search.record import TrialKey, outcome

if TYPE_CHECKING:
    import optuna
    import pandas as pd

# User attrs that get their own column, in this order, in the trials CSV.
KEY_USER_ATTRS = (TrialKey.N_PARAMS, TrialKey.FLOPS, TrialKey.SEC_PER_EPOCH, TrialKey.EPOCHS_RUN,
                  TrialKey.BEST_EPOCH, TrialKey.DEVICE, TrialKey.FAIL_REASON, TrialKey.REJECTED)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial, one row each: Optuna's trials_dataframe plus the user attrs flattened.

    Dict attrs (the config) become dotted columns (``user_attrs_config.optim.lr``); list attrs
    (the history) become JSON text; system attrs (artifact ids) are left out.
    """
    import pandas as pd

    base = study.trials_dataframe(attrs=("number", "value", "datetime_start", "datetime_complete",
                                         "duration", "params", "state"))
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return base
    base["state"] = base["number"].map({t.number: outcome(t) for t in trials})  # stopped early: PRUNED
    extra = pd.DataFrame([{"number": t.number, **_flatten_attrs(t.user_attrs)} for t in trials])
    known = [f"user_attrs_{k}" for k in KEY_USER_ATTRS if f"user_attrs_{k}" in extra.columns]
    rest = sorted(c for c in extra.columns if c != "number" and c not in known)
    return base.merge(extra[["number", *known, *rest]], on="number", how="left")


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """Write every trial of ``study`` to ``path`` (CSV); returns ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        trials_frame(study).to_csv(path, index=False)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _flatten_attrs(attrs: dict[str, Any], prefix: str = "user_attrs_") -> dict[str, Any]:
    """Nested dicts -> dotted keys (pandas.json_normalize); lists -> JSON text; ``prefix`` on each."""
    import pandas as pd

    if not attrs:
        return {}
    flat = pd.json_normalize(attrs, sep=".").to_dict(orient="records")[0]  # one row: native types
    return {f"{prefix}{key}": json.dumps(value) if isinstance(value, (list, tuple)) else value
            for key, value in flat.items()}
