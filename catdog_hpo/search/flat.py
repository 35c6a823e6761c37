"""``run --stop-when-flat``: end a study once further improvement is unlikely to beat the noise.

The rule: the noise of a validation accuracy p on n images is its binomial standard error,
sqrt(p (1 - p) / n); a trial that beats the best by less than that has not shown it is better.
Only a completed trial can set a new best (a pruned one stopped before it could), so patience
counts completed trials: the study's plateau began at the first completed trial that came
within that noise of today's best, and the study stops once as many trials have completed since
then as before it, and at least MIN_SINCE (with MIN_TRIALS finished in all): the search has
spent as much again without a gain it could tell from noise. Doubling patience is scale-free (a
best at the 10th completed trial stops at the 20th, at the 40th at the 80th) and needs no setting.

Why not Optuna's Terminator: it is deprecated (since Optuna 4.9, to go in 6.0), wants the
cross-validation scores of every trial for its error term, and fits a GP over the intersection of
the trials' parameters, which conditional spaces (per-block parameters under a searched depth)
leave nearly empty.
"""

from __future__ import annotations

import math

MIN_TRIALS = 20  # finished trials before the rule may stop a study: TPE's 10 random start-up trials, and as many informed
# completed trials since the plateau began, at least: a plateau found early (the baseline, trial 0)
# must outlast a few full trials, not the one-epoch trials a pruner stops around it
MIN_SINCE = 5


def noise(accuracy: float, n_val: int) -> float:
    """Binomial standard error of an accuracy measured on ``n_val`` images."""
    assert n_val > 0
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n_val)


def flat(values: list[float | None], n_val: int) -> str | None:
    """None to go on, else the one-line reason the study is flat. ``values``: the finished trials'
    accuracies in the order they finished (None: a trial stopped without one, e.g. pruned)."""
    scored = [v for v in values if v is not None]
    if len(values) < MIN_TRIALS or not scored:
        return None
    best = max(scored)
    floor = best - noise(best, n_val)
    reached = next(i for i, v in enumerate(scored, start=1) if v >= floor)  # among the completed
    since = len(scored) - reached
    if since < max(reached, MIN_SINCE):
        return None
    return (f"flat: the best val accuracy {best:.4f} came within its noise (+-{noise(best, n_val):.4f} "
            f"on {n_val} val images) at completed trial {reached}, and the {since} completed since "
            f"({len(values)} finished in all) have not beaten it by more")
