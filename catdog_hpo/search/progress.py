"""Live output of a run: a progress bar and one line per finished trial, read from the store.

It polls the study rather than listening to one worker, so it shows every worker's trials
(and other machines') the same way.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from catdog_hpo.search import optuna_compat
from catdog_hpo.search.budget import spent_seconds, union_length
from catdog_hpo.search.durations import format_duration
from catdog_hpo.search.record import (BUDGET_SESSION_PREFIX, StudyKey, TrialKey, counts_toward_n, finished_complete,
                                      outcome)

_KEY_PARAMS = 5  # parameters shown per trial line
# Below this much wall time no rate is printed: the summary of a 2-trial study whose time was
# mismeasured as microseconds printed 2745362618.2 trials/h. Over a second the rate is real.
MIN_PACE_S = 1.0


def trial_line(t: FrozenTrial) -> str:
    """One line: number, state, value, epochs run, seconds, key parameters (or why it stopped)."""
    # values[0]: accuracy, the first objective of every study (t.value raises with several).
    # A multi-objective trial stopped early carries the values of its best epoch so far.
    value = f"{t.values[0]:.4f}" if t.values and t.state == TrialState.COMPLETE else "-"
    if t.state == TrialState.PRUNED and t.intermediate_values:
        value = f"{t.intermediate_values[max(t.intermediate_values)]:.4f}"
    seconds = t.duration.total_seconds() if t.duration is not None else 0.0
    epochs = t.user_attrs.get(TrialKey.EPOCHS_RUN, 0)
    note = (t.user_attrs.get(TrialKey.REJECTED) or t.user_attrs.get(TrialKey.FAIL_REASON)
            or t.user_attrs.get(TrialKey.BUDGET_STOP))
    shown = note if note else " ".join(f"{k}={_short(v)}" for k, v in list(t.params.items())[:_KEY_PARAMS])
    state = "rejected" if TrialKey.REJECTED in t.user_attrs else outcome(t).lower()
    if t.user_attrs.get(TrialKey.BASELINE):
        shown = "baseline  " + shown
    elif t.user_attrs.get(TrialKey.WARM_START_FROM):  # study@storage#trial: the source says where
        shown = f"warm start from {t.user_attrs[TrialKey.WARM_START_FROM]}  " + shown
    if t.user_attrs.get(TrialKey.RESUMED_FROM_EPOCH):  # a retry that went on from a checkpoint
        shown = (f"resumed trial {t.user_attrs.get(TrialKey.RESUMED_FROM_TRIAL)} after epoch "
                 f"{t.user_attrs[TrialKey.RESUMED_FROM_EPOCH]}  " + shown)
    predicted = t.user_attrs.get(TrialKey.PREDICTED_S)
    pred = f" (pred {predicted:6.1f})" if isinstance(predicted, (int, float)) and TrialKey.REJECTED not in t.user_attrs else ""
    return f"trial {t.number:>4} {state:<8} acc {value:>6}  {epochs:>3} ep {seconds:7.1f} s{pred}  {shown}"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def pace(done: int, seconds: float, remaining: int | None, left_s: float | None) -> str:
    """'12.3 trials/h, ETA 4.1m': ``done`` trials in ``seconds`` as trials per hour, and the time
    to run ``remaining`` more at that pace (or to the end of the budget, whichever is first)."""
    if done <= 0 or seconds < MIN_PACE_S:
        return "- trials/h"
    rate = done / seconds  # trials per second
    eta = remaining / rate if remaining is not None else math.inf
    if left_s is not None:
        eta = min(eta, max(0.0, left_s))
    return f"{3600 * rate:.1f} trials/h" + ("" if math.isinf(eta) else f", ETA {format_duration(eta)}")


def study_pace(study: optuna.Study, since: float | None = None) -> str:
    """The run summary's line: trials, turned-away configs, wall time and trials per hour.

    ``since``: when this run started (epoch seconds). The wall time is the union of the stored
    worker sessions (search.budget) and [since, now]: a session writes its end at most every
    couple of seconds and not when its worker returns, so a short run recorded almost none of its
    time (a 2-trial study: "0s of wall time"), and the stored sessions alone undercount any run.
    """
    trials = study.get_trials(deepcopy=False)
    done = sum(counts_toward_n(t) for t in trials)
    rejected = sum(TrialKey.REJECTED in t.user_attrs for t in trials)
    attrs = optuna_compat.storage_of(study).get_study_system_attrs(optuna_compat.study_id(study))
    sessions = [(float(v[0]), float(v[1])) for k, v in attrs.items() if k.startswith(BUDGET_SESSION_PREFIX)]
    if since is not None:
        sessions.append((since, time.time()))
    spent = union_length(sessions)
    budget = study.user_attrs.get(StudyKey.BUDGET_S)
    return (f"time: {format_duration(spent)} of wall time" + (f" of a {format_duration(budget)} budget" if budget else "")
            + f"; {done} trials ({pace(done, spent, None, None)}), {rejected} configs turned away before training")


class Progress:
    def __init__(self, study: optuna.Study, target: int | None, enabled: bool = True,
                 budget_s: float | None = None) -> None:
        from tqdm import tqdm

        self._study = study
        self._seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        finished = sum(counts_toward_n(t) for t in study.get_trials(deepcopy=False))
        self._start, self._start_done = time.time(), finished
        self._budget_end = time.time() + budget_s - spent_seconds(study) if budget_s is not None else None
        self._target = target
        target = target if target is not None else 0  # 0: an open-ended bar (only --budget bounds the study)
        self._done = min(finished, target) if target else finished  # finished trials shown so far
        # The bar only on a terminal: in a log file it would be a wall of carriage returns.
        enabled = enabled and sys.stderr.isatty()
        self._bar = tqdm(total=target or None, initial=self._done, unit="trial", dynamic_ncols=True,
                         disable=not enabled, file=sys.stderr, bar_format=(
                             "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}"))
        self._write = self._bar.write if enabled else print
        self._update_postfix()

    def poll(self) -> None:
        """Print the trials finished since the last poll and move the bar."""
        trials = self._study.get_trials(deepcopy=False)
        for t in sorted((t for t in trials if t.state.is_finished() and t.number not in self._seen),
                        key=lambda t: t.datetime_complete or t.datetime_start):
            self._seen.add(t.number)
            if counts_toward_n(t) and (self._target is None or self._done < self._target):
                self._done += 1
                self._bar.update(1)
            self._write(f"[{self._done}/{self._target or '-'}] {trial_line(t)}  | {self._pace()}")
        self._update_postfix(trials)

    def _pace(self) -> str:
        left = self._budget_end - time.time() if self._budget_end is not None else None
        remaining = max(0, self._target - self._done) if self._target is not None else None
        return pace(self._done - self._start_done, time.time() - self._start, remaining, left)

    def _update_postfix(self, trials: list[FrozenTrial] | None = None) -> None:
        trials = trials if trials is not None else self._study.get_trials(deepcopy=False)
        values = [t.values[0] for t in trials if finished_complete(t)]
        best = max(values) if values else math.nan
        self._bar.set_postfix_str((f"best {best:.4f}" if values else "best -") + f", {self._pace()}", refresh=True)

    @property
    def started(self) -> float:
        """When this run's progress began (epoch seconds), before any of its workers started."""
        return self._start

    def close(self) -> None:
        self._bar.close()
