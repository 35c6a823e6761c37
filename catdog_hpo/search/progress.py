"""Live output of a run: a progress bar and one line per finished trial, read from the store.

It polls the study rather than listening to one worker, so it shows every worker's trials
(and other machines') the same way.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

_KEY_PARAMS = 5  # parameters shown per trial line


def trial_line(t: FrozenTrial) -> str:
    """One line: number, state, value, epochs run, seconds, key parameters (or why it stopped)."""
    value = f"{t.value:.4f}" if t.value is not None and t.state == TrialState.COMPLETE else "-"
    if t.state == TrialState.PRUNED and t.intermediate_values:
        value = f"{t.intermediate_values[max(t.intermediate_values)]:.4f}"
    seconds = t.duration.total_seconds() if t.duration is not None else 0.0
    epochs = t.user_attrs.get("epochs_run", 0)
    note = t.user_attrs.get("rejected") or t.user_attrs.get("fail_reason")
    shown = note if note else " ".join(f"{k}={_short(v)}" for k, v in list(t.params.items())[:_KEY_PARAMS])
    return f"trial {t.number:>4} {t.state.name.lower():<8} acc {value:>6}  {epochs:>3} ep {seconds:7.1f} s  {shown}"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


class Progress:
    def __init__(self, study: optuna.Study, target: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._study = study
        self._seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
        self._done = min(finished, target)  # finished trials shown so far (tqdm's own count is off when disabled)
        # The bar only on a terminal: in a log file it would be a wall of carriage returns.
        enabled = enabled and sys.stderr.isatty()
        self._bar = tqdm(total=target, initial=min(finished, target), unit="trial", dynamic_ncols=True,
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
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and self._done < self._bar.total:
                self._done += 1
                self._bar.update(1)
            self._write(f"[{self._done}/{self._bar.total}] {trial_line(t)}")
        self._update_postfix(trials)

    def _update_postfix(self, trials: list[FrozenTrial] | None = None) -> None:
        trials = trials if trials is not None else self._study.get_trials(deepcopy=False)
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        best = max(values) if values else math.nan
        self._bar.set_postfix_str(f"best {best:.4f}" if values else "best -", refresh=True)

    def close(self) -> None:
        self._bar.close()
