"""The study's time budget (``run --budget``): time spent and left, and the guard that prices
each config for admission (the rule itself: ``search.admission``).

Time spent: every worker process of every run, on every machine, records one session interval
``[start, last seen]`` (epoch seconds) in the study's system attributes. Time spent is the length
of the union of those intervals: parallel workers and machines overlap and count once, a resumed
run adds only its own time, a crashed worker's interval ends where it was last seen.

Pricing (``Guard.admit``): before any training, the cost model (engine.cost) predicts a config's
seconds on this device for all its epochs, and its expected seconds under the pruner: its epochs'
cost x the share of them a trial runs on average (``Guard.ran_share``: the pruner's theory,
2.74 of 20 under SHA's rungs at 1, 3, 9, all of them without a pruner, as a prior worth
PRIOR_TRIALS trials, blended with the share the study's finished trials ran). A refused config
is recorded as a rejected trial, which the sampler learns from through an Optuna constraint.

A running trial is stopped at the end of an epoch once the budget is spent (``Guard.overrun``), so
the run ends within the budget plus one epoch of the slowest running trial.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import optuna

from catdog_hpo.errors import ConfigError
from catdog_hpo.search import admission, optuna_compat
from catdog_hpo.search.record import (BUDGET_SESSION_PREFIX, CALIBRATION_PREFIX, StudyKey, TrialKey,
                                      asked_by_name, counts_toward_n, tally)
from catdog_hpo.search.pruners import all_epochs

# Trials the pruner's theory of the epochs a trial runs counts as, against the study's record:
# enough that a few early trials do not swing it, few enough that the record soon leads (under
# TPE, SHA promotes more than its theory: later configs beat the earlier ones they are ranked against).
PRIOR_TRIALS = 8.0
_TOUCH_EVERY_S = 2.0  # how often a session writes its "last seen" time (store writes are not free)


def resolve_budget(study: optuna.Study, given: float | None) -> float | None:
    """The study's budget in seconds: ``given`` (stored on the study, so a resumed run without
    --budget keeps it) or the one stored by an earlier run, or None (no budget)."""
    stored = study.user_attrs.get(StudyKey.BUDGET_S)
    if given is not None:
        if stored != given:
            study.set_user_attr(StudyKey.BUDGET_S, given)
        return given
    return float(stored) if stored is not None else None


# --------------------------------------------------------------------------- time spent


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (overlaps count once)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class StudyClock:
    """This process's session of the study, and the study's time spent and left."""

    def __init__(self, study: optuna.Study, budget_s: float | None) -> None:
        self._study = study
        self._storage = optuna_compat.storage_of(study)
        self.budget_s = budget_s
        self._key = BUDGET_SESSION_PREFIX + uuid.uuid4().hex[:16]
        self._start = time.time()
        self._last_touch = 0.0
        self.touch(force=True)

    def touch(self, force: bool = False) -> None:
        """Record that this session is alive until now."""
        now = time.time()
        if force or now - self._last_touch >= _TOUCH_EVERY_S:
            self._storage.set_study_system_attr(optuna_compat.study_id(self._study), self._key,
                                                [self._start, now])
            self._last_touch = now

    def spent(self) -> float:
        """Seconds of the study's wall time so far, over every session of every run."""
        attrs = self._storage.get_study_system_attrs(optuna_compat.study_id(self._study))
        intervals = [(float(v[0]), float(v[1])) for k, v in attrs.items()
                     if k.startswith(BUDGET_SESSION_PREFIX) and k != self._key]
        intervals.append((self._start, time.time()))
        return union_length(intervals)

    def left(self) -> float:
        """Seconds of the budget left (inf without a budget)."""
        self.touch()  # with or without a budget: the study's wall time is recorded (show, summary)
        if self.budget_s is None:
            return math.inf
        return self.budget_s - self.spent()


def spent_seconds(study: optuna.Study) -> float:
    """The study's time spent so far (for show and the report; no session of its own)."""
    attrs = optuna_compat.storage_of(study).get_study_system_attrs(optuna_compat.study_id(study))
    return union_length([(float(v[0]), float(v[1])) for k, v in attrs.items()
                         if k.startswith(BUDGET_SESSION_PREFIX)])


# --------------------------------------------------------------------------- admission


def _nominal() -> Any:
    from catdog_hpo.engine.cost import Calibration

    return Calibration(flop_rate=2e10, step_s=2e-4, act_s=1e-9)  # ~ 2 CPU cores; only the ratios between configs matter


@dataclasses.dataclass
class Plan:
    """What the guard needs to know about the run: its trial target and parallelism."""

    trials: int | None  # --trials (None: as many as fit)
    workers: int
    expected_epochs: Callable[[int], float] = all_epochs  # epochs a trial runs on average under the pruner


