"""The study's time budget (``run --budget``) and the admission guard that keeps trials inside it.

Time spent: every worker process of every run, on every machine, records one session interval
``[start, last seen]`` (epoch seconds) in the study's system attributes. Time spent is the length
of the union of those intervals: parallel workers and machines overlap and count once, a resumed
run adds only its own time, a crashed worker's interval ends where it was last seen.

Admission (``Guard.admit``): before any training, the cost model (engine.cost) predicts a
config's seconds on this device. It is turned away (recorded as a rejected trial, which the
sampler learns from through an Optuna constraint) when

- it would not finish in the time left (no trial is started that the model says cannot finish), or
- its expected cost (its epochs' cost x the share of them a trial runs on average under the
  pruner, ``Guard.ran_share``: the pruner's theory, 2.74 of 20 under SHA's rungs at 1, 3, 9, all
  of them without a pruner, as a prior worth PRIOR_TRIALS trials, blended with the share the
  study's finished trials ran) exceeds its fair share of what is left,
  ``left x workers / trials still to run x SHARE_SLACK``. The share doubles after every
  SHARE_RELAX_EVERY such refusals in a row (of this rule or the next), so pacing never idles
  the budget. Weighing only the first rung admitted configs whose first epoch alone took two
  fair shares; the few of them that SHA promoted ran 20 epochs of them and took the hours the
  other trials needed; or
- its whole cost exceeds MAX_SHARE_OF_LEFT of what is left (near the end, one promotion decides).

The last two apply only with ``--trials`` (a trial target to pace for), and not to the baseline
and the --enqueue configs, which the user asked for.

A running trial is stopped at the end of an epoch once the budget is spent (``Guard.overrun``), so
the run ends within the budget plus one epoch of the slowest running trial.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import optuna

from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.search import optuna_compat
from catdog_hpo.search.record import (BUDGET_SESSION_PREFIX, CALIBRATION_PREFIX, StudyKey, TrialKey,
                                      counts_toward_n, tally)
from catdog_hpo.search.pruners import all_epochs

SHARE_SLACK = 2.0  # a config may cost this many fair shares (trials that end early leave time over)
# Fair-share refusals in a row after which the share doubles (below the stop rule's 25, so pacing
# alone never ends a run): a study behind its --trials pace saw its share shrink below every config
# TPE proposed and stopped with 7 of its 60 minutes unspent (bench/budget.py); an unspent budget
# helps neither the trial count nor the accuracy.
SHARE_RELAX_EVERY = 8
# Trials the pruner's theory of the epochs a trial runs counts as, against the study's record.
# The theory undercounts under TPE: its later configs beat the earlier ones they are ranked
# against at each rung, so SHA let 13% of a 60-minute study's trials run all 20 epochs (theory:
# 3.7%), 4.7 epochs a trial, not 2.74, and the study paced for 100 trials finished 55.
PRIOR_TRIALS = 8.0
# With --trials: one trial's whole cost (all its epochs, if the pruner keeps it) may take at most
# this share of the time left (all workers'). Its expected cost is fair, but near the end one
# promotion decides: a 60-minute study admitted a config with 3.1 minutes left whose 20 epochs
# then took 136 s of them, the time of some 15 first-rung trials, and it ended at 93 of its 100.
# It relaxes with the fair share (SHARE_RELAX_EVERY): alone, it refused 25 configs in a row that
# TPE kept proposing and ended the next 60-minute study with 2.7 minutes unspent, at 96 trials.
MAX_SHARE_OF_LEFT = 0.5
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOUCH_EVERY_S = 2.0  # how often a session writes its "last seen" time (store writes are not free)


def parse_duration(text: str, flag: str = "--budget") -> float:
    """Seconds from ``90s``, ``45m``, ``2h``, ``1.5h``, ``1d`` or plain seconds (``600``);
    UserError naming ``flag`` otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)\s*", str(text).lower())
    if m is None:
        raise UserError(f"{flag} {text!r}: expected a duration such as 90s, 45m, 2h or a number of seconds")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{flag} {text!r}: must be more than 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


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
        self._storage = study._storage
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
    attrs = study._storage.get_study_system_attrs(optuna_compat.study_id(study))
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
        self.too_late = 0  # configs in a row turned away when even the cheapest seen would not fit
        self.cheapest = math.inf  # seconds: the cheapest config this worker has been asked to admit
        self.over_share = 0  # configs in a row turned away by the fair share (SHARE_RELAX_EVERY)

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
        storage, sid = self.study._storage, optuna_compat.study_id(self.study)
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
        left = self.clock.left()
        if math.isinf(left):
            return predicted
        # The budget is done when what is left fits not even the cheapest config seen so far; a
        # sampler that proposes a few big configs in a row with time left has not ended it.
        self.cheapest = min(self.cheapest, predicted)
        self.too_late = self.too_late + 1 if left < self.cheapest else 0
        if predicted > left:
            raise ConfigError(f"predicted {format_duration(predicted)} > the {format_duration(left)} "
                              f"left of --budget {format_duration(self.clock.budget_s or 0)}")
        # The fair share is weighed against what the trial costs on average under the pruner
        # (ran_share: theory and the study's record). The baseline and the user's --enqueue configs were asked
        # for by name: only "must finish" applies to them.
        ran = min(float(w.epochs), w.epochs * self.ran_share(w.epochs, trials))  # epochs, on average
        expected = predicted - cal.predict(w, epochs=w.epochs - ran)  # less the epochs it will not run
        asked = trial.user_attrs.get(TrialKey.BASELINE) or trial.user_attrs.get(TrialKey.ENQUEUED_FROM)
        relax = 2 ** (self.over_share // SHARE_RELAX_EVERY)  # both pacing rules relax together
        share = self.fair_share(left, trials) * relax
        if expected > share and not asked:
            self.over_share += 1
            raise ConfigError(f"expected {format_duration(expected)} ({ran:.1f} of {w.epochs} epochs under the pruner) "
                              f"> its fair share "
                              f"{format_duration(share)} of the {format_duration(left)} left of --budget")
        cap = min(1.0, MAX_SHARE_OF_LEFT * relax)  # of the time left (all workers')
        if self.plan.trials is not None and not asked and predicted > left * self.plan.workers * cap:
            self.over_share += 1
            raise ConfigError(f"predicted {format_duration(predicted)} for all {w.epochs} epochs > "
                              f"{cap:.0%} of the {format_duration(left)} left of --budget, "
                              f"with trials still to run")
        self.over_share = 0
        return predicted

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

    def fair_share(self, left: float, trials: list[optuna.trial.FrozenTrial]) -> float:
        """Seconds one trial may cost: inf without --trials (only 'must finish' applies).
        ``trials``: the study's."""
        if self.plan.trials is None:
            return math.inf
        finished, running, _ = tally(trials)
        still = max(1, self.plan.trials - finished - max(0, running - 1))  # running - 1: not this one
        return left * self.plan.workers / still * SHARE_SLACK

    def overrun(self) -> bool:
        """The budget is spent: a running trial stops at this epoch's end."""
        return self.clock.left() <= 0


_MIN_REJECTS_IN_A_ROW = 25  # configs turned away in a row (each costs ~0.1 s) before a worker may give up
_MAX_REJECTS_IN_A_ROW = 500  # ... and before it surely does (~1 minute of sampling)


def rejects_tolerated(admitted: int, proposed: int) -> int:
    """Configs turned away in a row before this worker stops: a run of refusals that had under
    1% chance at the share of the ``proposed`` configs before the run that were ``admitted``
    (Laplace's estimate: none before the run gives 1/2, so 25), 25 to 500. A
    learning sampler (TPE) that keeps proposing refused configs stops after 25; random search,
    which never learns, with 7% of its configs admitted (measured) turns away 25 in a row about
    one time in six by chance, and ended a 60-minute study at 7 minutes under a flat limit of 25."""
    p = (admitted + 1) / (proposed + 2)
    run = math.ceil(math.log(0.01) / math.log1p(-p)) if p < 1 else 1
    return max(_MIN_REJECTS_IN_A_ROW, min(_MAX_REJECTS_IN_A_ROW, run))
