"""Plain-text tables of a study store: ``catdog-hpo studies`` and ``catdog-hpo show``.

Everything is read through the study record (``search.record``); numbers are formatted for a
glance (4-decimal values, ``1.23M`` counts).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from catdog_hpo.search.record import OUTCOMES, StudyInfo, TrialRecord, finished_complete, from_history, outcome

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

STATES = OUTCOMES  # trial outcomes in the order tables show them (record.outcome)
TOP_N = 10  # best trials listed by `show` and the report


def study_summaries(storage: BaseStorage) -> list[dict[str, Any]]:
    """One row per study in ``storage`` (oldest first): name, sampler, space, counts, best, start."""
    import optuna

    rows = []
    for name in optuna.get_all_study_names(storage):  # in the storage's order: oldest first
        study = optuna.load_study(study_name=name, storage=storage)
        info = StudyInfo.from_study(study)
        trials = [t for t in study.get_trials(deepcopy=False) if not from_history(t)]  # the study's own
        counts = Counter(outcome(t) for t in trials)
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        rows.append({
            "name": name,
            "sampler": "-" if info.sampler is None else info.sampler,
            "space": "-" if info.space is None else info.space,
            **{state.lower(): counts.get(state, 0) for state in STATES},
            "best": _best_value(trials, study.directions),
            "start": min(starts) if starts else None,
        })
    return rows


def format_study_summaries(rows: list[dict[str, Any]]) -> str:
    headers = ["name", "sampler", "space", "complete", "pruned", "fail", "running", "waiting",
               "best", "started"]
    body = [[r["name"], r["sampler"], r["space"], *(r[s.lower()] for s in STATES),
             _fmt_value(r["best"]), _fmt_time(r["start"])] for r in rows]
    return format_table(headers, body)


def top_trials(study: optuna.Study, n: int = TOP_N) -> list[FrozenTrial]:
    """The ``n`` best completed trials, best first (by the study's direction)."""
    from optuna.study import StudyDirection

    done = [t for t in study.get_trials(deepcopy=False) if finished_complete(t) and t.value is not None]
    maximize = study.direction == StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: (-t.value if maximize else t.value, t.number))[:n]


def format_trials(trials: Sequence[FrozenTrial]) -> str:
    """The ``show`` table: number, value, state, epochs run, sec/epoch, model params, hyperparameters."""
    headers = ["#", "value", "state", "epochs", "s/epoch", "pred s", "meas s", "params", "hyperparameters"]
    recs = [TrialRecord.from_trial(t) for t in trials]
    # pred s: the cost model's seconds for all epochs, before training; meas s: the epochs run.
    body = [[t.number, _fmt_value(t.value),
             outcome(t) + (" (baseline)" if r.baseline else " (warm start)" if r.warm_start_from else ""),
             _or_dash(r.epochs_run), _fmt_float(r.sec_per_epoch, 2), _fmt_float(r.predicted_s, 1),
             _fmt_float(r.measured_s, 1), _fmt_count(r.n_params),
             format_params(t.params)] for t, r in zip(trials, recs)]
    return format_table(headers, body)


def study_header(study: optuna.Study) -> str:
    """Lines describing a study: its settings (user attrs) and its trials by state."""
    info = StudyInfo.from_study(study)
    everything = study.get_trials(deepcopy=False)
    trials = [t for t in everything if not from_history(t)]  # a warm start's history ran elsewhere
    recs = [TrialRecord.from_trial(t) for t in trials]
    counts = Counter(outcome(t) for t in trials)
    rejected = sum(1 for r in recs if r.rejected is not None)
    shown = (("sampler", info.sampler), ("pruner", info.pruner), ("space", info.space), ("data", info.data))
    settings = ", ".join(f"{k} {v}" for k, v in shown if v is not None)
    finished = counts["COMPLETE"] + counts["PRUNED"] - rejected  # turned-away configs do not count toward N
    target = info.target_trials
    by_state = [f"{counts[s]} {s.lower()}" + (f" ({rejected} rejected before training)"
                                              if s == "PRUNED" and rejected else "")
                for s in STATES if counts[s]]
    lines = [f"study {study.study_name}" + (f" ({settings})" if settings else ""),
             f"trials: {len(trials)}" + (f", finished {finished}/{target}" if target else "")
             + (": " + ", ".join(by_state) if by_state else "")]
    base = next((t for t, r in zip(trials, recs) if r.baseline and finished_complete(t)), None)
    best = _best_value(trials, study.directions) if len(study.directions) == 1 else None
    if base is not None and best is not None and base.value is not None:
        lines.append(f"best {best:.4f}: {100 * (best - base.value):+.1f} points over the baseline "
                     f"(trial {base.number}, {base.value:.4f})")
    lines += _warm_start_lines(info, recs, [TrialRecord.from_trial(t) for t in everything if from_history(t)])
    if info.budget_s is not None:
        from catdog_hpo.search.budget import spent_seconds
        from catdog_hpo.search.durations import format_duration

        lines.append(f"budget: {format_duration(spent_seconds(study))} spent of {format_duration(info.budget_s)}")
    reasons = Counter(r.fail_reason if r.fail_reason is not None else "no reason recorded"
                      for t, r in zip(trials, recs) if t.state.name == "FAIL")
    lines += [f"failed x{n}: {reason}" for reason, n in reasons.most_common(3)]
    return "\n".join(lines)


def _warm_start_lines(info: StudyInfo, recs: list[TrialRecord], history: list[TrialRecord]) -> list[str]:
    """One line per --warm-start source: the trials that reran its configs, its history trials."""
    lines = []
    for source in info.warm_started_from:
        ran = [r.number for r in recs if (r.warm_start_from or "").rsplit("#", 1)[0] == source]
        copied = sum((r.warm_history_from or "").rsplit("#", 1)[0] == source for r in history)
        lines.append(f"warm start from {source}: its best configs are trials "
                     f"{', '.join(map(str, ran)) or '- (none fitted this space)'}; "
                     + (f"{copied} of its trials are the sampler's history (not counted)" if copied
                        else "no history (another space, data or epochs)"))
    return lines


def _best_value(trials: Sequence[FrozenTrial], directions: Sequence[Any]) -> float | None:
    from optuna.study import StudyDirection

    values = [t.value for t in trials if finished_complete(t) and len(t.values) == 1]
    if not values or len(directions) != 1:
        return None
    return max(values) if directions[0] == StudyDirection.MAXIMIZE else min(values)


def format_params(params: dict[str, Any]) -> str:
    """Hyperparameters as compact ``name=value`` pairs."""
    return " ".join(f"{k}={_fmt_param(v)}" for k, v in params.items())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned text and right-aligned numbers."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"-|[-+]?[\d.]+(e[-+]?\d+)?[kMG]?", text))


def _fmt_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _fmt_value(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_float(v: Any, digits: int) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def _fmt_count(v: Any) -> str:
    """1234567 -> '1.23M': parameter and FLOP counts at a glance."""
    if v is None:
        return "-"
    v = float(v)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def _fmt_time(t: datetime | None) -> str:
    return "-" if t is None else f"{t:%Y-%m-%d %H:%M}"


def _or_dash(v: Any) -> Any:
    return "-" if v is None else v