class Guard:
    """One worker's cost model and budget guard (see the module docstring)."""

    def __init__(self, study: optuna.Study, clock: StudyClock, plan: Plan, device: Any) -> None:
        self.study = study
        self.clock = clock
        self.plan = plan
        self.device = device
        self.where = f"{platform.node()}:{device}"
        self._calibration: Any = None
        self._nominal = False  # the calibration is NOMINAL, not measured here
        self.refusals = admission.Refusals()  # this worker's one refusal counter (the worker counts)

    def calibration(self, data: Any, trials: list[optuna.trial.FrozenTrial]) -> Any:
        """The cost model's rates on this device: the study's stored calibration for this
        host and device, else measured now (a few seconds) and stored; then corrected by the
        study's measured trials here (``trials``: the study's, as read for this admission)."""
        pairs = []
        for t in trials:
            ua = t.user_attrs
            if ua.get(TrialKey.COST_DEVICE) == self.where and ua.get(TrialKey.SEC_PER_EPOCH) \
                    and ua.get(TrialKey.PREDICTED_EPOCH_S):
                pairs.append((float(ua[TrialKey.SEC_PER_EPOCH]), float(ua[TrialKey.PREDICTED_EPOCH_S])))
        if self._calibration is None or (self._nominal and not pairs and self.clock.budget_s is not None):
            self._calibration = self._load_or_measure(data, measure=self.clock.budget_s is not None and not pairs)
        return self._calibration.corrected(pairs)

    def _load_or_measure(self, data: Any, measure: bool) -> Any:
        """The study's stored calibration for this host and device; else, with a budget to plan,
        measured now (a few seconds) and stored; else nominal rates (the study's measured trials
        correct them before they matter: without a budget nothing is admitted by them)."""
        from catdog_hpo.engine.cost import Calibration, calibrate

        key = CALIBRATION_PREFIX + self.where
        storage, sid = optuna_compat.storage_of(self.study), optuna_compat.study_id(self.study)
        stored = dict(storage.get_study_system_attrs(sid).get(key) or {})
        self._nominal = bool(stored.pop("nominal", False))
        if stored and not (measure and self._nominal):
            return Calibration(**stored)
        if measure:
            cal, self._nominal = calibrate(data, self.device), False
        else:
            cal, self._nominal = _nominal(), True
        storage.set_study_system_attr(sid, key, {**dataclasses.asdict(cal), "nominal": self._nominal})
        return cal

    def admit(self, trial: optuna.Trial, cfg: Any, flops: int, params: int, data: Any,
              feature_cache: Path | None = None) -> float:
        """Predicted seconds of ``cfg`` (recorded on the trial); ConfigError with the reason when
        the budget cannot afford it. ``feature_cache``: where frozen-backbone features are cached."""
        from catdog_hpo.engine.cost import workload
        from catdog_hpo.engine.heads import applies, features_ready

        trials = self.study.get_trials(deepcopy=False)  # read once: the calibration, the record, the share
        cal = self.calibration(data, trials)
        w = workload(cfg, flops, params, len(data.classes), len(data.train_y), len(data.val_y),
                     features_cached=features_ready(cfg, data, feature_cache))
        raw_epoch = cal.epoch_seconds(w)
        predicted = cal.predict(w)
        trial.set_user_attr(TrialKey.PREDICTED_S, round(predicted, 3))
        # A frozen-backbone trial's epoch is a head on cached features (engine/heads.py), another
        # regime than the convolutions the correction scales: it does not correct the others.
        if not applies(cfg):
            trial.set_user_attr(TrialKey.PREDICTED_EPOCH_S, round(raw_epoch, 5))
        trial.set_user_attr(TrialKey.COST_DEVICE, self.where)
        ran = min(float(w.epochs), w.epochs * self.ran_share(w.epochs, trials))  # epochs, on average
        config = admission.Priced(
            predicted_s=predicted, expected_s=predicted - cal.predict(w, epochs=w.epochs - ran), epochs=w.epochs,
            ran_epochs=ran, by_name=asked_by_name(trial.user_attrs))
        self.refusals.priced(predicted)
        refused = admission.decide(config, self.standing(trials))
        if refused:
            raise ConfigError(refused)
        return predicted

    def standing(self, trials: list[optuna.trial.FrozenTrial]) -> admission.Standing:
        """The study as admission reads it (``trials``: the study's, read once for this config)."""
        to_go = None
        if self.plan.trials is not None:
            finished, running, _ = tally(trials)
            to_go = self.plan.trials - finished - max(0, running - 1)  # running - 1: not this one
        budget = self.clock.budget_s
        return admission.Standing(left_s=self.clock.left(), budget_s=math.inf if budget is None else budget,
                                  workers=self.plan.workers, to_go=to_go, refused_in_a_row=self.refusals.in_a_row)

    def ran_share(self, epochs: int, trials: list[optuna.trial.FrozenTrial]) -> float:
        """Share of its configured epochs a trial runs on average under the pruner: the theory
        for ``epochs`` (Plan.expected_epochs) worth PRIOR_TRIALS trials, plus one per finished
        trial of the study that trained (trials the budget stopped are not the pruner's doing).
        ``trials``: the study's."""
        total, n = PRIOR_TRIALS * min(1.0, self.plan.expected_epochs(epochs) / epochs), PRIOR_TRIALS
        for t in trials:
            ua = t.user_attrs
            configured = (ua.get(TrialKey.CONFIG) or {}).get("train", {}).get("epochs")
            if counts_toward_n(t) and configured and TrialKey.EPOCHS_RUN in ua and TrialKey.BUDGET_STOP not in ua:
                total, n = total + min(1.0, ua[TrialKey.EPOCHS_RUN] / configured), n + 1
        return total / n

    def overrun(self) -> bool:
        """The budget is spent: a running trial stops at this epoch's end."""
        return self.clock.left() <= 0
