"""The Pareto front of a multi-objective study, and the rule that prunes its trials.

Optuna prunes no multi-objective trial (``Trial.report`` and ``Trial.should_prune`` raise
NotImplementedError when a study has several directions), and pruning every trial against the most
accurate ones would kill exactly the cheap models a cost/accuracy search is for. The rule here
compares a trial only with the completed trials that cost no more than it does:

    Let T be a running trial with costs c(T) (params, FLOPs, latency: every objective but
    accuracy, all known before training) and val accuracy a_T(e) after epoch e.
    D = the completed trials S with c_i(S) <= c_i(T) for every cost objective i.
    If D is empty, T is never pruned: at its cost nothing is known to be better.
    S* = the most accurate trial in D: the front point that covers T's cost.
    ref(e) = S*'s val accuracy after epoch e (its recorded accuracy if it ran fewer epochs).
    T is pruned after epoch e when  e >= min_epoch,  e < T's last epoch,  and
    a_T(e) + margin < ref(e):  it trails, by more than the margin, the best model that is
    no more expensive at the same point of training, so it is not expected to reach the front.

A cheap model with modest accuracy is never compared with the big accurate ones (they cost more,
so they are not in its D), so it can reach the front. The final epoch is never pruned: its result
is already paid for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

MARGIN = 0.02  # accuracy points of benefit of the doubt (val noise, a slow start); 0..1 scale
MIN_EPOCH = 1  # epochs are reported from 1; the first epoch can already be compared


@dataclass(frozen=True)
class Point:
    """A completed trial as the rule sees it."""

    number: int
    accuracy: float  # the trial's recorded accuracy (its value: the best epoch's val accuracy)
    costs: Mapping[str, float]  # cost objective name -> value (lower is better)
    curve: Mapping[int, float] = field(default_factory=dict)  # epoch -> val accuracy


@dataclass(frozen=True)
class Decision:
    prune: bool
    reason: str  # why, in words (recorded on a pruned trial)
    reference: int | None = None  # number of the front point compared with (S*)


@dataclass(frozen=True)
class ParetoRule:
    margin: float = MARGIN
    min_epoch: int = MIN_EPOCH

    def decide(self, costs: Mapping[str, float], epoch: int, accuracy: float, last_epoch: int,
               completed: Sequence[Point]) -> Decision:
        """Whether a trial with ``costs`` at ``accuracy`` after ``epoch`` (of ``last_epoch``) is pruned."""
        assert costs, "the Pareto rule needs at least one cost objective"
        if epoch < self.min_epoch or epoch >= last_epoch:
            return Decision(False, "not a pruning epoch")
        cheaper = [p for p in completed if all(p.costs[k] <= v for k, v in costs.items())]
        if not cheaper:
            return Decision(False, "no completed trial costs as little or less")
        best = max(cheaper, key=lambda p: (p.accuracy, -p.number))
        ref = best.curve.get(epoch, best.accuracy)
        if accuracy + self.margin < ref:
            return Decision(True, f"epoch {epoch}: val accuracy {accuracy:.4f} + margin {self.margin} < "
                                  f"{ref:.4f} of trial {best.number} (no more costly, on the front)", best.number)
        return Decision(False, f"within reach of trial {best.number}", best.number)


# --------------------------------------------------------------------------- the front


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether values ``a`` dominate ``b``: no worse in every objective and better in one."""
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == "maximize":
            x, y = -x, -y  # compare as "lower is better"
        if x > y:
            return False
        better = better or x < y
    return better


def front_indices(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated rows of ``values`` (all of a tie stay on the front)."""
    return [i for i, v in enumerate(values)
            if not any(dominates(w, v, directions) for j, w in enumerate(values) if j != i)]


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that ran all their epochs: the front, export and the rule's references. A trial
    the rule (or the budget) stopped early is stored COMPLETE for the samplers but is not one."""
    from optuna.trial import TrialState

    from catdog_hpo.search.record import finished_complete

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if finished_complete(t)]


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials on the study's Pareto front, most accurate first."""
    done = completed_trials(study)
    dirs = [d.name.lower() for d in study.directions]
    idx = front_indices([t.values for t in done], dirs)
    return sorted((done[i] for i in idx), key=lambda t: (-t.values[0], *t.values[1:], t.number))


