"""``studies --json`` and ``show --json``: the same facts as the tables, as one JSON document.

Plain JSON types only (times as ISO 8601 strings, missing values as null), so scripts can
``json.loads`` the output. The keys are part of the CLI's interface: add, do not rename.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any

from catdog_hpo.search.record import OUTCOMES, StudyInfo, TrialRecord, from_history, outcome

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def dumps(data: Any) -> str:
    """``data`` as indented JSON; datetimes as ISO strings, NaN/inf as null (JSON has neither)."""
    return json.dumps(_plain(data), indent=2, allow_nan=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def studies_document(rows: list[dict[str, Any]], storage: str) -> dict[str, Any]:
    """``studies --json``: the store (password masked) and one object per study."""
    return {"storage": storage, "studies": rows}


def trial_document(trial: FrozenTrial) -> dict[str, Any]:
    rec = TrialRecord.from_trial(trial)
    return {
        "number": trial.number,
        "state": outcome(trial),
        "value": trial.value if trial.values is not None and len(trial.values) == 1 else None,
        "values": list(trial.values) if trial.values is not None else None,
        "params": dict(trial.params),
        "epochs_run": rec.epochs_run,
        "best_epoch": rec.best_epoch,
        "sec_per_epoch": rec.sec_per_epoch,
        "n_params": rec.n_params,
        "flops": rec.flops,  # one forward of the network per image
        "inference_flops": rec.shipped_flops,  # the model as shipped: both forwards with augment.tta
        "device": rec.device,
        "why": rec.why or None,
        "warm_start_from": rec.warm_start_from,
        "started": trial.datetime_start,
        "finished": trial.datetime_complete,
    }


def study_document(study: optuna.Study, top: list[FrozenTrial]) -> dict[str, Any]:
    """``show --json``: the study's recorded settings, its trials by state, and ``top`` (the best
    trials for one objective, the Pareto front for several)."""
    info = dataclasses.asdict(StudyInfo.from_study(study))
    info.pop("name")
    everything = study.get_trials(deepcopy=False)
    trials = [t for t in everything if not from_history(t)]  # a --warm-start history trial ran elsewhere
    counts = Counter(outcome(t) for t in trials)
    return {
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "settings": info,
        "trials": len(trials),
        "states": {state: counts.get(state, 0) for state in OUTCOMES},
        "history_trials": len(everything) - len(trials),
        "best": [trial_document(t) for t in top],
    }