def points_of(study: optuna.Study, names: Sequence[str]) -> list[Point]:
    """The study's completed trials as Points; ``names`` are its objectives, accuracy first."""
    return [Point(t.number, t.values[0], dict(zip(names[1:], t.values[1:])), dict(t.intermediate_values))
            for t in completed_trials(study)]


def decide_for_trial(trial: Any, names: Sequence[str], costs: Mapping[str, float], epoch: int,
                     accuracy: float, last_epoch: int, rule: ParetoRule | None = None) -> Decision:
    """The rule for a running optuna trial against its study's completed trials."""
    return (rule or ParetoRule()).decide(costs, epoch, accuracy, last_epoch, points_of(trial.study, names))


# --------------------------------------------------------------------------- export's pick


@dataclass(frozen=True)
class Pick:
    trial: FrozenTrial
    rule: str  # how it was chosen, in words (the export file and the model card quote it)
    front: list[int]  # numbers of the front's trials when it was chosen


def pick_front_point(study: optuna.Study, max_params: int | None = None,
                     max_latency: float | None = None) -> Pick:
    """The trial ``export --pareto`` writes.

    No limit: the most accurate trial of the Pareto front. With ``--max-params N`` and/or
    ``--max-latency MS``: the most accurate completed trial within the limits, ties to the cheaper
    one (lower objective costs in order, then the earlier trial); it lies on the front whenever
    the limited cost is one of the study's objectives. UserError when no trial fits."""
    from catdog_hpo.errors import UserError
    from catdog_hpo.search.record import TrialRecord

    done = completed_trials(study)
    if not done:
        raise UserError(f"study {study.study_name!r} has no completed trial yet: nothing to export")
    front = [t.number for t in front_trials(study)] if len(study.directions) > 1 else []

    def rank(t: FrozenTrial) -> tuple:
        return (-t.values[0], *t.values[1:], t.number)  # accuracy first; costs are minimised

    if max_params is None and max_latency is None:
        pool = [t for t in done if t.number in front] if front else done
        best = min(pool, key=rank)
        return Pick(best, "the most accurate trial on the Pareto front" if front else
                    "the most accurate completed trial", front)
    limits: list[str] = []
    fits = done
    if max_params is not None:
        fits = [t for t in fits if (TrialRecord.from_trial(t).n_params or 0) <= max_params]
        limits.append(f"at most {max_params:,} parameters")
    if max_latency is not None:
        if any(TrialRecord.from_trial(t).latency_ms is None for t in done):
            raise UserError(f"--max-latency: study {study.study_name!r} did not time its trials "
                            f"(run it with --objectives accuracy,latency)")
        fits = [t for t in fits if TrialRecord.from_trial(t).latency_ms <= max_latency]
        limits.append(f"a latency of at most {max_latency:g} ms")
    if not fits:
        by_latency = max_latency is not None and max_params is None
        smallest = min(done, key=lambda t: (TrialRecord.from_trial(t).latency_ms or 0) if by_latency
                       else (TrialRecord.from_trial(t).n_params or 0))
        rec = TrialRecord.from_trial(smallest)
        have = f"{rec.n_params:,} parameters" + (f", {rec.latency_ms:g} ms" if rec.latency_ms is not None else "")
        raise UserError(f"no completed trial of study {study.study_name!r} has {' and '.join(limits)} "
                        f"(the smallest, trial {smallest.number}, has {have})")
    best = min(fits, key=rank)
    return Pick(best, f"the most accurate completed trial with {' and '.join(limits)}", front)
